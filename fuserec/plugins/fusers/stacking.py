"""Stacking: a learned ranker over the components' scores and ranks plus context, trained on validation.

docs/protocol.md's anchors teach it: a ranker that reads the models' scores alone does not beat a tuned linear
model (EASE); one that also reads context (how old the item was when the user last acted, its popularity
then and overall, the history's length, content similarity, agreement between the models) clearly does.
So every candidate (the union of each component's top-N unseen items) gets:

- per component: its per-user z-scored score and log rank;
- agreement: how many components put it in their top-N, mean and min log rank, mean and spread of z;
- item context: log popularity; positives before the user's latest event and in the ``recent_days`` before
  it; days since its first positive (-1 when it had none yet); release year; content cosine to the history;
- user context: log history length, mean log popularity of the history.

Time features read only interactions dated before the user's latest event (docs/protocol.md "no look-ahead"):
a time-bucketed cumulative count table, and first-seen times compared with that event's time.

The ranker is LightGBM's lambdarank, trained on the validation carve (components fitted on train'); a
held-out share of validation users picks the number of rounds, then it is refitted on all of them. Its
trees are one torch op that exports to onnxruntime's native tree ensemble (:mod:`fuserec.trees`), so the
served model is still one ONNX graph: histories and each user's latest event time in, top-k and each
component's contribution out. Items outside the candidates rank below every candidate, by their best
component rank.

Serving cost grows with every fused component, so components the trees barely read (under ``prune_share``
of the split gain) are dropped and the ranker relearned, when out-of-fold NDCG@10 loses at most
``prune_tolerance``. The neighbourhood models are typically the ones dropped, and with them the graph's
largest matmuls; a higher share would also drop components the trees do use, and the tolerance refuses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import FloatRange, IntRange, SearchDim
from fuserec.fusion import (
    COLD_COPIES_HELP,
    HELD_OUT_DEPTH,
    Fuser,
    FuserConfig,
    ValidationScores,
    masked_ranks,
    masked_zscore,
    single_component,
)
from fuserec.histories import Histories
from fuserec.trees import TreeEnsemble, average_arrays, base_value, booster_arrays

if TYPE_CHECKING:
    import pandas as pd

    from fuserec.data.dataset import Dataset

DAY = 86_400
NEVER = 2**62  # first-seen time of an item with no positive yet
TREE_KEYS = ("feature", "threshold", "left", "right", "value", "is_leaf", "depth")
TABLE_KEYS = ("log_popularity", "first_seen", "year", "cumulative", "edges", "content")
CONTEXT_FEATURES = (
    "agreement",
    "mean_log_rank",
    "min_log_rank",
    "mean_z",
    "std_z",
    "log_popularity",
    "log_popularity_then",
    "log_recent_popularity",
    "age_days",
    "year",
    "content_cosine",
    "log_history_length",
    "history_mean_log_popularity",
)


class StackingConfig(FuserConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "candidates": IntRange(20, 100),
        "learning_rate": FloatRange(0.01, 0.2, log=True),
        "num_leaves": IntRange(7, 63, log=True),
        "min_child_samples": IntRange(5, 100, log=True),
    }

    candidates: int = Field(30, ge=1, description="each component's top-N unseen items form the candidates")
    n_estimators: int = Field(600, ge=1, description="most boosting rounds; early stopping picks fewer")
    learning_rate: float = Field(0.02, gt=0.0, le=1.0)
    num_leaves: int = Field(15, ge=2)
    max_depth: int = Field(8, ge=1, description="deepest tree (LightGBM's max_depth)")
    rank_depth: int = Field(
        100, ge=1, description="ranks past this depth read as this depth (a partial sort when served)"
    )
    min_child_samples: int = Field(50, ge=1)
    feature_fraction: float = Field(0.8, gt=0.0, le=1.0)
    bagging_fraction: float = Field(0.8, gt=0.0, le=1.0)
    folds: int = Field(5, ge=2, description="folds over validation users: pick the rounds, estimate NDCG")
    early_stopping: int = Field(40, ge=1, description="rounds without held-out NDCG@10 gain before stopping")
    bags: int = Field(
        5,
        ge=1,
        description="boosters averaged in the final fit, each with its own bagging seed (the folds' probes "
        "stay single): less variance from a small validation set, at bags x the final fit's time",
    )
    recent_days: float = Field(30.0, gt=0.0, description="window of the recent-popularity feature")
    max_time_buckets: int = Field(1024, ge=1, description="resolution of the popularity-over-time table")
    content_dims: int = Field(64, ge=1, description="content vectors are reduced to this many dimensions")
    #: 1.0 was chosen on validation users held out from the fit (docs/concepts/fusion.md): the most NDCG@10
    #: on warm users cut to 1-5 items, with no loss on real histories.
    cold_copies: float = Field(1.0, ge=0.0, le=1.0, description=COLD_COPIES_HELP)
    max_users: int | None = Field(
        10_000,
        ge=1,
        description="validation users to learn from (None = all): their [components, users, items] "
        "scores are held at once (5 GB at ML-10M size); 10,000 users give the ranker ~10^6 candidate rows",
    )
    batch_users: int = Field(64, ge=1, description="users scored per chunk (bounds memory of the tree walk)")
    threads: int = Field(2, ge=1, description="LightGBM threads")
    fallback: bool = Field(
        True, description="serve the best component alone when the ranker does not beat it out of fold"
    )
    prune_share: float = Field(
        0.01, ge=0.0, lt=1.0, description="drop components under this share of split gain (0 = keep all)"
    )
    prune_tolerance: float = Field(
        0.002, ge=0.0, description="largest out-of-fold NDCG@10 loss accepted for pruning"
    )


class Stacking(Fuser):
    """LightGBM lambdarank over per-candidate scores, ranks and context; see the module docstring."""

    Config = StackingConfig
    config: StackingConfig
    _trees: TreeEnsemble | None  # built lazily from the fitted state
    uses_time = True
    #: Rank features and candidate membership are discontinuous in the component scores: where a component
    #: ties many items (popularity counts), onnxruntime may order the tie differently from torch's stable
    #: sort, moving a non-candidate's fallback score. So export parity is held on the top-k, as for voting.
    exact_scores = False

    # -- data-derived tables ------------------------------------------------------------------------
    def observe(self, data: Dataset) -> None:
        """Item statistics and content from ``data`` (train' while learning, full train afterwards)."""
        from fuserec.features import item_content_vectors, svd_reduce

        cfg = self.config
        frame = data.interactions
        items, ts = frame["item"].to_numpy(), frame["timestamp"].to_numpy(np.int64)
        n = data.n_items
        pop = np.bincount(items, minlength=n).astype(np.float64)
        first = np.full(n, NEVER, dtype=np.int64)
        np.minimum.at(first, items, ts)
        lo, hi = (int(ts.min()), int(ts.max())) if len(ts) else (0, 0)
        width = max(DAY, -(-(hi - lo + 1) // cfg.max_time_buckets))
        n_edges = (hi - lo) // width + 2
        edges = lo + width * np.arange(n_edges, dtype=np.int64)
        counts = np.zeros((n, n_edges), dtype=np.float64)
        np.add.at(counts, (items, (ts - lo) // width + 1), 1.0)
        year = data.items.get("year")
        self.tables_ = {
            "log_popularity": np.log1p(pop).astype(np.float32),
            "first_seen": first,
            "year": np.zeros(n, np.float32) if year is None else year.fillna(0).to_numpy(np.float32),
            "cumulative": np.cumsum(counts, axis=1).astype(np.float32),  # [:, j]: positives before edges[j]
            "edges": edges,
            "content": svd_reduce(item_content_vectors(data.items), cfg.content_dims),
        }
        self.reference_time_ = hi

    def history_time(self, histories: Histories) -> np.ndarray:
        """Each history's latest event time; the data's latest time where a history has none."""
        last = super().history_time(histories)
        empty = histories.lengths == 0 if histories.timestamps is not None else np.ones(len(last), bool)
        last[empty] = self.reference_time_
        return last

    # -- features -----------------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        names = self._check_fitted_names()
        return [f"z:{n}" for n in names] + [f"log_rank:{n}" for n in names] + list(CONTEXT_FEATURES)

    def candidate_features(
        self, scores: torch.Tensor, seen: torch.Tensor, last_time: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x [B, C, F], candidate items [B, C], best rank [B, n])``; C = M x candidates (with repeats)."""
        m, b, n = scores.shape
        top_n = min(self.config.candidates, n)
        tables = self._tensors(scores.device)
        z = masked_zscore(scores, seen)
        ranks = masked_ranks(scores, seen, max(self.config.rank_depth, top_n))
        idx = torch.topk(-ranks, top_n, dim=2).indices.permute(1, 0, 2).reshape(b, m * top_n)
        gather_idx = idx.unsqueeze(0).expand(m, b, m * top_n)
        zc = torch.gather(z, 2, gather_idx).permute(1, 2, 0)  # [B, C, M]
        rc = torch.gather(ranks, 2, gather_idx).permute(1, 2, 0)
        log_rank = torch.log1p(rc)
        agreement = (rc < top_n).to(torch.float32).sum(dim=2, keepdim=True)

        t = last_time.to(torch.int64).unsqueeze(1)  # [B, 1]
        edges = tables["edges"].unsqueeze(0)
        then = torch.clamp((t >= edges).to(torch.int64).sum(dim=1) - 1, min=0)
        before = t - int(self.config.recent_days * DAY)
        recent = torch.clamp((before >= edges).to(torch.int64).sum(dim=1) - 1, min=0)
        cumulative = tables["cumulative"]  # [n, E]
        pop_then = torch.gather(cumulative.index_select(1, then).t(), 1, idx)  # [B, C]
        pop_recent = pop_then - torch.gather(cumulative.index_select(1, recent).t(), 1, idx)
        first = _take(tables["first_seen"], idx)
        age = torch.where(first <= t, (t - torch.clamp(first, max=t)).to(torch.float32) / DAY, -1.0)

        hot = seen.to(torch.float32)
        length = hot.sum(dim=1, keepdim=True)
        log_pop = tables["log_popularity"]
        profile = hot @ tables["content"]
        profile = profile / torch.clamp(torch.linalg.vector_norm(profile, dim=1, keepdim=True), min=1e-12)
        cosine = torch.gather(profile @ tables["content"].t(), 1, idx)
        history_pop = (hot @ log_pop.unsqueeze(1)) / torch.clamp(length, min=1.0)

        c = idx.shape[1]
        context = [
            agreement,
            log_rank.mean(dim=2, keepdim=True),
            log_rank.amin(dim=2, keepdim=True),
            zc.mean(dim=2, keepdim=True),
            zc.std(dim=2, keepdim=True, correction=0),
            _take(log_pop, idx).unsqueeze(2),
            torch.log1p(pop_then).unsqueeze(2),
            torch.log1p(pop_recent).unsqueeze(2),
            age.unsqueeze(2),
            _take(tables["year"], idx).unsqueeze(2),
            cosine.unsqueeze(2),
            torch.log1p(length).expand(b, c).unsqueeze(2),
            history_pop.expand(b, c).unsqueeze(2),
        ]
        x = torch.cat([zc, log_rank, *context], dim=2)
        return x, idx, ranks.amin(dim=0)

    # -- learning -----------------------------------------------------------------------------------
    def fit_combination(self, data: Dataset, truth: pd.DataFrame) -> None:
        cfg = self.config
        self.observe(data)
        val = ValidationScores(self, data, truth, cfg.max_users, cfg.seed, cfg.cold_copies)
        last = torch.from_numpy(self.history_time(val.histories))
        self.pruned_: list[str] = []
        self._learn(val, last)
        if cfg.prune_share <= 0.0 or self.fallback_ >= 0:
            return
        # Components the trees barely read still cost their full scoring in every served request: drop
        # those under prune_share of the split gain and relearn, unless out-of-fold NDCG falls by more than
        # prune_tolerance (then keep everything).
        shares = self.component_shares()
        names = self._check_fitted_names()
        keep = [i for i, name in enumerate(names) if shares[name] >= cfg.prune_share]
        keep = keep or [int(np.argmax([shares[n] for n in names]))]
        if len(keep) == len(names):
            return
        before = (list(names), self.get_state(), self.held_out_)
        full = self.cv_ndcg_
        self.names_ = [names[i] for i in keep]
        for j, i in enumerate(keep):  # compacted in place (keep is ascending): no second [M, U, n] copy
            val.scores[j] = val.scores[i]
        val.scores = val.scores[: len(keep)]
        self._learn(val, last)
        pruned = self.cv_ndcg_
        if self.fallback_ >= 0 or pruned < full - cfg.prune_tolerance:
            self.names_, state, self.held_out_ = before
            self.set_state(state)
            self.cv_pruned_ = pruned  # kept for the record: why pruning was refused
            return
        self.pruned_ = [n for n in before[0] if n not in self.names_]
        self.cv_unpruned_, self.cv_pruned_ = full, pruned

    def component_shares(self) -> dict[str, float]:
        """Each component's share of the trees' split gain (its z-score and log-rank features)."""
        names = self._check_fitted_names()
        gain, m = self.importance_, len(names)
        total = max(float(gain.sum()), 1e-12)
        return {n: float(gain[i] + gain[m + i]) / total for i, n in enumerate(names)}

    def _learn(self, val: ValidationScores, last: torch.Tensor) -> None:
        import lightgbm as lgb

        cfg = self.config
        self.fallback_ = -1
        rows, labels, groups = [], [], []
        with torch.no_grad():
            for chunk in _chunks(len(val.users), cfg.batch_users):
                x, idx, _ = self.candidate_features(val.scores[:, chunk], val.seen[chunk], last[chunk])
                seen = val.exclude[chunk]  # a simulated cold user's cut items are not candidates either
                for j, u in enumerate(range(chunk.start, chunk.stop)):
                    items, first = np.unique(idx[j].numpy(), return_index=True)
                    keep = ~seen[j, items].numpy()
                    rows.append(x[j].numpy()[first[keep]])
                    labels.append(val.truth[u].toarray().ravel()[items[keep]])
                    groups.append(int(keep.sum()))
        # Folds over users: a real user and its simulated cold copies (val.origin) share a fold.
        n_users = val.n_real
        user_fold = np.empty(n_users, dtype=np.int64)
        user_fold[np.random.default_rng(cfg.seed).permutation(n_users)] = np.arange(n_users) % cfg.folds
        fold = user_fold[val.origin]
        real = ~val.simulated  # copies teach; rounds and the out-of-fold estimate are judged on real users

        def dataset(mask: np.ndarray) -> lgb.Dataset | None:
            use = [i for i in np.flatnonzero(mask) if groups[i] and labels[i].any()]
            if not use:
                return None
            return lgb.Dataset(
                np.concatenate([rows[i] for i in use]),
                np.concatenate([labels[i] for i in use]),
                group=[groups[i] for i in use],
                free_raw_data=False,
            )

        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "learning_rate": cfg.learning_rate,
            "num_leaves": cfg.num_leaves,
            "max_depth": cfg.max_depth,
            "min_child_samples": cfg.min_child_samples,
            "feature_fraction": cfg.feature_fraction,
            "bagging_fraction": cfg.bagging_fraction,
            "bagging_freq": 1,
            "seed": cfg.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": cfg.threads,
            "verbose": -1,
        }
        # K-fold over validation users: each fold's early stopping votes for the number of rounds, and the
        # out-of-fold full-ranking NDCG@10 is the honest validation estimate (against the best component).
        best_rounds: list[int] = []
        fused_sum, single_sum, scored = 0.0, np.zeros(len(val.scores)), 0
        held_lists: list[tuple[np.ndarray, np.ndarray]] = []
        for k in range(cfg.folds if n_users >= cfg.folds else 0):
            fit_set, hold_set = dataset(fold != k), dataset((fold == k) & real)
            if fit_set is None or hold_set is None:
                continue
            probe = lgb.train(
                params,
                fit_set,
                num_boost_round=cfg.n_estimators,
                valid_sets=[hold_set],
                callbacks=[lgb.early_stopping(cfg.early_stopping, verbose=False)],
            )
            best_rounds.append(probe.best_iteration or cfg.n_estimators)
            self._set_trees([probe], best_rounds[-1])
            held = np.flatnonzero((fold == k) & real)
            fused = self._score_rows(val, held, last)
            fused_sum += val.ndcg(fused, 10, rows=held) * len(held)
            held_lists.append((held, val.top_k(fused, HELD_OUT_DEPTH, rows=held)))
            for i in range(len(val.scores)):
                single_sum[i] += val.ndcg(val.scores[i, held].numpy(), 10, rows=held) * len(held)
            scored += len(held)
        rounds = int(np.median(best_rounds)) if best_rounds else cfg.n_estimators
        self.held_out_ = val.held_out(held_lists, f"out of fold: the ranker's own {cfg.folds} folds")
        if scored:
            self.cv_ndcg_ = fused_sum / scored
            self.cv_best_single_ = float(single_sum.max() / scored)
        # Never worse than the best component on validation: if the ranker's out-of-fold NDCG does not beat
        # it, serve that component alone (recorded, and visible in metrics as the same numbers).
        if scored and cfg.fallback and self.cv_ndcg_ <= self.cv_best_single_:
            self.fallback_ = int(single_sum.argmax())
        everything = dataset(np.ones(len(groups), dtype=bool))
        assert everything is not None
        bagged = [
            lgb.train({**params, "seed": cfg.seed + b}, everything, num_boost_round=rounds)
            for b in range(cfg.bags)
        ]
        self._set_trees(bagged, rounds)
        self.rounds_ = rounds

    def _set_trees(self, boosters: list[Any], rounds: int) -> None:
        """The ranker: the mean of ``boosters`` (their first ``rounds`` rounds), gain summed over them."""
        n_features = len(self.feature_names)
        self.trees_ = average_arrays([booster_arrays(_truncate(b, rounds), n_features) for b in boosters])
        self._trees = None
        gain = [b.feature_importance(importance_type="gain", iteration=rounds) for b in boosters]
        self.importance_: np.ndarray = np.asarray(np.sum(gain, axis=0, dtype=np.float64))

    def _score_rows(self, val: ValidationScores, rows: np.ndarray, last: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            fused, _ = self.combine(val.scores[:, rows], val.seen[rows], last[rows])
        return fused.numpy()

    # -- the combination ----------------------------------------------------------------------------
    def combine(  # type: ignore[override]
        self, scores: torch.Tensor, seen: torch.Tensor, last_time: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.config.batch_users
        if torch.onnx.is_in_onnx_export() or scores.shape[1] <= step:
            return self._combine(scores, seen, last_time)
        parts = [
            self._combine(scores[:, i : i + step], seen[i : i + step], last_time[i : i + step])
            for i in range(0, scores.shape[1], step)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1)

    def _combine(
        self, scores: torch.Tensor, seen: torch.Tensor, last_time: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m, b, n = scores.shape
        if self.fallback_ >= 0:
            return single_component(scores, self.fallback_)
        x, idx, best_rank = self.candidate_features(scores, seen, last_time)
        c = idx.shape[1]
        rows = torch.nan_to_num(x.reshape(b * c, -1), nan=0.0)  # inf is clamped: the selector needs finite x
        summed = self._ensemble()(rows)  # [B*C, 1 + M]: the ranker's output, then each component's share
        out = summed[:, 0]
        base = float(base_value(self.trees_)) / m
        slot_parts = (summed[:, 1:] + base).reshape(b, c, m).permute(2, 0, 1)
        ranked = out.reshape(b, c).to(torch.float32)
        # below every candidate, ordered by the best component rank (and on the candidates' scale, so a
        # re-ranker that min-max scales a pool is not squashed by a far-away floor)
        floor = ranked.amin(dim=1, keepdim=True) - 1.0
        fallback = floor - best_rank / float(n)
        fused = fallback.scatter(1, idx, ranked)
        parts = (fallback / m).unsqueeze(0).expand(m, b, n).contiguous()
        parts = parts.scatter(2, idx.unsqueeze(0).expand(m, b, c), slot_parts)
        return fused, parts

    def _ensemble(self) -> TreeEnsemble:
        """The trees, each leaf emitting its value and its Saabas attribution per component.

        Every component owns its own z and log-rank features; shared features and the trees' base value
        are split evenly, so contributions add up to the fused score. Derived from ``trees_``, rebuilt
        after every (re)load.
        """
        trees: TreeEnsemble | None = getattr(self, "_trees", None)
        if trees is None:
            names = self._check_fitted_names()
            m, n_features = len(names), len(self.feature_names)
            owner = np.full((n_features, m), 1.0 / m)
            owner[: 2 * m] = np.tile(np.eye(m), (2, 1))
            trees = self._trees = TreeEnsemble(self.trees_, n_features, owner)
        return trees

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(device) for k, v in self.tables_.items()}

    # -- persistence --------------------------------------------------------------------------------
    @property
    def importance(self) -> dict[str, float]:
        """Total split gain per feature: what the ranker read most."""
        return dict(zip(self.feature_names, self.importance_.tolist(), strict=True))

    def get_state(self) -> dict[str, np.ndarray]:
        state = {f"tree_{k}": v for k, v in self.trees_.items()}
        state |= {f"table_{k}": v for k, v in self.tables_.items()}
        extra = {
            "importance": self.importance_,
            "reference_time": np.asarray(self.reference_time_, dtype=np.int64),
            "rounds": np.asarray(self.rounds_, dtype=np.int64),
            "fallback": np.asarray(self.fallback_, dtype=np.int64),
            "cv_ndcg": np.asarray(getattr(self, "cv_ndcg_", np.nan)),
            "cv_best_single": np.asarray(getattr(self, "cv_best_single_", np.nan)),
            "cv_unpruned": np.asarray(getattr(self, "cv_unpruned_", np.nan)),
            "cv_pruned": np.asarray(getattr(self, "cv_pruned_", np.nan)),
        }
        return state | extra

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.trees_ = {k: state[f"tree_{k}"] for k in TREE_KEYS}
        self._trees = None
        self.tables_ = {k: state[f"table_{k}"] for k in TABLE_KEYS}
        self.importance_ = state["importance"]
        self.reference_time_ = int(state["reference_time"])
        self.rounds_ = int(state["rounds"])
        self.fallback_ = int(state["fallback"]) if "fallback" in state else -1
        self.cv_ndcg_ = float(state["cv_ndcg"])
        self.cv_best_single_ = float(state["cv_best_single"])
        self.cv_unpruned_ = float(state.get("cv_unpruned", np.nan))
        self.cv_pruned_ = float(state.get("cv_pruned", np.nan))


def _take(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 1-D table, as a plain Gather (indexing exports to onnxruntime's slow GatherND)."""
    return table.index_select(0, idx.reshape(-1)).reshape(idx.shape)


def _chunks(total: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _truncate(booster: Any, rounds: int) -> Any:
    """A booster holding only the first ``rounds`` trees (early stopping's choice)."""
    import lightgbm as lgb

    return lgb.Booster(model_str=booster.model_to_string(num_iteration=rounds))
