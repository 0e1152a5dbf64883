"""Top-k ranking and ranking metrics under the protocol in ``docs/protocol.md``.

The protocol ranks the whole catalog for every user, excludes the user's own training items, and breaks
score ties by the LOWER item index. Benchmark numbers must reproduce the anchors exactly, and models such
as popularity produce many ties, so tie-breaking here is exact (not "whatever ``argpartition`` picked").

Everything is vectorised over users. Per-user metric functions return float64 arrays (NaN for users with
no relevant item) so that paired significance tests can reuse them; aggregates average over users with
at least one relevant item.

Conventions
-----------
* ``topk`` is an ``[n_users, K]`` int64 array of item indices, best first, padded with ``-1`` when a user
  has fewer than ``K`` eligible items. Padding never counts as a hit or as a recommendation.
* ``truth`` is a ``csr_matrix [n_users, n_items]``; every stored non-zero entry is a relevant item
  (binary relevance, values are ignored; explicit zeros are not relevant).
* Ranks are 1-based: the item in column ``j`` of ``topk`` has rank ``j + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

__all__ = [
    "average_precision_at_k",
    "coverage_at_k",
    "evaluate_rankings",
    "evaluate_scores",
    "hit_rate_at_k",
    "hits_matrix",
    "ndcg_at_k",
    "novelty_at_k",
    "popularity_rank",
    "precision_at_k",
    "recall_at_k",
    "reciprocal_rank_at_k",
    "self_information",
    "top_k",
]

ScoreFn = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T")

# Sort keys used by ``top_k`` (ascending = better). Finite and infinite scores map into
# (-2**63 + 1, 2**63 - 2) exclusive; these two sit above every real score.
_NAN_KEY = np.iinfo(np.int64).max - 1
_EXCLUDED_KEY = np.iinfo(np.int64).max
_LOW63 = np.int64(0x7FFF_FFFF_FFFF_FFFF)

# Metric names computed per user (name -> function of hits, n_relevant, k).
PER_USER_METRICS = ("ndcg", "recall", "precision", "hr", "map", "mrr")


# --------------------------------------------------------------------------------------------- top-k
def _descending_keys(scores: np.ndarray) -> np.ndarray:
    """Integer keys whose ascending order is the protocol's ranking order of ``scores``.

    Why integers: the IEEE-754 bit pattern of a float64, with the low 63 bits flipped for negative
    numbers, is an order-preserving map to int64. That gives an exact total order in which NaN
    ("rank last") and excluded items can be given keys *beyond* ``-inf`` without losing any real
    score, and integer equality makes tie detection exact.
    """
    s = np.array(scores, dtype=np.float64, copy=True)  # our own buffer, reused for the keys
    nan = np.isnan(s)
    s += 0.0  # -0.0 -> +0.0 so the two zeros tie, as they compare equal
    keys = s.view(np.int64)
    keys ^= (keys >> 63) & _LOW63  # flip low bits of negatives only: keys now increase with the score
    np.negative(keys, out=keys)  # ... and decrease: ascending key = descending score
    np.copyto(keys, _NAN_KEY, where=nan)
    return keys


def _excluded_coords(exclude: sp.spmatrix | sp.sparray, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    if exclude.shape != shape:
        raise ValueError(f"exclude has shape {exclude.shape}, scores have shape {shape}")
    ex = sp.csr_matrix(exclude)
    counts = np.diff(ex.indptr)
    rows = np.repeat(np.arange(shape[0], dtype=np.int64), counts)
    keep = ex.data != 0
    return rows[keep], ex.indices[keep].astype(np.int64, copy=False)


def top_k(
    scores: np.ndarray, k: int, exclude: sp.spmatrix | sp.sparray | np.ndarray | None = None
) -> np.ndarray:
    """Indices of each row's ``k`` best items: score descending, ties -> lower item index.

    NaN scores rank after every other score (including ``-inf``) but are still eligible. Items that are
    non-zero in ``exclude`` (same shape as ``scores``: sparse, or a dense boolean mask as the service
    holds per request) are never returned; when a row has fewer than ``k`` eligible items the rest of
    the row is ``-1``. Returns ``[n_users, k]`` int64.

    Why not plain ``argpartition``: it returns an arbitrary subset of the items tied at the k-th
    value. We partition only to find the k-th best key, then take every item strictly better plus the
    lowest-indexed of the tied ones, and finally sort that small set stably (it is in index order).
    Cost is O(n_users * n_items) plus O(n_users * k log k).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_users, n_items], got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_users, n_items = scores.shape
    out = np.full((n_users, k), -1, dtype=np.int64)
    m = min(k, n_items)
    if n_users == 0 or m == 0:
        return out

    keys = _descending_keys(scores)
    if isinstance(exclude, np.ndarray):
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude has shape {exclude.shape}, scores have shape {scores.shape}")
        keys[exclude.astype(bool, copy=False)] = _EXCLUDED_KEY
    elif exclude is not None:
        rows, cols = _excluded_coords(exclude, (n_users, n_items))
        keys[rows, cols] = _EXCLUDED_KEY

    if m < n_items:
        kth = np.partition(keys, m - 1, axis=1)[:, m - 1 : m]  # [n, 1] m-th best key per row
        take = keys < kth
        need = m - take.sum(axis=1)  # how many of the tied-at-kth items each row still needs
        tied = keys == kth
        n_tied = tied.sum(axis=1)
        rows_with_surplus = np.flatnonzero(n_tied > need)
        take |= tied
        if rows_with_surplus.size:
            t = tied[rows_with_surplus]
            # keep the lowest-indexed `need` tied items only
            keep = np.cumsum(t, axis=1, dtype=np.int64) <= need[rows_with_surplus, None]
            take[rows_with_surplus] = (take[rows_with_surplus] & ~t) | (t & keep)
        cand = np.nonzero(take)[1].reshape(n_users, m)  # row-major -> ascending index within a row
    else:
        cand = np.broadcast_to(np.arange(n_items, dtype=np.int64), (n_users, n_items))

    cand_keys = np.take_along_axis(keys, cand, axis=1)
    order = np.argsort(cand_keys, axis=1, kind="stable")  # stable: equal keys stay in index order
    ranked = np.take_along_axis(cand, order, axis=1)
    ranked_keys = np.take_along_axis(cand_keys, order, axis=1)
    out[:, :m] = np.where(ranked_keys == _EXCLUDED_KEY, -1, ranked)
    return out


