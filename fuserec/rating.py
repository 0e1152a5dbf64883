"""The explicit rating-prediction contract: fit on (user, item, rating) triples, predict from histories.

It sits beside the ranking contract (:class:`fuserec.api.Algorithm`) and follows the same rules: a typed
pydantic config, a logic-free ``__init__``, state as plain numeric arrays (no pickle), plugins found
through an entry-point group (``fuserec.raters``). What differs is the question: not "which items", but
"what rating would this user give these items".

As for ranking, a prediction is a function of the user's *rated history*, never of a user id: each history
row carries the items the user rated and ``histories.ratings``. So a new user, or a known user with a fresh
rating, is served without retraining; models with per-user parameters (biases, factors) fold the history
in at predict time. :meth:`RatingAlgorithm.predict_fitted` gives the plain fitted-user-parameter prediction
where a model has one, so the cost of folding in can be measured (``benchmarks/rating.py``).

Predictions are clipped to the range of the training ratings (``rating_range_``): a model may extrapolate
past 5 stars, a served rating may not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import pandas as pd
from pydantic import Field

from fuserec.api import (
    API_VERSION,
    AlgorithmConfig,
    FloatRange,
    IntRange,
    SearchDim,
    coerce_config,
    load_config_and_state,
    save_config_and_state,
)
from fuserec.histories import Histories
from fuserec.registry import RATERS_GROUP

if TYPE_CHECKING:
    import torch

#: Keys of :meth:`RatingAlgorithm.get_state` that the base class owns; plugins' own keys must differ.
META_KEYS = ("meta_rating_range", "meta_shape")


class RatingConfig(AlgorithmConfig):
    """Base of every rater's config: unknown keys are errors, values are frozen, ``seed`` is shared."""


class FactorSGDConfig(RatingConfig):
    """What the factor models trained by minibatch SGD share (``svd``, ``svdpp``); each sets its own
    ``factors`` and learning-rate defaults."""

    search_space: ClassVar[dict[str, SearchDim]] = {
        "factors": IntRange(4, 200, log=True),
        "epochs": IntRange(5, 60),
        "lr": FloatRange(1e-3, 3e-2, log=True),
        "reg": FloatRange(1e-3, 0.3, log=True),
        "fold_in_reg": FloatRange(0.1, 100.0, log=True),
    }

    factors: int = Field(100, ge=1, description="latent dimensions")
    epochs: int = Field(20, ge=1, description="passes of SGD over the ratings")
    lr: float = Field(0.005, gt=0.0, le=1.0, description="SGD learning rate of every parameter")
    reg: float = Field(0.02, ge=0.0, description="L2 penalty, applied at every rating")
    init_mean: float = Field(0.0, description="mean of the initial factors")
    init_std: float = Field(0.1, ge=0.0, description="standard deviation of the initial factors")
    batch_size: int = Field(256, ge=1, le=1 << 16, description="ratings per vectorised SGD step")
    fold_in_reg: float = Field(
        10.0,
        gt=0.0,
        description="ridge added to reg·|h| when folding a history in (stands in for early stopping)",
    )


