"""The fuser contract (API v1): combine fitted algorithms into one model that still scores histories.

A fuser learns on the validation carve only: its components are fitted on train', it sees their scores
for validation users and the validation truth. It is then *bound* to the same components refitted on the
full train and applied to test. The combination itself is written once, in torch (:meth:`Fuser.combine`),
so Python scoring and the exported ONNX graph run the same arithmetic: the fused graph is every
component's ``to_torch()`` module plus ``combine``, one file, histories in.

Fusers are plugins in the entry-point group ``fuserec.fusers``, found by the same registry as algorithms.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict

from fuserec.api import API_VERSION, Algorithm, SearchDim, coerce_config, multi_hot, user_feature_names
from fuserec.histories import Histories

if TYPE_CHECKING:
    import pandas as pd

    from fuserec.data.dataset import Dataset

CONFIG_FILE = "config.json"
STATE_FILE = "state.npz"

#: ``combine`` of a fuser whose ``uses_time`` is True: ``(scores, seen, last_time)``.
TimedCombine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


#: Length of the held-out lists a fuser keeps (:class:`HeldOut`): any metric@k up to it can be read off them.
HELD_OUT_DEPTH = 100


@dataclass(frozen=True)
class HeldOut:
    """A fuser's ranked lists for validation users it was not fitted on: its honest validation estimate.

    Learned fusers that hold users out anyway (stacking's folds, the torch fusers' early stopping) keep
    these, so choosing what to export (:mod:`fuserec.selection`) scores them beside the single models with
    the same metric code, and fits nothing again. Kept in memory by the fit only, never saved.
    """

    users: np.ndarray  # int64 [U]: dataset rows of the held-out users
    top: np.ndarray  # int64 [U, HELD_OUT_DEPTH]: their best items, train' items excluded (-1 past the end)
    method: str  # how they were held out, for the record


class FuserConfig(BaseModel):
    """Base of every fuser's typed config; unknown keys are errors, as for algorithms."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    search_space: ClassVar[dict[str, SearchDim]] = {}

    seed: int = 42


