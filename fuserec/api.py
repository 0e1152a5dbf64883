"""The plugin contract (API v1): every algorithm fits on a dataset and scores histories.

Third parties build against this module, so it stays small. ``api_version`` is ``MAJOR.MINOR``: a minor
bump only adds optional methods with defaults; a major bump changes a signature or a shape, and the
registry refuses plugins whose major version it does not support (see ``SUPPORTED_API_MAJORS``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from fuserec.histories import PAD, Histories

if TYPE_CHECKING:
    import torch

    from fuserec.data.dataset import Dataset

API_VERSION = "1.0"
SUPPORTED_API_MAJORS: tuple[int, ...] = (1,)
CONFIG_FILE = "config.json"
STATE_FILE = "state.npz"


@dataclass(frozen=True)
class IntRange:
    """An integer hyper-parameter searched in ``[low, high]`` (log-uniform when ``log``)."""

    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    """A float hyper-parameter searched in ``[low, high]`` (log-uniform when ``log``)."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A hyper-parameter searched among ``values``."""

    values: tuple[Any, ...]


SearchDim = IntRange | FloatRange | Choice


class AlgorithmConfig(BaseModel):
    """Base of every plugin's typed config: unknown keys are errors, so typos in params.yaml surface.

    ``search_space`` declares what ``fuserec tune`` searches (on the validation carve only): field name
    -> :class:`IntRange` / :class:`FloatRange` / :class:`Choice`. Fields not listed keep their values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    search_space: ClassVar[dict[str, SearchDim]] = {}

    seed: int = 42


class Algorithm(ABC):
    """Base class of recommender plugins.

    Subclasses set ``Config`` (a pydantic model deriving from :class:`AlgorithmConfig`) and implement
    ``fit``, ``score``, ``to_torch`` and the two state hooks. ``__init__`` only stores the config (as in
    scikit-learn); fitted state lives in attributes ending in ``_``.

    Shapes and dtypes:

    - ``score(histories)`` -> ``float32 [len(histories), n_items]``, finite; higher is better. It does not
      exclude seen items: callers do (evaluation, export), so fusion can still read those scores.
    - ``to_torch()`` -> ``torch.nn.Module`` whose ``forward(history)`` takes ``int64 [B, L]`` item indices
      padded with -1 (see :meth:`Histories.to_padded`; every index is in ``[-1, n_items)``) and returns
      ``float32 [B, n_items]`` equal to ``score`` on the same histories.
    """

    api_version: ClassVar[str] = API_VERSION
    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    #: Columns of the users table (``data.users``) the plugin may read, e.g. ``{"age", "gender"}``. Validate
    #: keeps only the attributes some configured plugin declares (data minimisation, docs/privacy.md), so a
    #: plugin that reads an attribute it does not declare finds it missing.
    user_attributes: ClassVar[frozenset[str]] = frozenset()
    #: The rater (entry-point group ``fuserec.raters``) that predicts explicit ratings by this plugin's
    #: method, where there is one (a ranking plugin learns from implicit positives, which hold no rating
    #: scale). ``fuserec plugins`` lists it among the plugin's capabilities.
    rating_counterpart: ClassVar[str | None] = None

    def __init__(self, config: AlgorithmConfig | dict[str, Any] | None = None) -> None:
        self.config = coerce_config(self.Config, config)
        self.n_items_: int | None = None

    # -- the contract -------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, data: Dataset) -> Self:
        """Learn from ``data.interactions`` (positives of the training carve); set ``self.n_items_``."""

    @abstractmethod
    def score(self, histories: Histories) -> np.ndarray:
        """Scores of every catalog item for each history: ``float32 [n_users, n_items]``."""

    @abstractmethod
    def to_torch(self) -> torch.nn.Module:
        """A module computing :meth:`score` from padded histories, for ONNX export."""

    @abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """Fitted arrays to save (numeric, no objects: saved with ``allow_pickle=False``)."""

    @abstractmethod
    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`get_state` returned."""

    # -- optional -----------------------------------------------------------------------------------
    def user_representation(self, histories: Histories) -> np.ndarray | None:
        """``float32 [n_users, d]`` vectors for feature fusion; None when the model has none."""
        return None

    def item_representation(self) -> np.ndarray | None:
        """``float32 [n_items, d]`` vectors for feature fusion; None when the model has none."""
        return None

    def explain(self, history: np.ndarray, item: int) -> dict[str, Any] | None:
        """What drove ``item``'s score for this history (e.g. contributing history items); None if unknown."""
        return None

    def explain_state(self) -> dict[str, np.ndarray] | None:
        """Arrays (numeric or text, as :meth:`get_state`'s) with which :meth:`explain` runs in the service,
        which has the exported graph but not this artifact; None (the default): it does not explain there.

        The export saves them beside the graph; the service restores them with :meth:`set_state` on a
        fresh instance of the same config, and calls only :meth:`explain` on it. So keep them to what
        ``explain`` reads: they are loaded by every served process.
        """
        return None

    # -- persistence (no pickle) --------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.n_items_ is not None

    def _check_fitted(self) -> int:
        if self.n_items_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(dataset) or load(path) first")
        return self.n_items_

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``state.npz`` into folder ``path``."""
        n_items = self._check_fitted()
        state = self.get_state()
        return save_config_and_state(path, type(self).__name__, self.config, state, n_items=n_items)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        meta, state = load_config_and_state(path)
        algo = cls(cls.Config.model_validate(meta["config"]))
        algo.set_state(state)
        algo.n_items_ = int(meta["n_items"])
        return algo


C = TypeVar("C", bound=BaseModel)


def coerce_config(model: type[C], config: BaseModel | dict[str, Any] | None) -> C:
    """``config`` as an instance of ``model``: defaults for None, validated from a dict or another model.

    What every plugin base's logic-free ``__init__`` does with its argument (algorithms, fusers, raters).
    """
    if config is None:
        return model()
    if isinstance(config, dict):
        return model.model_validate(config)
    if isinstance(config, model):
        return config
    return model.model_validate(config.model_dump())


def save_config_and_state(
    path: str | Path, owner: str, config: BaseModel, state: dict[str, np.ndarray], **extra: Any
) -> Path:
    """Write ``config.json`` (the config plus ``extra`` keys) and ``state.npz`` into folder ``path``.

    Refuses non-numeric arrays, which would need pickle to load; ``owner`` names the plugin in that error.
    """
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray) or v.dtype == object]
    if bad:
        raise TypeError(f"{owner}.get_state() returned non-numeric arrays for {bad}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"config": config.model_dump(mode="json"), **extra}, indent=2))
    np.savez(path / STATE_FILE, **state)  # type: ignore[arg-type]  # stub: **kwds may hit allow_pickle
    return path


def load_config_and_state(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What :func:`save_config_and_state` wrote: the ``config.json`` document and the arrays (no pickle)."""
    path = Path(path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    with np.load(path / STATE_FILE, allow_pickle=False) as npz:
        return meta, {k: npz[k] for k in npz.files}


def api_major(version: str) -> int:
    """Major part of an ``api_version`` string such as ``"1.0"``."""
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise ValueError(f"api_version {version!r} is not MAJOR.MINOR") from exc


#: The optional second input of a ``to_torch()`` module that reads user attributes: ``float32 [B, f]``
#: one-hot columns named by the module's ``user_feature_names`` (as :class:`fuserec.features.AttributeEncoder`
#: names them). A zero row is an unknown user, which must score as the history-only path does.
USER_FEATURES = "user_features"


def user_feature_names(module: object) -> tuple[str, ...]:
    """The attribute columns a ``to_torch()`` module reads as ``forward(history, user_features)``.

    Empty for the modules that read the history only (most of them): they are called ``forward(history)``.
    """
    return tuple(str(n) for n in (getattr(module, "user_feature_names", None) or ()))


def multi_hot(history: torch.Tensor, n_items: int) -> torch.Tensor:
    """``float32 [B, n_items]`` with 1 where an item is in the padded history; -1 padding is ignored.

    For use inside ``to_torch()`` modules; written with scatter so it exports to ONNX.
    """
    import torch

    idx = torch.where(history >= 0, history, torch.full_like(history, n_items))
    hot = torch.zeros(history.shape[0], n_items + 1, dtype=torch.float32, device=history.device)
    hot = hot.scatter(1, idx, torch.ones_like(idx, dtype=torch.float32))
    return hot[:, :n_items]


def hot_matmul(hot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``hot @ weights`` for a mostly-zero ``hot [B, n]`` (multi-hot histories), reading only the rows of
    ``weights [n, d]`` whose column some row of ``hot`` uses.

    A served batch holds a few hundred distinct items, so it reads a fraction of a large item-by-item
    matrix: one history reads its own rows, not the catalogue's. The dense product reads every row for every
    batch, which for a one-history request is most of its cost (memory-bound). Same terms, same result up to
    float rounding; for use inside ``to_torch()`` modules (exports to ONNX as NonZero, Gather, MatMul).
    """
    import torch

    used = torch.nonzero(hot.abs().amax(dim=0) > 0).reshape(-1)  # [U]: columns some row uses
    return hot.index_select(1, used) @ weights.index_select(0, used)


__all__ = [
    "API_VERSION",
    "PAD",
    "SUPPORTED_API_MAJORS",
    "Algorithm",
    "AlgorithmConfig",
    "Choice",
    "FloatRange",
    "Histories",
    "IntRange",
    "SearchDim",
    "api_major",
    "coerce_config",
    "hot_matmul",
    "load_config_and_state",
    "multi_hot",
    "save_config_and_state",
]