# ------------------------------------------------------------------------------------ per-user metrics
def _binary_truth(truth: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """Canonical binary CSR (sorted, no duplicates, no explicit zeros) without touching the input."""
    t = sp.csr_matrix(truth, dtype=np.float64, copy=True)
    t.sum_duplicates()
    t.data = (t.data != 0).astype(np.float64)
    t.eliminate_zeros()
    return t


def _n_relevant(truth: sp.csr_matrix) -> np.ndarray:
    return np.diff(truth.indptr).astype(np.int64)


def _check_pair(topk: np.ndarray, truth: sp.spmatrix | sp.sparray) -> np.ndarray:
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D [n_users, K], got shape {topk.shape}")
    if truth.shape[0] != topk.shape[0]:
        raise ValueError(f"topk has {topk.shape[0]} rows but truth has {truth.shape[0]}")
    return topk


def _resolve_k(topk: np.ndarray, k: int | None) -> int:
    if k is None:
        return int(topk.shape[1])
    if not 1 <= k <= topk.shape[1]:
        raise ValueError(f"k={k} must be in [1, {topk.shape[1]}] (number of topk columns)")
    return int(k)


def hits_matrix(topk: np.ndarray, truth: sp.spmatrix | sp.sparray) -> np.ndarray:
    """``[n_users, K]`` bool: is the item in each slot relevant for that user (padding ``-1`` -> False).

    Why a global key lookup: encoding (user, item) as ``user * n_items + item`` turns the per-user
    membership test into one sorted search over all users at once.
    """
    topk = _check_pair(topk, truth)
    t = _binary_truth(truth)
    n_items = t.shape[1]
    rows = np.repeat(np.arange(t.shape[0], dtype=np.int64), np.diff(t.indptr))
    truth_keys = rows * n_items + t.indices.astype(np.int64)  # sorted: canonical CSR
    valid = (topk >= 0) & (topk < n_items)
    slot_keys = np.arange(topk.shape[0], dtype=np.int64)[:, None] * n_items + np.where(valid, topk, 0)
    if truth_keys.size == 0:
        return np.zeros(topk.shape, dtype=bool)
    pos = np.searchsorted(truth_keys, slot_keys)
    found = truth_keys[np.minimum(pos, truth_keys.size - 1)] == slot_keys
    return found & valid


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _with_nan(values: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64, copy=False)
    values[n_rel == 0] = np.nan
    return values


def _recall(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return _with_nan(hits[:, :k].sum(axis=1) / n_rel, n_rel)


def _precision(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    return _with_nan(hits[:, :k].sum(axis=1) / k, n_rel)


def _ndcg(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    disc = _discounts(k)
    dcg = hits[:, :k] @ disc
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(n_rel, k)]
    with np.errstate(divide="ignore", invalid="ignore"):
        return _with_nan(dcg / ideal, n_rel)


def _hit_rate(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    return _with_nan(np.asarray(hits[:, :k].any(axis=1)).astype(np.float64), n_rel)


def _average_precision(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    h = hits[:, :k]
    precision_at_rank = np.cumsum(h, axis=1) / np.arange(1, k + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _with_nan((precision_at_rank * h).sum(axis=1) / np.minimum(n_rel, k), n_rel)


def _reciprocal_rank(hits: np.ndarray, n_rel: np.ndarray, k: int) -> np.ndarray:
    h = hits[:, :k]
    first = np.argmax(h, axis=1)  # 0 when no hit; masked below
    rr = np.where(h.any(axis=1), 1.0 / (first + 1.0), 0.0)
    return _with_nan(rr, n_rel)


_FROM_HITS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "ndcg": _ndcg,
    "recall": _recall,
    "precision": _precision,
    "hr": _hit_rate,
    "map": _average_precision,
    "mrr": _reciprocal_rank,
}


def _per_user(name: str, topk: np.ndarray, truth: sp.spmatrix | sp.sparray, k: int | None) -> np.ndarray:
    topk = _check_pair(topk, truth)
    k = _resolve_k(topk, k)
    hits = hits_matrix(topk[:, :k], truth)
    return _FROM_HITS[name](hits, _n_relevant(_binary_truth(truth)), k)


def recall_at_k(topk: np.ndarray, truth: sp.spmatrix | sp.sparray, k: int | None = None) -> np.ndarray:
    """Per user: hits in the first ``k`` slots / |relevant| (not capped at k, as the protocol says).

    ``k`` defaults to ``topk.shape[1]``. NaN for users with no relevant item.
    """
    return _per_user("recall", topk, truth, k)


def precision_at_k(topk: np.ndarray, truth: sp.spmatrix | sp.sparray, k: int | None = None) -> np.ndarray:
    """Per user: hits in the first ``k`` slots / k (padding slots count as misses). NaN if no relevant."""
    return _per_user("precision", topk, truth, k)


def ndcg_at_k(topk: np.ndarray, truth: sp.spmatrix | sp.sparray, k: int | None = None) -> np.ndarray:
    """Per user: binary DCG@k / ideal DCG over ``min(|relevant|, k)`` positions.

    DCG = sum over hit ranks r of 1 / log2(r + 1). NaN for users with no relevant item.
    """
    return _per_user("ndcg", topk, truth, k)


def hit_rate_at_k(topk: np.ndarray, truth: sp.spmatrix | sp.sparray, k: int | None = None) -> np.ndarray:
    """Per user: 1.0 if any of the first ``k`` slots is relevant, else 0.0. NaN if no relevant."""
    return _per_user("hr", topk, truth, k)


def average_precision_at_k(
    topk: np.ndarray, truth: sp.spmatrix | sp.sparray, k: int | None = None
) -> np.ndarray:
    """Per user AP@k: sum of precision@r over hit ranks r <= k, / ``min(|relevant|, k)`` (mean -> MAP).

    Dividing by ``min(|relevant|, k)`` rather than |relevant| keeps a perfect top-k at 1.0 for users
    with more relevant items than slots. NaN if no relevant item.
    """
    return _per_user("map", topk, truth, k)


def reciprocal_rank_at_k(
    topk: np.ndarray, truth: sp.spmatrix | sp.sparray, k: int | None = None
) -> np.ndarray:
    """Per user: 1 / rank of the first relevant slot within the first ``k``, 0.0 if none (mean -> MRR)."""
    return _per_user("mrr", topk, truth, k)


# ------------------------------------------------------------------------------- catalog-level metrics
def coverage_at_k(topk: np.ndarray, n_items: int) -> float:
    """|union of all recommended items| / n_items, ignoring ``-1`` padding (catalog coverage)."""
    topk = np.asarray(topk)
    if n_items <= 0:
        raise ValueError("n_items must be positive")
    seen = np.zeros(n_items, dtype=bool)
    seen[topk[topk >= 0]] = True
    return float(seen.sum() / n_items)


def popularity_rank(popularity: np.ndarray) -> np.ndarray:
    """Rank of each item by training popularity: 1.0 = most popular; tied items share their mean rank.

    Averaging ties makes novelty independent of how a model orders equally popular items.
    """
    return rankdata(-np.asarray(popularity, dtype=np.float64), method="average")


def novelty_at_k(topk: np.ndarray, pop_rank: np.ndarray) -> float:
    """Mean popularity rank of recommended items, pooled over every non-padding slot of ``topk``.

    Precisely: ``mean(pop_rank[i] for every slot (u, j) with topk[u, j] != -1)``. Each slot weighs the
    same, so it equals the mean of per-user means when no list is padded. Higher = less popular items
    (1 = only the most popular item; ``(n_items + 1) / 2`` = the average item). NaN if there are no slots.
    Pass only the rows (and columns ``:k``) of the users being evaluated.
    """
    topk = np.asarray(topk)
    items = topk[topk >= 0]
    if items.size == 0:
        return float("nan")
    return float(np.asarray(pop_rank, dtype=np.float64)[items].mean())


def self_information(
    topk: np.ndarray, popularity: np.ndarray, n_users_with_history: int, smoothing: float = 1.0
) -> float:
    """Mean self-information (bits) of recommended items, pooled over non-padding slots.

    Per item: ``-log2((pop_i + smoothing) / (n_users_with_history + smoothing))`` where ``pop_i`` is
    the item's training count (at most one per user, so ``pop_i <= n_users_with_history``). The additive
    ``smoothing`` keeps never-seen items finite (they score ``log2(n_users_with_history + smoothing)``
    bits for smoothing 1) and keeps every value >= 0. NaN if there are no slots.
    """
    if n_users_with_history <= 0:
        raise ValueError("n_users_with_history must be positive")
    if smoothing <= 0:
        raise ValueError("smoothing must be positive")
    topk = np.asarray(topk)
    items = topk[topk >= 0]
    if items.size == 0:
        return float("nan")
    pop = np.asarray(popularity, dtype=np.float64)[items]
    return float(np.mean(-np.log2((pop + smoothing) / (n_users_with_history + smoothing))))


# --------------------------------------------------------------------------------------- aggregation
def _check_ks(ks: Sequence[int], n_cols: int | None = None) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be a non-empty set of positive ints, got {ks}")
    if n_cols is not None and ks[-1] > n_cols:
        raise ValueError(f"topk has {n_cols} columns but max(ks) = {ks[-1]}")
    return ks


def _per_user_all(
    topk: np.ndarray, truth: sp.spmatrix | sp.sparray, ks: Sequence[int]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every per-user metric at every k, from one hits matrix."""
    t = _binary_truth(truth)
    n_rel = _n_relevant(t)
    hits = hits_matrix(topk, t)
    per_user = {f"{name}@{k}": _FROM_HITS[name](hits, n_rel, k) for k in ks for name in PER_USER_METRICS}
    return per_user, n_rel


def _aggregate(
    topk: np.ndarray,
    per_user: dict[str, np.ndarray],
    n_rel: np.ndarray,
    ks: Sequence[int],
    popularity: np.ndarray,
) -> dict[str, float]:
    evaluated = n_rel > 0
    n_eval = int(evaluated.sum())
    lists = topk[evaluated]
    n_items = int(np.asarray(popularity).shape[0])
    pop_rank = popularity_rank(popularity)
    result: dict[str, float] = {}
    for k in ks:
        for name in PER_USER_METRICS:
            key = f"{name}@{k}"
            result[key] = float(per_user[key][evaluated].mean()) if n_eval else float("nan")
        result[f"coverage@{k}"] = coverage_at_k(lists[:, :k], n_items) if n_eval else float("nan")
        result[f"novelty@{k}"] = novelty_at_k(lists[:, :k], pop_rank)
    result["n_users"] = n_eval
    return result


def evaluate_rankings(
    topk: np.ndarray, truth: sp.spmatrix | sp.sparray, ks: Sequence[int], popularity: np.ndarray
) -> dict[str, float]:
    """Every metric at every k in ``ks`` for precomputed top-k lists (``topk`` has >= max(ks) columns).

    Keys: ``ndcg@k, recall@k, precision@k, hr@k, map@k, mrr@k`` (means over users with >= 1 relevant
    item), ``coverage@k`` and ``novelty@k`` (over those same users' lists, first k columns), and
    ``n_users`` (the number of such users). ``popularity`` (training count per item) fixes the catalog
    size for coverage and the popularity ranks for novelty.
    """
    topk = _check_pair(topk, truth)
    ks = _check_ks(ks, topk.shape[1])
    if np.asarray(popularity).shape[0] != truth.shape[1]:
        raise ValueError(f"popularity has {len(popularity)} items but truth has {truth.shape[1]} columns")
    per_user, n_rel = _per_user_all(topk, truth, ks)
    return _aggregate(topk, per_user, n_rel, ks, popularity)


def rank_users(
    score_fn: ScoreFn,
    users: np.ndarray,
    train: sp.spmatrix | sp.sparray,
    scored: np.ndarray,
    k: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """``int64 [len(users), k]`` top-k lists (training items excluded) of the users where ``scored``.

    Rows not scored stay -1. One batch of dense scores is held at a time.
    """
    todo = np.flatnonzero(scored)
    topk = np.full((users.size, k), -1, dtype=np.int64)
    topk[todo] = rank_together({"": score_fn}, lambda rows: rows, users[todo], train, k, batch_size)[""]
    return topk


def rank_together(
    score_fns: Mapping[str, Callable[[T], np.ndarray]],
    batch: Callable[[np.ndarray], T],
    users: np.ndarray,
    train: sp.spmatrix | sp.sparray,
    k: int,
    batch_size: int = 1024,
    after_batch: Callable[[T, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Top-k lists of ``users`` for several scorers, batch by batch: every scorer sees a batch in turn.

    ``batch(rows)`` builds what the scorers read (e.g. the histories of those user rows), once per batch
    and shared by all, so scorers that reuse each other's scores of the same batch (a fuser and its
    components) can. ``after_batch(shared, rows)``, when given, runs once the scorers are done with a
    batch (to measure more from scores they keep). Returns ``int64 [len(users), k]`` per name, training
    items excluded.
    """
    train = sp.csr_matrix(train)
    n_items = train.shape[1]
    out = {name: np.full((users.size, k), -1, dtype=np.int64) for name in score_fns}
    for start in range(0, users.size, batch_size):
        rows = users[start : start + batch_size]
        shared, exclude = batch(rows), train[rows]
        for name, score_fn in score_fns.items():
            scores = np.asarray(score_fn(shared))
            if scores.shape != (rows.size, n_items):
                raise ValueError(
                    f"{name or 'score_fn'} returned shape {scores.shape}, expected {(rows.size, n_items)}"
                )
            out[name][start : start + rows.size] = top_k(scores, k, exclude=exclude)
            del scores
        if after_batch is not None:
            after_batch(shared, rows)
    return out


def evaluate_scores(
    score_fn: ScoreFn,
    users: np.ndarray | Sequence[int],
    train: sp.spmatrix | sp.sparray,
    truth: sp.spmatrix | sp.sparray,
    ks: Sequence[int],
    popularity: np.ndarray,
    batch_size: int = 1024,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Score, rank and evaluate ``users`` in batches, holding one batch of dense scores at a time.

    ``score_fn(rows)`` gets an int64 array of user row indices (rows of ``train``/``truth``) and returns
    dense scores ``[len(rows), n_items]``. Each batch's training items are excluded, the top ``max(ks)``
    kept; only those small lists are accumulated, so the result is identical to ranking all users at
    once (``evaluate_rankings``). Users without a truth item are not scored at all: they cannot change
    any aggregate.

    Returns ``(aggregate, per_user)``: ``aggregate`` as in ``evaluate_rankings``; ``per_user`` maps
    ``"{metric}@{k}"`` for k = max(ks) and k = 10 (if in ks) to float64 arrays aligned with ``users``
    (NaN for users with no truth item), for paired significance tests.
    """
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    if train.shape != truth.shape:
        raise ValueError(f"train {train.shape} and truth {truth.shape} must have the same shape")
    n_items = truth.shape[1]
    if np.asarray(popularity).shape[0] != n_items:
        raise ValueError(f"popularity has {len(popularity)} items but the catalog has {n_items}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ks = _check_ks(ks)
    kmax = ks[-1]

    truth_u = _binary_truth(sp.csr_matrix(truth)[users])
    n_rel = _n_relevant(truth_u)
    topk = rank_users(score_fn, users, train, n_rel > 0, kmax, batch_size)
    per_user, _ = _per_user_all(topk, truth_u, ks)
    aggregate = _aggregate(topk, per_user, n_rel, ks, popularity)
    keep_ks = {kmax} | ({10} & set(ks))
    per_user_out = {key: v for key, v in per_user.items() if int(key.split("@")[1]) in keep_ks}
    return aggregate, per_user_out