class Fuser(ABC):
    """Combines named components' scores; subclasses implement :meth:`fit_combination` and :meth:`combine`.

    ``combine(scores, seen)`` gets ``float32 [M, B, n_items]`` component scores (in ``names_`` order) and
    the ``bool [B, n_items]`` mask of each history's items, and returns ``(fused [B, n_items],
    contributions [M, B, n_items])`` where contributions sum to ``fused`` (up to a per-user constant that
    cannot change a ranking). Seen items may get any fused score: callers exclude them.
    """

    api_version: ClassVar[str] = API_VERSION
    Config: ClassVar[type[FuserConfig]] = FuserConfig
    #: False for rank-based fusers: their fused scores jump when float noise (onnxruntime vs torch, ~1e-7)
    #: reorders two nearly tied component scores, so ONNX parity is checked on the top-k, not on scores.
    exact_scores: ClassVar[bool] = True
    #: True for fusers whose features read time (e.g. an item's age when the user last acted): their
    #: ``combine`` takes a third argument, ``last_time int64 [B]`` (unix seconds of each user's latest
    #: event), and the exported graph gains the input ``last_time``.
    uses_time: ClassVar[bool] = False

    def __init__(self, config: FuserConfig | dict[str, Any] | None = None) -> None:
        self.config = coerce_config(self.Config, config)
        self.names_: list[str] | None = None
        self.n_items_: int | None = None
        self.components_: dict[str, Algorithm] = {}
        #: Set by :meth:`fit` in fusers that score validation users they held out (:class:`HeldOut`).
        self.held_out_: HeldOut | None = None

    # -- learning on validation ---------------------------------------------------------------------
    def fit(self, components: Mapping[str, Algorithm], data: Dataset, truth: pd.DataFrame) -> Self:
        """Learn from ``components`` fitted on ``data`` (train') and the held-out ``truth`` (validation)."""
        if not components:
            raise ValueError(f"{type(self).__name__} needs at least one fitted component to fuse")
        self.names_ = sorted(components)
        self.n_items_ = data.n_items
        self.components_ = {name: components[name] for name in self.names_}
        self.fit_combination(data, truth)
        return self

    @abstractmethod
    def fit_combination(self, data: Dataset, truth: pd.DataFrame) -> None:
        """Set the combination's parameters; ``self.components_`` are fitted on ``data``."""

    @property
    def served_alone(self) -> str | None:
        """The component served alone instead of the combination, if the fuser fell back to one.

        Learned fusers that lose to their best component on held-out validation users set ``fallback_`` to
        its index (gating, stacking, features); the fuse stage's manifest and the report say so, so a
        "fuser" row that is really one model is never read as a fusion result.
        """
        index = getattr(self, "fallback_", -1)
        return self._check_fitted_names()[index] if index >= 0 else None

    def observe(self, data: Dataset) -> None:  # noqa: B027 - optional hook
        """Refresh what the combination reads from data (item popularity, first-seen times) from ``data``.

        Called with the full training data once the combination is learned, so test-time features
        describe the data the bound components were fitted on, as validation features described train'.
        """

    def history_time(self, histories: Histories) -> np.ndarray:
        """``int64 [B]``: each history's latest timestamp (fusers with ``uses_time`` override the default)."""
        if histories.timestamps is None:
            return np.zeros(len(histories), dtype=np.int64)
        last = np.zeros(len(histories), dtype=np.int64)
        has = histories.lengths > 0
        last[has] = np.maximum.reduceat(histories.timestamps, histories.indptr[:-1][has])
        return last

    def bind(self, components: Mapping[str, Algorithm], data: Dataset | None = None) -> Self:
        """Use ``components`` (the same plugins refitted on full train, ``data``) from now on."""
        names = self._check_fitted_names()
        missing = [n for n in names if n not in components]
        if missing:
            raise ValueError(
                f"{type(self).__name__} was fitted on {names} but {missing} are not among the given "
                f"components {sorted(components)}; train them (train.algorithms) or refit the fuser"
            )
        self.components_ = {name: components[name] for name in names}
        if data is not None:
            self.observe(data)
        return self

    # -- the combination ----------------------------------------------------------------------------
    @abstractmethod
    def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fused [B, n], contributions [M, B, n])`` from ``scores [M, B, n]`` and ``seen [B, n]``."""

    def component_scores(self, histories: Histories) -> torch.Tensor:
        """``float32 [M, B, n_items]``: each bound component's ``score`` in ``names_`` order."""
        names = self._check_fitted_names()
        if not self.components_:
            raise RuntimeError(f"{type(self).__name__} has no components: call fit(...) or bind(...) first")
        # Filled in place: stacking a list of M score arrays would hold them twice (10 GB at 10k users x
        # 12 components x 10k items).
        out = np.empty((len(names), len(histories), histories.n_items), dtype=np.float32)
        for i, name in enumerate(names):
            out[i] = self.components_[name].score(histories)
        return torch.from_numpy(out)

    def score(self, histories: Histories) -> np.ndarray:
        fused, _ = self._combined(histories)
        return fused.numpy().astype(np.float32)

    def score_with_contributions(self, histories: Histories) -> tuple[np.ndarray, np.ndarray]:
        """Fused scores ``[B, n]`` and each component's contribution ``[M, B, n]``."""
        fused, parts = self._combined(histories)
        return fused.numpy().astype(np.float32), parts.numpy().astype(np.float32)

    def _combined(self, histories: Histories) -> tuple[torch.Tensor, torch.Tensor]:
        seen = torch.from_numpy(histories.to_csr().toarray() > 0)
        with torch.no_grad():
            scores = self.component_scores(histories)
            if self.uses_time:
                timed = cast(TimedCombine, self.combine)
                return timed(scores, seen, torch.from_numpy(self.history_time(histories)))
            return self.combine(scores, seen)

    def to_torch(self) -> torch.nn.Module:
        """Every component's exported scorer plus :meth:`combine`: one module, histories in."""
        names = self._check_fitted_names()
        return FusedModule(self, [self.components_[n].to_torch() for n in names], self._check_fitted())

    # -- persistence (no pickle) --------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """Fitted arrays of the combination (numeric); the component names are saved by :meth:`save`."""
        return {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook, no state by default
        """Restore what :meth:`get_state` returned."""

    def _check_fitted_names(self) -> list[str]:
        if self.names_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(components, data, truth)")
        return self.names_

    def _check_fitted(self) -> int:
        self._check_fitted_names()
        assert self.n_items_ is not None
        return self.n_items_

    def save(self, path: str | Path) -> Path:
        """``config.json`` (config, component names, catalog size) and ``state.npz``; not the components."""
        names = self._check_fitted_names()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config.model_dump(mode="json"), "components": names, "n_items": self.n_items_}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        np.savez(path / STATE_FILE, **self.get_state())  # type: ignore[arg-type]  # stub: **kwds may hit allow_pickle
        return path

    @classmethod
    def load(cls, path: str | Path, components: Mapping[str, Algorithm] | None = None) -> Self:
        path = Path(path)
        meta = json.loads((path / CONFIG_FILE).read_text())
        fuser = cls(cls.Config.model_validate(meta["config"]))
        fuser.names_ = list(meta["components"])
        fuser.n_items_ = int(meta["n_items"])
        with np.load(path / STATE_FILE, allow_pickle=False) as npz:
            fuser.set_state({k: npz[k] for k in npz.files})
        return fuser.bind(components) if components is not None else fuser


