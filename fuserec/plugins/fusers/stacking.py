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

Serving cost grows with every fused component, so components the trees barely read (under a quarter, then
half, then all of ``prune_share`` of the split gain) are dropped and the ranker relearned, as far as
out-of-fold NDCG@10 stays within ``prune_tolerance`` of the full ranker's. Each distinct candidate is one
row for the trees, however many components chose it.
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
    #: Measured on ML-100k: 1 bag instead of 5 gave the same test NDCG@10 within noise (0.1735-0.1753 vs
    #: 0.1738-0.1757) and ~5% more served requests/s; on the synthetic default 0.2065 vs 0.2094 (one run).
    bags: int = Field(
        5,
        ge=1,
        description="boosters averaged in the final fit, each with its own bagging seed (the folds' probes "
        "stay single): less variance from a small validation set, at bags x the trees in every served "
        "request and bags x the final fit's time",
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
        0.01,
        ge=0.0,
        lt=1.0,
        description="drop components under this share of split gain, tried at 1/4, 1/2, then all of it, "
        "as far as prune_tolerance allows (0 = keep all)",
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
        """``(x [R, F], flat [R], best rank [B, n])``: one row per distinct candidate of each user.

        A candidate is an item some component ranks in its top ``candidates`` unseen items; ``flat`` is
        ``user * n + item``, ascending (by user, then item). Each item is scored once however many
        components chose it: the rows, not the union's repeats, are what the trees cost when served.
        """
        m, b, n = scores.shape
        top_n = min(self.config.candidates, n)
        tables = self._tensors(scores.device)
        z = masked_zscore(scores, seen)
        ranks = masked_ranks(scores, seen, max(self.config.rank_depth, top_n))
        best_rank = ranks.amin(dim=0)  # [B, n]
        flat = torch.nonzero((best_rank < top_n).reshape(-1)).reshape(-1)  # [R]
        user = torch.div(flat, n, rounding_mode="floor")
        item = flat - user * n
        zc = z.reshape(m, b * n).index_select(1, flat).t()  # [R, M]
        rc = ranks.reshape(m, b * n).index_select(1, flat).t()
        log_rank = torch.log1p(rc)
        agreement = (rc < top_n).to(torch.float32).sum(dim=1, keepdim=True)

        t_user = last_time.to(torch.int64).reshape(b, 1)  # [B, 1]
        edges = tables["edges"].unsqueeze(0)
        n_edges = tables["edges"].shape[0]
        then = torch.clamp((t_user >= edges).to(torch.int64).sum(dim=1) - 1, min=0)  # [B]
        before = t_user - int(self.config.recent_days * DAY)
        recent = torch.clamp((before >= edges).to(torch.int64).sum(dim=1) - 1, min=0)
        cumulative = tables["cumulative"].reshape(-1)  # [n * E]: row = item, column = time edge
        pop_then = cumulative.index_select(0, item * n_edges + then.index_select(0, user))  # [R]
        pop_recent = pop_then - cumulative.index_select(0, item * n_edges + recent.index_select(0, user))
        first = tables["first_seen"].index_select(0, item)
        t = t_user.reshape(b).index_select(0, user)
        age = torch.where(first <= t, (t - torch.clamp(first, max=t)).to(torch.float32) / DAY, -1.0)

        hot = seen.to(torch.float32)
        length = hot.sum(dim=1, keepdim=True)  # [B, 1]
        log_pop = tables["log_popularity"]
        content = tables["content"]
        profile = hot @ content
        profile = profile / torch.clamp(torch.linalg.vector_norm(profile, dim=1, keepdim=True), min=1e-12)
        # one matmul, then the candidates' entries: a per-row dot product sums in another order than the
        # exported graph's MatMul, and a 1-ulp difference beside a split threshold moves a tree's leaf
        cosine = (profile @ content.t()).reshape(-1).index_select(0, flat)
        history_pop = (hot @ log_pop.unsqueeze(1)) / torch.clamp(length, min=1.0)  # [B, 1]

        context = [
            agreement,
            log_rank.mean(dim=1, keepdim=True),
            log_rank.amin(dim=1, keepdim=True),
            zc.mean(dim=1, keepdim=True),
            zc.std(dim=1, keepdim=True, correction=0),
            log_pop.index_select(0, item).unsqueeze(1),
            torch.log1p(pop_then).unsqueeze(1),
            torch.log1p(pop_recent).unsqueeze(1),
            age.unsqueeze(1),
            tables["year"].index_select(0, item).unsqueeze(1),
            cosine.unsqueeze(1),
            torch.log1p(length).index_select(0, user),
            history_pop.index_select(0, user),
        ]
        x = torch.cat([zc, log_rank, *context], dim=1)
        return x, flat, best_rank

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
        # Components the trees barely read still cost their full scoring in every served request. Drop
        # those under a quarter of prune_share of the split gain and relearn; while out-of-fold NDCG stays
        # within prune_tolerance of the full ranker's, go on to half the share, then the whole share.
        shares = self.component_shares()
        full, refused = self.cv_ndcg_, np.nan
        accepted = (list(self._check_fitted_names()), self.get_state(), self.held_out_)
        for share in (cfg.prune_share / 4, cfg.prune_share / 2, cfg.prune_share):
            names = self._check_fitted_names()
            keep = [i for i, name in enumerate(names) if shares[name] >= share]
            keep = keep or [int(np.argmax([shares[n] for n in names]))]
            if len(keep) == len(names):
                continue
            self.names_ = [names[i] for i in keep]
            for j, i in enumerate(keep):  # compacted in place (keep is ascending): no second [M, U, n] copy
                val.scores[j] = val.scores[i]
            val.scores = val.scores[: len(keep)]
            self._learn(val, last)
            if self.fallback_ >= 0 or self.cv_ndcg_ < full - cfg.prune_tolerance:
                refused = self.cv_ndcg_  # kept for the record: why pruning went no further
                break
            accepted = (list(self.names_), self.get_state(), self.held_out_)
        self.names_, state, self.held_out_ = accepted
        self.set_state(state)
        self.pruned_ = [n for n in shares if n not in self.names_]
        if self.pruned_:
            self.cv_unpruned_, self.cv_pruned_ = full, self.cv_ndcg_
        else:
            self.cv_pruned_ = refused

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
                x, flat, _ = self.candidate_features(val.scores[:, chunk], val.seen[chunk], last[chunk])
                n = val.scores.shape[2]
                user, item = np.divmod(flat.numpy(), n)
                # a simulated cold user's cut items are not candidates either
                keep = ~val.exclude[chunk].numpy()[user, item]
                bounds = np.searchsorted(user, np.arange(chunk.stop - chunk.start + 1))
                for j, u in enumerate(range(chunk.start, chunk.stop)):
                    own = slice(bounds[j], bounds[j + 1])
                    mine = keep[own]
                    rows.append(x[own].numpy()[mine])
                    labels.append(val.truth[u].toarray().ravel()[item[own][mine]])
                    groups.append(int(mine.sum()))
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
        x, flat, best_rank = self.candidate_features(scores, seen, last_time)
        rows = torch.nan_to_num(x, nan=0.0)  # inf is clamped: the selector needs finite x
        summed = self._ensemble()(rows)  # [R, 1 + M]: the ranker's output, then each component's share
        base = float(base_value(self.trees_)) / m
        candidate = best_rank < min(self.config.candidates, n)
        ranked = torch.zeros(b * n, dtype=torch.float32).scatter(0, flat, summed[:, 0].to(torch.float32))
        ranked = ranked.reshape(b, n)
        # below every candidate, ordered by the best component rank (and on the candidates' scale, so a
        # re-ranker that min-max scales a pool is not squashed by a far-away floor)
        lowest = torch.where(candidate, ranked, torch.full_like(ranked, torch.inf)).amin(dim=1, keepdim=True)
        floor = torch.where(torch.isinf(lowest), torch.zeros_like(lowest), lowest) - 1.0
        fallback = floor - best_rank / float(n)
        fused = torch.where(candidate, ranked, fallback)
        parts = (fallback / m).unsqueeze(0).expand(m, b, n).reshape(m, b * n)
        slot_parts = (summed[:, 1:] + base).t()  # [M, R]
        parts = parts.scatter(1, flat.unsqueeze(0).expand(m, flat.shape[0]), slot_parts).reshape(m, b, n)
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


def _chunks(total: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _truncate(booster: Any, rounds: int) -> Any:
    """A booster holding only the first ``rounds`` trees (early stopping's choice)."""
    import lightgbm as lgb

    return lgb.Booster(model_str=booster.model_to_string(num_iteration=rounds))
