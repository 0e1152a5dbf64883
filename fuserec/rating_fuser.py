"""The rating-fuser contract: learn how to combine raters' predictions, from out-of-fold rows.

A rating fuser gets, per (history, item) pair, the ``M`` components' clipped predictions and the
:data:`fuserec.rating_meta.META_FEATURES`, and returns the fused rating as a sum of parts: one per
component, one ``context`` part (what the meta-features moved), one ``base`` part (intercept). The parts
are the explanation, and they add up to the (unclipped) fused rating by construction: the fused rating
*is* their sum.

It learns in numpy (``fit``) but combines in torch only (:meth:`RatingFuser.to_torch`): Python scoring and
the exported graph run the same arithmetic, as for the ranking fusers (:mod:`fuserec.fusion`). Fusers are
plugins of the entry-point group ``fuserec.rating_fusers``, with typed configs and numeric state (no
pickle), like raters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from fuserec.api import (
    API_VERSION,
    SearchDim,
    coerce_config,
    load_config_and_state,
    save_config_and_state,
)
from fuserec.rating_meta import META_FEATURES
from fuserec.registry import RATING_FUSERS_GROUP

#: Names of the two parts that follow the components' parts.
CONTEXT, BASE = "context", "base"
#: Rows per call of the torch form in :meth:`RatingFuser.combine`.
COMBINE_ROWS = 2048


class RatingFuserConfig(BaseModel):
    """Base of every rating fuser's config: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    search_space: ClassVar[dict[str, SearchDim]] = {}

    seed: int = 42


def part_names(components: list[str]) -> list[str]:
    """Names of the ``M + 2`` parts of a fused rating, in order."""
    return [*components, CONTEXT, BASE]


def ridge(
    x: np.ndarray,
    y: np.ndarray,
    alpha: float,
    prior: np.ndarray | None = None,
    intercept_penalty: float = 0.0,
) -> tuple[np.ndarray, float]:
    """``(w, b)`` of ``y ≈ x @ w + b`` minimising ``‖y − xw − b‖² + alpha (‖w − w₀‖² + c (b − b₀)²)``.

    ``prior`` is ``(w₀, b₀)`` as one vector of length ``d + 1`` (zeros when None); ``c`` is
    ``intercept_penalty`` (0: the intercept is free). Shrinking toward a prior, not toward zero, is what
    lets a small group's blend (:mod:`fuserec.plugins.rating_fusers.per_user`) fall back to the global one.
    """
    n, d = x.shape
    design = np.hstack([np.asarray(x, np.float64), np.ones((n, 1))])
    penalty = np.full(d + 1, float(alpha))
    penalty[d] = alpha * intercept_penalty
    theta0 = np.zeros(d + 1) if prior is None else np.asarray(prior, np.float64)
    gram = design.T @ design + np.diag(penalty)
    rhs = design.T @ np.asarray(y, np.float64) + penalty * theta0
    theta = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return theta[:d], float(theta[d])