@dataclass(frozen=True)
class RatingSide:
    """Optional side information a rater may read: item content and user attributes, as numbers.

    ``item_features float32 [n_items, f]`` (content: genres, year, text; see :mod:`fuserec.features`);
    ``user_features float32 [n_users, g]`` one-hot attributes of the training users (rows = user index,
    all zeros for a user whose attributes are unknown) with ``user_feature_names`` naming the columns.
    At predict time a known user's row is found through ``Histories.users``; the served graph takes the
    same columns as its optional ``user_features`` input.
    """

    item_features: np.ndarray | None = None
    user_features: np.ndarray | None = None
    user_feature_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class RatingData:
    """Validated training triples: ``users`` and ``items`` are ``int64`` indices, ``ratings`` ``float64``."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    n_users: int
    n_items: int
    timestamps: np.ndarray | None = None
    side: RatingSide = RatingSide()

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, n_users: int, n_items: int, side: RatingSide | None = None
    ) -> RatingData:
        """Check a ``user, item, rating[, timestamp]`` frame, so errors name the problem, not a shape."""
        missing = {"user", "item", "rating"} - set(frame.columns)
        if missing:
            raise ValueError(f"ratings frame lacks columns {sorted(missing)}; it needs user, item, rating")
        if len(frame) == 0:
            raise ValueError("cannot fit a rater on an empty ratings frame")
        users = frame["user"].to_numpy(np.int64)
        items = frame["item"].to_numpy(np.int64)
        ratings = frame["rating"].to_numpy(np.float64)
        if users.min() < 0 or users.max() >= n_users:
            raise ValueError(f"user indices must lie in [0, {n_users})")
        if items.min() < 0 or items.max() >= n_items:
            raise ValueError(f"item indices must lie in [0, {n_items})")
        if not np.isfinite(ratings).all():
            raise ValueError("ratings must be finite")
        timestamps = frame["timestamp"].to_numpy(np.int64) if "timestamp" in frame else None
        side = side or RatingSide()
        if side.item_features is not None and len(side.item_features) != n_items:
            raise ValueError(f"side.item_features has {len(side.item_features)} rows, items {n_items}")
        if side.user_features is not None and len(side.user_features) != n_users:
            raise ValueError(f"side.user_features has {len(side.user_features)} rows, the users {n_users}")
        return cls(users, items, ratings, int(n_users), int(n_items), timestamps, side)

    @property
    def global_mean(self) -> float:
        return float(self.ratings.mean())

    def histories(self) -> Histories:
        """Every user's rated history (time order when timestamps are known), with ``ratings`` aligned."""
        ts = self.timestamps if self.timestamps is not None else np.zeros(len(self.users), dtype=np.int64)
        order = np.lexsort((self.items, ts, self.users))
        counts = np.bincount(self.users, minlength=self.n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Histories(
            indptr,
            self.items[order],
            self.n_items,
            ts[order],
            self.ratings[order].astype(np.float32),
            np.arange(self.n_users, dtype=np.int64),
        )


def history_rows(histories: Histories) -> np.ndarray:
    """``int64 [len(histories.items)]``: the history row of every entry of ``histories.items``."""
    return np.repeat(np.arange(len(histories), dtype=np.int64), histories.lengths)


class RatingAlgorithm(ABC):
    """Base class of rating-prediction plugins.

    Subclasses set ``Config`` (deriving from :class:`RatingConfig`) and implement :meth:`fit_ratings`,
    :meth:`estimate`, :meth:`model_state` and :meth:`set_model_state`; optionally :meth:`fitted_estimate`.
    The base class validates inputs, records the rating range and clips, so every plugin behaves alike.

    Shapes: ``predict(histories, items)`` takes ``len(histories) == B`` rated histories and ``int64 [B, m]``
    item indices (row b: the items to rate for history b) and returns ``float32 [B, m]`` within
    ``rating_range_``.
    """

    api_version: ClassVar[str] = API_VERSION
    Config: ClassVar[type[RatingConfig]] = RatingConfig
    #: Whether :meth:`to_torch`'s module takes a fourth input, ``user_features float32 [B, g]``.
    reads_user_features: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig | dict[str, Any] | None = None) -> None:
        self.config = coerce_config(self.Config, config)
        self.n_items_: int | None = None
        self.n_users_: int | None = None
        self.rating_range_: tuple[float, float] | None = None

    # -- what plugins implement -----------------------------------------------------------------------
    @abstractmethod
    def fit_ratings(self, data: RatingData) -> None:
        """Learn from validated triples (the base class has already set shapes and the rating range)."""

    @abstractmethod
    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        """Unclipped ``[B, m]`` estimates; ``histories.ratings`` is present and ``items`` is in range."""

    @abstractmethod
    def model_state(self) -> dict[str, np.ndarray]:
        """The plugin's fitted arrays (numeric; keys must not start with ``meta_``)."""

    @abstractmethod
    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`model_state` returned."""

    def to_torch(self) -> torch.nn.Module:
        """The served form of :meth:`estimate` (unclipped), exportable with ``torch.export`` / ONNX.

        ``forward(history, history_ratings, items[, user_features])``: ``history int64 [B, L]`` item
        indices padded with -1 (:data:`fuserec.histories.PAD`; any id outside ``[0, n_items)`` is padding),
        ``history_ratings float32 [B, L]`` aligned with it (padding ignored), ``items int64 [B, m]`` the
        items to rate (in range) and, when :attr:`reads_user_features`, ``user_features float32 [B, g]``.
        Returns ``float32 [B, m]``, equal to :meth:`estimate` within 1e-4 (the base class clips).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no served form: implement to_torch() to export it "
            "(docs/concepts/rating.md)"
        )

    def fitted_estimate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        """Unclipped estimates from the *fitted* per-user parameters of training users (pairs ``users[n]``,
        ``items[n]``); None when the model has no such parameters or they were not kept (after a load).

        Diagnostics only: serving always folds the history in. It shows what folding in costs.
        """
        return None

    # -- the contract -----------------------------------------------------------------------------------
    def fit(self, ratings: pd.DataFrame, n_users: int, n_items: int, side: RatingSide | None = None) -> Self:
        """Fit on ``ratings`` (columns ``user``, ``item``, ``rating``[, ``timestamp``]) of ``n_users`` users
        over a catalogue of ``n_items`` items, with optional ``side`` information (raters that do not
        read it ignore it)."""
        data = RatingData.from_frame(ratings, n_users, n_items, side)
        self.n_users_, self.n_items_ = data.n_users, data.n_items
        self.rating_range_ = (float(data.ratings.min()), float(data.ratings.max()))
        self.fit_ratings(data)
        return self

    def predict(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        """``float32 [B, m]`` ratings of ``items[b]`` for history ``b``, clipped to ``rating_range_``."""
        n_items = self._check_fitted()
        items = np.asarray(items)
        if items.ndim != 2 or items.shape[0] != len(histories):
            raise ValueError(f"items must be [len(histories), m] = [{len(histories)}, m], got {items.shape}")
        if not np.issubdtype(items.dtype, np.integer):
            raise TypeError(f"items must be integer item indices, got {items.dtype}")
        if items.size and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(f"item indices must lie in [0, {n_items})")
        if histories.n_items != n_items:
            raise ValueError(f"histories are over {histories.n_items} items, the model over {n_items}")
        if histories.ratings is None:
            raise ValueError("rating prediction needs rated histories: histories.ratings is None")
        out = self.estimate(histories, items.astype(np.int64))
        return self._clip(out)

    def predict_fitted(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        """Clipped :meth:`fitted_estimate` of pairs of training users and items (None when not available)."""
        self._check_fitted()
        out = self.fitted_estimate(np.asarray(users, np.int64), np.asarray(items, np.int64))
        return None if out is None else self._clip(out)

    def predict_pairs(self, histories: Histories, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``float32 [n]``: the rating of ``items[n]`` for history ``rows[n]``, grouped into one ``predict``.

        Pairs are grouped by history and padded (with item 0, whose predictions are dropped), the layout
        an evaluation of held-out ratings needs.
        """
        rows, items = np.asarray(rows, np.int64), np.asarray(items, np.int64)
        if rows.shape != items.shape or rows.ndim != 1:
            raise ValueError("rows and items must be 1-D arrays of the same length")
        out = np.zeros(len(rows), dtype=np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        uniq, start, counts = np.unique(rows[order], return_index=True, return_counts=True)
        group = np.repeat(np.arange(len(uniq)), counts)
        pos = np.arange(len(rows)) - np.repeat(start, counts)
        grid = np.zeros((len(uniq), int(counts.max())), dtype=np.int64)
        grid[group, pos] = items[order]
        pred = self.predict(histories.select(uniq), grid)
        out[order] = pred[group, pos]
        return out

    # -- state (no pickle) -------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.n_items_ is not None

    def _check_fitted(self) -> int:
        if self.n_items_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(ratings, ...) or load(path)")
        return self.n_items_

    def _clip(self, values: np.ndarray) -> np.ndarray:
        assert self.rating_range_ is not None
        low, high = self.rating_range_
        return np.clip(np.asarray(values, dtype=np.float32), low, high).astype(np.float32)

    def get_state(self) -> dict[str, np.ndarray]:
        """Every array :meth:`predict` needs: the plugin's own plus the rating range and shapes."""
        self._check_fitted()
        assert self.rating_range_ is not None and self.n_users_ is not None and self.n_items_ is not None
        own = self.model_state()
        clash = [k for k in own if k.startswith("meta_")]
        if clash:
            raise ValueError(f"{type(self).__name__}.model_state() uses reserved keys {clash}")
        return {
            **own,
            "meta_rating_range": np.asarray(self.rating_range_, dtype=np.float64),
            "meta_shape": np.asarray([self.n_users_, self.n_items_], dtype=np.int64),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`get_state` returned (fitted-user diagnostics are not part of it)."""
        low, high = (float(v) for v in state["meta_rating_range"])
        n_users, n_items = (int(v) for v in state["meta_shape"])
        self.rating_range_, self.n_users_, self.n_items_ = (low, high), n_users, n_items
        self.set_model_state({k: v for k, v in state.items() if k not in META_KEYS})

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``state.npz`` into folder ``path``."""
        return save_config_and_state(path, type(self).__name__, self.config, self.get_state())

    @classmethod
    def load(cls, path: str | Path) -> Self:
        meta, state = load_config_and_state(path)
        algo = cls(cls.Config.model_validate(meta["config"]))
        algo.set_state(state)
        return algo


__all__ = [
    "RATERS_GROUP",
    "RatingAlgorithm",
    "RatingConfig",
    "RatingData",
    "RatingSide",
    "history_rows",
]