class SharedScores:
    """A fitted algorithm (or fuser) that keeps its scores of the latest histories it was asked about.

    Evaluation scores each batch of users with every model and then with every fuser, and the fusers
    are bound to these same objects: a component's scores of a batch are computed once, not once more per
    fuser. The batch is recognised by identity, so callers pass one ``Histories`` object per batch to
    everyone. The kept array is read-only, so a caller that edits it in place fails instead of corrupting
    the next reader.
    """

    def __init__(self, algorithm: Algorithm | Fuser) -> None:
        self.algorithm = algorithm
        self._histories: Histories | None = None
        self._scores: np.ndarray | None = None

    def score(self, histories: Histories) -> np.ndarray:
        if self._scores is None or histories is not self._histories:
            self._scores = None  # free the previous batch before scoring the next
            scores = np.asarray(self.algorithm.score(histories))
            scores.flags.writeable = False
            self._histories, self._scores = histories, scores
        return self._scores

    def __getattr__(self, name: str) -> Any:
        return getattr(self.algorithm, name)


class FusedModule(torch.nn.Module):
    """Padded history -> every component's scores -> the fuser's combination (fused scores only).

    Components that read user attributes (``user_feature_names``) get their own columns of the optional
    ``user_features`` input, whose columns are the union of theirs (:attr:`user_feature_names`).
    """

    def __init__(self, fuser: Fuser, scorers: list[torch.nn.Module], n_items: int) -> None:
        super().__init__()
        self.scorers = torch.nn.ModuleList(scorers)
        self.fuser = fuser
        self.n_items = n_items
        names: list[str] = []
        for scorer in scorers:
            names += [n for n in user_feature_names(scorer) if n not in names]
        self.user_feature_names = tuple(names)
        self.reads_features: list[bool] = []
        for i, scorer in enumerate(scorers):
            own = user_feature_names(scorer)
            self.reads_features.append(bool(own))
            columns = torch.tensor([names.index(n) for n in own], dtype=torch.int64)
            self.register_buffer(f"feature_columns_{i}", columns)

    def forward(
        self,
        history: torch.Tensor,
        last_time: torch.Tensor | None = None,
        user_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.contributions(history, last_time, user_features)[0]

    def contributions(
        self,
        history: torch.Tensor,
        last_time: torch.Tensor | None = None,
        user_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = []
        for i, scorer in enumerate(self.scorers):
            if self.reads_features[i] and user_features is not None:
                columns = getattr(self, f"feature_columns_{i}")
                outputs.append(scorer(history, user_features.index_select(1, columns)))
            else:
                outputs.append(scorer(history))
        scores = torch.stack(outputs)
        seen = multi_hot(history, self.n_items) > 0
        if self.fuser.uses_time:
            if last_time is None:
                raise ValueError(f"{type(self.fuser).__name__} reads time: pass last_time int64 [B]")
            return cast(TimedCombine, self.fuser.combine)(scores, seen, last_time)
        return self.fuser.combine(scores, seen)


# -- score normalisation and ranks, shared by fusers (torch, so they export) -----------------------------
def single_component(scores: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine``'s result when a learned fuser falls back to serving component ``index`` alone."""
    keep = torch.zeros(scores.shape[0], 1, 1, dtype=scores.dtype, device=scores.device)
    keep[index] = 1.0
    parts = scores * keep
    return parts.sum(dim=0), parts


USER_CHUNK = 512  # users per slice when a per-user transform runs over a whole validation tensor


def user_slices(n_users: int, chunk: int = USER_CHUNK) -> list[slice]:
    """Consecutive slices of ``chunk`` users covering ``n_users``."""
    return [slice(start, start + chunk) for start in range(0, n_users, chunk)]


def by_users(
    fn: Any,
    scores: torch.Tensor,
    seen: torch.Tensor,
    chunk: int = USER_CHUNK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fn(scores, seen)`` for a per-user transform of ``[M, U, n]``, a slice of users at a time.

    The masked transforms hold several ``[M, U, n]`` temporaries at once, and a fuser's whole validation
    tensor is large (12 x 5,000 x 10,677 floats at the ML-10M shape: 2.6 GB). Sliced, the temporaries are
    ``[M, chunk, n]`` and the result is written into one preallocated tensor, or into ``out``:
    ``out=scores`` transforms in place (each slice is read before it is overwritten).
    """
    out = torch.empty_like(scores) if out is None else out
    for rows in user_slices(scores.shape[1], chunk):
        out[:, rows] = fn(scores[:, rows], seen[rows])
    return out


def masked_minmax(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Per component and user, scores rescaled to [0, 1] over the unseen items (seen items -> 0)."""
    big = torch.finfo(scores.dtype).max
    unseen = ~seen.unsqueeze(0)
    low = torch.where(unseen, scores, torch.full_like(scores, big)).amin(dim=2, keepdim=True)
    high = torch.where(unseen, scores, torch.full_like(scores, -big)).amax(dim=2, keepdim=True)
    span = torch.clamp(high - low, min=1e-12)
    return torch.where(unseen, (scores - low) / span, torch.zeros_like(scores))


def masked_zscore(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Per component and user, scores standardised over the unseen items (seen items -> 0)."""
    unseen = (~seen).unsqueeze(0).to(scores.dtype)
    count = torch.clamp(unseen.sum(dim=2, keepdim=True), min=1.0)
    mean = (scores * unseen).sum(dim=2, keepdim=True) / count
    var = (((scores - mean) * unseen) ** 2).sum(dim=2, keepdim=True) / count
    # clamp, not `var + eps`: the exporter folds a tiny Add away and constant rows became 0/0 = NaN
    return (scores - mean) / torch.sqrt(torch.clamp(var, min=1e-12)) * unseen


def masked_ranks(scores: torch.Tensor, seen: torch.Tensor, depth: int | None = None) -> torch.Tensor:
    """0-based rank of each item among the unseen ones (protocol ties: lower index first); seen -> n.

    Ranks come from a stable descending sort, so equal scores keep index order as in evaluation. With
    ``depth``, only the top ``depth`` are ranked and every other unseen item gets ``depth``: a partial
    TopK in the served graph instead of a full sort per component (the sort was its costliest kernel).
    """
    n = scores.shape[-1]
    keep = n if depth is None else min(depth, n)
    low = torch.finfo(scores.dtype).min
    # A [1, B, n] bound taken elementwise (Min, Max) rather than Where over [M, B, n]: the same values for
    # finite scores (the plugin contract), and in onnxruntime a broadcast Min is several times cheaper.
    masked = torch.minimum(scores, torch.where(seen.unsqueeze(0), low, torch.inf))
    if torch.onnx.is_in_onnx_export():
        # ONNX has no stable sort, but onnxruntime's TopK puts equal values in index order: the same order.
        order = torch.topk(masked, keep, dim=2, largest=True, sorted=True).indices
    elif keep < n:
        order = top_in_protocol_order(masked, keep)
    else:
        order = torch.sort(masked, dim=2, descending=True, stable=True).indices
    positions = torch.arange(keep, dtype=torch.float32, device=scores.device).expand_as(order).contiguous()
    ranks = torch.full_like(masked, float(keep)).scatter(2, order, positions)
    return torch.maximum(ranks, seen.unsqueeze(0).to(ranks.dtype) * float(n))  # seen -> n (ranks <= n)


def top_in_protocol_order(masked: torch.Tensor, keep: int) -> torch.Tensor:
    """The first ``keep`` of a stable descending sort along the last axis, without sorting every item.

    ``topk`` finds each row's ``keep``-th value in O(n); only
    where more items share that value than fit are the lowest-indexed of them chosen, as the stable sort
    would. The chosen ``keep`` are then ordered by value, ties by index.
    """
    values, order = torch.topk(masked, keep, dim=-1, largest=True, sorted=False)
    threshold = values.amin(dim=-1, keepdim=True)
    tied = masked == threshold
    if bool((torch.count_nonzero(tied, dim=-1) > torch.count_nonzero(values == threshold, dim=-1)).any()):
        # Tied items beyond the cut: all those above the threshold and the lowest-indexed tied ones.
        need = keep - (masked > threshold).sum(dim=-1, keepdim=True)
        chosen = (masked > threshold) | (tied & (torch.cumsum(tied, dim=-1) <= need))
        order = torch.topk(chosen.to(torch.float32), keep, dim=-1, sorted=False).indices  # keep per row
    order = torch.sort(order, dim=-1).values  # index order, so the stable sort below breaks ties by it
    by_value = torch.sort(torch.gather(masked, -1, order), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, by_value)


# -- what learned fusers fit on -------------------------------------------------------------------------
COLD_COPIES_HELP = (
    "simulated cold users to learn from beside the real ones, as a share of validation users: warm users "
    "cut to their latest 1-5 items, each copied at most once (fuserec.fusion.ValidationScores)"
)


class ValidationScores:
    """Component scores of validation users, their seen-items mask and truth: what fusers learn from.

    Built once per fuser fit (``[M, U, n_items]`` floats; ``max_users`` bounds U on large data), so a
    search over combinations costs only the combination and a top-k per trial.

    ``cold_copies`` adds simulated cold users, as a share of the validation users: warm users (more than
    :data:`~fuserec.segments.COLD_USER_MAX` training positives) whose history is cut to their latest 1-5
    items, with the same validation truth. Real cold users are few (6 test and 25 validation users on
    ML-100k), too few to learn how the components' reliability changes with history length; every
    component scores from the history alone, so a cut history is what it would see of a new user. Rows
    past the real users are those copies: ``origin`` names the real row each row copies (early stopping
    and folds must keep a user and its copies together), ``seen`` is the history the fuser sees and
    ``exclude`` the user's full train' items, which no ranking may put forward (as for real users).
    ``max_users`` bounds real users and copies together.
    """

    def __init__(
        self,
        fuser: Fuser,
        data: Dataset,
        truth: pd.DataFrame,
        max_users: int | None = None,
        seed: int = 0,
        cold_copies: float = 0.0,
    ) -> None:
        from fuserec.data.dataset import interactions_matrix
        from fuserec.segments import COLD_USER_MAX

        rng = np.random.default_rng(seed)
        users = np.unique(truth["user"].to_numpy())
        everyone = data.histories()
        n_copies = round(cold_copies * len(users))
        if max_users is not None and len(users) + n_copies > max_users:
            n_copies = round(cold_copies * max_users / (1.0 + cold_copies))
            users = np.sort(rng.choice(users, max_users - n_copies, replace=False))
        real = everyone.select(users)
        warm = np.flatnonzero(real.lengths > COLD_USER_MAX)
        pick = np.sort(rng.choice(warm, min(n_copies, len(warm)), replace=False))
        copies = real.select(pick).latest(rng.integers(1, COLD_USER_MAX + 1, len(pick)))
        self.n_real = len(users)
        self.origin = np.concatenate([np.arange(len(users)), pick]).astype(np.int64)
        self.users = users[self.origin]
        self.histories = Histories.concat([real, copies]) if len(pick) else real
        self.scores = fuser.component_scores(self.histories)
        self.seen = torch.from_numpy(self.histories.to_csr().toarray() > 0)
        self.exclude = self.seen if not len(pick) else torch.cat([self.seen[: len(users)], self.seen[pick]])
        full = real.to_csr()
        self.exclude_csr = sp.vstack([full, full[pick]], format="csr") if len(pick) else full
        self.truth = interactions_matrix(truth, data.n_users, data.n_items)[self.users]
        self.popularity = data.item_popularity()

    @property
    def simulated(self) -> np.ndarray:
        """``bool [U]``: which rows are simulated cold copies."""
        return np.arange(len(self.users)) >= self.n_real

    def top_k(
        self, fused: torch.Tensor | np.ndarray, k: int = 10, rows: np.ndarray | None = None
    ) -> np.ndarray:
        """``int64 [U, k]``: each user's best items by ``fused [U, n]``, ``exclude``'s items excluded.

        ``rows`` says which of the validation users ``fused`` holds (all of them by default).
        """
        from fuserec.metrics import top_k

        values = fused.numpy() if isinstance(fused, torch.Tensor) else fused
        seen = self.exclude_csr if rows is None else self.exclude_csr[rows]
        return top_k(np.asarray(values, dtype=np.float32), k, exclude=seen)

    def ndcg(self, fused: torch.Tensor | np.ndarray, k: int = 10, rows: np.ndarray | None = None) -> float:
        """Mean NDCG@k of ``fused [U, n]`` scores, ``exclude``'s items excluded (the protocol's ranking).

        ``rows`` says which of the validation users ``fused`` holds (all of them by default).
        """
        from fuserec.metrics import ndcg_at_k

        truth = self.truth if rows is None else self.truth[rows]
        return float(np.nanmean(ndcg_at_k(self.top_k(fused, k, rows), truth, k)))

    def held_out(self, parts: list[tuple[np.ndarray, np.ndarray]], method: str) -> HeldOut | None:
        """:class:`HeldOut` lists from ``(rows, their top lists)`` pairs, e.g. one per fold; None if empty.

        Only real users count: a simulated cold copy is a training device, not a user to judge by.
        """
        parts = [(rows, top) for rows, top in parts if len(rows)]
        if not parts:
            return None
        rows = np.concatenate([r for r, _ in parts])
        top = np.concatenate([t for _, t in parts])
        real = ~self.simulated[rows]
        return HeldOut(self.users[rows[real]].astype(np.int64), top[real], method)