class LinearParts(torch.nn.Module):
    """Parts of a linear blend: ``w_k · pred_k`` per component, 0 context, the intercept as base.

    With ``thresholds``, each row picks one of several blends by how many thresholds its meta-feature
    ``column`` exceeds (per-bucket weights, :mod:`fuserec.plugins.rating_fusers.per_user`).
    """

    weights: torch.Tensor  # buffers: [K, M], [K], [K - 1]
    intercepts: torch.Tensor
    thresholds: torch.Tensor

    def __init__(
        self,
        weights: np.ndarray,
        intercepts: np.ndarray,
        thresholds: np.ndarray | None = None,
        column: int = 0,
    ) -> None:
        super().__init__()
        w = np.atleast_2d(np.asarray(weights, np.float32))
        self.register_buffer("weights", torch.from_numpy(w))  # [K, M]
        self.register_buffer("intercepts", torch.from_numpy(np.atleast_1d(intercepts).astype(np.float32)))
        t = np.zeros(0, np.float32) if thresholds is None else np.asarray(thresholds, np.float32)
        self.register_buffer("thresholds", torch.from_numpy(t))
        self.column = column
        self.bucketed = len(t) > 0

    def forward(self, predictions: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        weights, intercepts = self.weights, self.intercepts
        if self.bucketed:
            key = meta[:, self.column : self.column + 1]
            bucket = (key > self.thresholds).to(torch.int64).sum(dim=1)
            w, b = weights[bucket], intercepts[bucket]
        else:
            w, b = weights[0].unsqueeze(0), intercepts[0].expand(predictions.shape[0])
        parts = predictions.to(torch.float32) * w
        zero = torch.zeros_like(parts[:, :1])
        return torch.cat([parts, zero, b.reshape(-1, 1)], dim=1)


class RatingFuser(ABC):
    """Base class of rating fusers; subclasses implement :meth:`fit_arrays`, :meth:`to_torch` and state.

    ``fit(predictions [n, M], meta [n, F], target [n], groups=None)``: ``groups`` (e.g. user ids) say which
    rows belong together when a fuser holds rows out (early stopping): never split a user's rows.
    ``combine(predictions, meta) -> (fused [n], parts [n, M + 2])`` runs :meth:`to_torch`'s module.
    """

    api_version: ClassVar[str] = API_VERSION
    Config: ClassVar[type[RatingFuserConfig]] = RatingFuserConfig

    def __init__(self, config: RatingFuserConfig | dict[str, Any] | None = None) -> None:
        self.config = coerce_config(self.Config, config)
        self.n_components_: int | None = None
        self._module: torch.nn.Module | None = None

    # -- what plugins implement ---------------------------------------------------------------------
    @abstractmethod
    def fit_arrays(
        self, predictions: np.ndarray, meta: np.ndarray, target: np.ndarray, groups: np.ndarray
    ) -> None:
        """Learn from validated float64 arrays (``meta`` columns are :data:`META_FEATURES`)."""

    @abstractmethod
    def to_torch(self) -> torch.nn.Module:
        """``forward(predictions float32 [N, M], meta float32 [N, F]) -> parts float32 [N, M + 2]``."""

    @abstractmethod
    def model_state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (numeric; keys must not start with ``meta_``)."""

    @abstractmethod
    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`model_state` returned."""

    def summary(self, components: list[str]) -> dict[str, Any]:
        """What was learned, for reports (weights, rounds); JSON-ready."""
        return {}

    # -- the contract -------------------------------------------------------------------------------
    def fit(
        self,
        predictions: np.ndarray,
        meta: np.ndarray,
        target: np.ndarray,
        groups: np.ndarray | None = None,
    ) -> Self:
        predictions = np.asarray(predictions, np.float64)
        meta = np.asarray(meta, np.float64)
        target = np.asarray(target, np.float64)
        n = len(target)
        if predictions.ndim != 2 or predictions.shape[0] != n or predictions.shape[1] < 1:
            raise ValueError(f"predictions must be [n, M] = [{n}, M >= 1], got {predictions.shape}")
        if meta.shape != (n, len(META_FEATURES)):
            raise ValueError(f"meta must be [n, {len(META_FEATURES)}] (META_FEATURES), got {meta.shape}")
        if n == 0:
            raise ValueError("cannot fit a rating fuser on no rows")
        if not (np.isfinite(predictions).all() and np.isfinite(meta).all() and np.isfinite(target).all()):
            raise ValueError("predictions, meta and target must be finite")
        groups = np.arange(n) if groups is None else np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must be [n] = [{n}], got {groups.shape}")
        self.n_components_ = predictions.shape[1]
        # learn on the float32 values the served graph will see
        as32 = predictions.astype(np.float32).astype(np.float64), meta.astype(np.float32).astype(np.float64)
        self.fit_arrays(*as32, target, groups)
        self._module = None
        return self

    def combine(self, predictions: np.ndarray, meta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(fused float32 [n], parts float32 [n, M + 2])``; ``fused`` is unclipped, the sum of ``parts``."""
        if self.n_components_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(...) or load(path)")
        predictions = np.array(predictions, np.float32)  # a writable copy: torch refuses read-only arrays
        if predictions.ndim != 2 or predictions.shape[1] != self.n_components_:
            raise ValueError(f"predictions must be [n, {self.n_components_}], got {predictions.shape}")
        if self._module is None:
            self._module = self.to_torch().eval()
        meta = np.array(meta, np.float32)
        out = np.zeros((len(predictions), predictions.shape[1] + 2), np.float32)
        with torch.no_grad():  # in chunks: a tree ensemble's leaf indicator is [rows, trees x leaves]
            for start in range(0, len(predictions), COMBINE_ROWS):
                stop = start + COMBINE_ROWS
                chunk = self._module(
                    torch.from_numpy(predictions[start:stop]), torch.from_numpy(meta[start:stop])
                )
                out[start:stop] = chunk.numpy()
        return out.sum(axis=1), out

    # -- state (no pickle) ----------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        if self.n_components_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        own = self.model_state()
        clash = [k for k in own if k.startswith("meta_")]
        if clash:
            raise ValueError(f"{type(self).__name__}.model_state() uses reserved keys {clash}")
        return {**own, "meta_components": np.asarray(self.n_components_, dtype=np.int64)}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.n_components_ = int(state["meta_components"])
        self.set_model_state({k: v for k, v in state.items() if k != "meta_components"})
        self._module = None

    def save(self, path: str | Path) -> Path:
        """``config.json`` and ``state.npz`` in folder ``path``."""
        return save_config_and_state(path, type(self).__name__, self.config, self.get_state())

    @classmethod
    def load(cls, path: str | Path) -> Self:
        meta, state = load_config_and_state(path)
        fuser = cls(cls.Config.model_validate(meta["config"]))
        fuser.set_state(state)
        return fuser


__all__ = [
    "BASE",
    "CONTEXT",
    "RATING_FUSERS_GROUP",
    "LinearParts",
    "RatingFuser",
    "RatingFuserConfig",
    "part_names",
    "ridge",
]
