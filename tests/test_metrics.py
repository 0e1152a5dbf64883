"""Tests for fuserec.metrics: exact tie-breaking, exclusion, padding, hand-computed metric values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.metrics import (
    average_precision_at_k,
    coverage_at_k,
    evaluate_rankings,
    evaluate_scores,
    hit_rate_at_k,
    hits_matrix,
    ndcg_at_k,
    novelty_at_k,
    popularity_rank,
    precision_at_k,
    rank_together,
    rank_users,
    recall_at_k,
    reciprocal_rank_at_k,
    self_information,
    top_k,
)

PER_USER_FUNCS = {
    "recall": recall_at_k,
    "precision": precision_at_k,
    "ndcg": ndcg_at_k,
    "hr": hit_rate_at_k,
    "map": average_precision_at_k,
    "mrr": reciprocal_rank_at_k,
}


def csr(dense) -> sp.csr_matrix:
    return sp.csr_matrix(np.asarray(dense, dtype=np.float64))


def truth_from_lists(lists: list[list[int]], n_items: int) -> sp.csr_matrix:
    m = np.zeros((len(lists), n_items))
    for u, items in enumerate(lists):
        m[u, items] = 1
    return csr(m)


def reference_top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
    """Slow, obviously-right reference: per row, lexsort on (index, -score) after NaN-last and exclusion."""
    n_users, n_items = scores.shape
    out = np.full((n_users, k), -1, dtype=np.int64)
    idx = np.arange(n_items)
    for u in range(n_users):
        s = scores[u].astype(np.float64)
        nan = np.isnan(s)
        neg = np.where(nan, 0.0, -s)
        order = np.lexsort((idx, neg, nan))  # primary: NaN last; then -score; then index
        if exclude is not None:
            order = order[exclude[u, order] == 0]
        chosen = order[:k]
        out[u, : chosen.size] = chosen
    return out


# ------------------------------------------------------------------------------------------- top_k
def test_all_equal_scores_return_lowest_indices_minus_excluded():
    scores = np.ones((2, 8))
    ex = csr([[0, 1, 0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(top_k(scores, 4, ex), [[0, 2, 4, 5], [1, 2, 3, 4]])
    np.testing.assert_array_equal(top_k(scores, 4), [[0, 1, 2, 3]] * 2)


def test_boundary_ties_resolved_by_lower_index():
    scores = np.array([[1, 2, 2, 0, 2, 2, 3.0], [5, 3, 3, 3, 3, 1, 3.0]])
    np.testing.assert_array_equal(top_k(scores, 3), [[6, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(top_k(scores, 4), [[6, 1, 2, 4], [0, 1, 2, 3]])


def test_boundary_ties_large_row_where_argpartition_is_arbitrary():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 2, size=(4, 5000)).astype(np.float64)
    got = top_k(scores, 50)
    for u in range(4):
        np.testing.assert_array_equal(got[u], np.flatnonzero(scores[u] == 1)[:50])


def test_exclusion_and_padding():
    scores = np.array([[0.9, 0.1, 0.5, 0.7]])
    ex = csr([[1, 0, 1, 0]])
    np.testing.assert_array_equal(top_k(scores, 4, ex), [[3, 1, -1, -1]])
    np.testing.assert_array_equal(top_k(scores, 6), [[0, 3, 2, 1, -1, -1]])  # k > n_items
    np.testing.assert_array_equal(top_k(scores, 2, csr([[1, 1, 1, 1]])), [[-1, -1]])


def test_explicit_zero_in_exclude_does_not_exclude():
    ex = sp.csr_matrix((np.array([0.0, 1.0]), np.array([0, 1]), np.array([0, 2])), shape=(1, 3))
    np.testing.assert_array_equal(top_k(np.array([[3.0, 2.0, 1.0]]), 3, ex), [[0, 2, -1]])


def test_nan_ranks_last_after_minus_inf_but_is_eligible():
    scores = np.array([[np.nan, 1.0, np.nan, -np.inf, 0.0, np.inf]])
    np.testing.assert_array_equal(top_k(scores, 6), [[5, 1, 4, 3, 0, 2]])
    np.testing.assert_array_equal(top_k(scores, 6, csr([[1, 0, 0, 0, 0, 0]])), [[5, 1, 4, 3, 2, -1]])


def test_signed_zeros_tie_and_inputs_untouched():
    scores = np.array([[0.0, -0.0, 0.0, -1.0]], dtype=np.float32)
    before = scores.copy()
    ex = csr([[0, 0, 0, 1]])
    np.testing.assert_array_equal(top_k(scores, 3, ex), [[0, 1, 2]])
    np.testing.assert_array_equal(scores, before)
    assert ex.nnz == 1


def test_integer_scores_and_empty_inputs():
    np.testing.assert_array_equal(top_k(np.array([[1, 3, 2]]), 2), [[1, 2]])
    assert top_k(np.zeros((0, 5)), 3).shape == (0, 3)
    np.testing.assert_array_equal(top_k(np.zeros((2, 0)), 2), -np.ones((2, 2)))
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 3)), 0)
    with pytest.raises(ValueError):
        top_k(np.zeros((2, 3)), 1, csr(np.zeros((2, 4))))


@st.composite
def scores_and_exclusions(draw):
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(-2, 3, size=(n_users, n_items)).astype(np.float64)  # many ties
    special = rng.random(scores.shape)
    scores[special < draw(st.sampled_from([0.0, 0.1]))] = np.nan
    scores[special > 1 - draw(st.sampled_from([0.0, 0.05]))] = -np.inf
    exclude = (rng.random(scores.shape) < draw(st.sampled_from([0.0, 0.3, 0.9]))).astype(np.float64)
    k = draw(st.integers(1, n_items + 3))
    return scores, exclude, k


@settings(max_examples=300, deadline=None)
@given(scores_and_exclusions())
def test_top_k_matches_slow_reference(case):
    scores, exclude, k = case
    np.testing.assert_array_equal(top_k(scores, k, csr(exclude)), reference_top_k(scores, k, exclude))


# ------------------------------------------------------------------------------- per-user metrics
TOPK = np.array([[3, 0, 7, 5, 1], [0, 1, 2, 4, -1], [0, 1, 2, 3, 4]])
TRUTH = truth_from_lists([[1, 3, 7], [4], []], n_items=10)
D = [1 / math.log2(r + 1) for r in range(1, 11)]  # discount at rank r


def test_hits_matrix():
    np.testing.assert_array_equal(
        hits_matrix(TOPK, TRUTH),
        [[1, 0, 1, 0, 1], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]],
    )


def test_hits_matrix_ignores_duplicates_and_explicit_zeros_in_truth():
    truth = sp.csr_matrix(
        (np.array([2.0, 3.0, 0.0]), np.array([1, 1, 2]), np.array([0, 3])), shape=(1, 4), copy=False
    )
    np.testing.assert_array_equal(hits_matrix(np.array([[1, 2, -1]]), truth), [[True, False, False]])
    np.testing.assert_array_equal(recall_at_k(np.array([[1, 2, -1]]), truth), [1.0])


def test_hand_computed_at_5():
    expected = {
        "recall": [1.0, 1.0],
        "precision": [3 / 5, 1 / 5],  # padding slot counts as a miss
        "ndcg": [(D[0] + D[2] + D[4]) / (D[0] + D[1] + D[2]), D[3] / D[0]],
        "hr": [1.0, 1.0],
        "map": [(1 / 1 + 2 / 3 + 3 / 5) / 3, (1 / 4) / 1],
        "mrr": [1.0, 1 / 4],
    }
    for name, fn in PER_USER_FUNCS.items():
        got = fn(TOPK, TRUTH)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got[:2], expected[name], err_msg=name)
        assert np.isnan(got[2]), name  # user without truth -> NaN


def test_hand_computed_at_2():
    expected = {
        "recall": [1 / 3, 0.0],
        "precision": [1 / 2, 0.0],
        "ndcg": [D[0] / (D[0] + D[1]), 0.0],  # ideal over min(|truth|, k) = 2 positions
        "hr": [1.0, 0.0],
        "map": [1 / 2, 0.0],  # / min(3, 2)
        "mrr": [1.0, 0.0],
    }
    for name, fn in PER_USER_FUNCS.items():
        np.testing.assert_allclose(fn(TOPK, TRUTH, k=2)[:2], expected[name], err_msg=name)
        np.testing.assert_allclose(fn(TOPK[:, :2], TRUTH)[:2], expected[name], err_msg=name)
    with pytest.raises(ValueError):
        recall_at_k(TOPK, TRUTH, k=6)


def test_catalog_metrics_hand_computed():
    assert coverage_at_k(np.array([[0, 1, -1], [1, 2, -1]]), 10) == pytest.approx(0.3)
    ranks = popularity_rank(np.array([5, 10, 5, 0]))
    np.testing.assert_array_equal(ranks, [2.5, 1.0, 2.5, 4.0])
    assert novelty_at_k(np.array([[1, 0], [2, -1]]), ranks) == pytest.approx((1 + 2.5 + 2.5) / 3)
    assert math.isnan(novelty_at_k(np.array([[-1]]), ranks))
    # -log2((pop + 1) / (3 + 1)): item0 -> 0, item1 -> 1, item2 -> 2 bits
    assert self_information(np.array([[0, 1], [2, -1]]), np.array([3, 1, 0]), 3) == pytest.approx(1.0)


def test_evaluate_rankings_keys_and_user_filter():
    popularity = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    res = evaluate_rankings(TOPK, TRUTH, [2, 5], popularity)
    assert res["n_users"] == 2
    for k in (2, 5):
        for name in ("ndcg", "recall", "precision", "hr", "map", "mrr", "coverage", "novelty"):
            assert f"{name}@{k}" in res
    assert res["recall@5"] == pytest.approx(1.0)
    assert res["mrr@5"] == pytest.approx((1 + 0.25) / 2)
    assert res["ndcg@2"] == pytest.approx(np.nanmean(ndcg_at_k(TOPK, TRUTH, 2)))
    # coverage/novelty only over users 0 and 1 (user 2 has no truth; its item 3 is also in user 0's list)
    assert res["coverage@5"] == pytest.approx(len({3, 0, 7, 5, 1, 2, 4}) / 10)
    assert res["coverage@2"] == pytest.approx(len({3, 0, 1}) / 10)
    ranks = popularity_rank(popularity)
    assert res["novelty@2"] == pytest.approx(np.mean(ranks[[3, 0, 0, 1]]))
    with pytest.raises(ValueError):
        evaluate_rankings(TOPK, TRUTH, [10], popularity)


def test_evaluate_rankings_no_evaluated_users():
    res = evaluate_rankings(np.array([[0, 1]]), csr([[0, 0, 0]]), [2], np.array([1, 1, 1]))
    assert res["n_users"] == 0
    assert math.isnan(res["ndcg@2"]) and math.isnan(res["coverage@2"])


@st.composite
def rankings_and_truth(draw):
    n_users = draw(st.integers(1, 8))
    n_items = draw(st.integers(1, 25))
    K = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(float)
    exclude = (rng.random(scores.shape) < 0.3).astype(float)
    topk = top_k(scores, K, csr(exclude))
    truth = (rng.random(scores.shape) < draw(st.sampled_from([0.05, 0.2, 0.6]))).astype(float)
    return topk, csr(truth)


@settings(max_examples=150, deadline=None)
@given(rankings_and_truth())
def test_metrics_in_unit_interval_and_recall_monotone(case):
    topk, truth = case
    has_truth = np.diff(truth.indptr) > 0
    for name, fn in PER_USER_FUNCS.items():
        v = fn(topk, truth)
        assert np.all(np.isnan(v) == ~has_truth), name
        assert np.all((v[has_truth] >= 0) & (v[has_truth] <= 1 + 1e-12)), name
    recalls = np.stack([recall_at_k(topk, truth, k) for k in range(1, topk.shape[1] + 1)], axis=1)
    assert np.all(np.diff(recalls[has_truth], axis=1) >= 0)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_ndcg_is_one_when_topk_equals_truth(data):
    n_items = data.draw(st.integers(1, 30))
    k = data.draw(st.integers(1, n_items))
    n_rel = data.draw(st.integers(1, k))
    perm = np.array(data.draw(st.permutations(list(range(n_items)))), dtype=np.int64)
    truth = truth_from_lists([perm[:n_rel].tolist()], n_items)
    # the top-k lists exactly the truth items (any order), the remaining slots padded
    padded = np.concatenate([perm[:n_rel], -np.ones(k - n_rel, dtype=np.int64)])[None, :]
    # ... or followed by irrelevant items
    filled = perm[:k][None, :]
    for topk in (padded, filled):
        assert ndcg_at_k(topk, truth)[0] == pytest.approx(1.0)
        assert recall_at_k(topk, truth)[0] == pytest.approx(1.0)
        assert average_precision_at_k(topk, truth)[0] == pytest.approx(1.0)
        assert reciprocal_rank_at_k(topk, truth)[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------- evaluate_scores
@st.composite
def scoring_problem(draw):
    n_users = draw(st.integers(1, 20))
    n_items = draw(st.integers(2, 25))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(n_users, n_items)).astype(float)
    train = csr(rng.random(scores.shape) < 0.3)
    truth = csr((rng.random(scores.shape) < 0.2) & (train.toarray() == 0))
    popularity = np.asarray(train.sum(axis=0)).ravel()
    users = rng.permutation(n_users)[: draw(st.integers(1, n_users))]
    ks = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    batch_size = draw(st.integers(1, 7))
    return scores, train, truth, popularity, users, ks, batch_size


@settings(max_examples=100, deadline=None)
@given(scoring_problem())
def test_batched_evaluate_scores_equals_unbatched(problem):
    scores, train, truth, popularity, users, ks, batch_size = problem
    calls: list[np.ndarray] = []

    def score_fn(rows: np.ndarray) -> np.ndarray:
        calls.append(rows)
        return scores[rows]

    agg_b, per_b = evaluate_scores(score_fn, users, train, truth, ks, popularity, batch_size=batch_size)
    assert all(len(r) <= batch_size for r in calls)
    agg_u, per_u = evaluate_scores(lambda r: scores[r], users, train, truth, ks, popularity, len(users))
    np.testing.assert_equal(agg_b, agg_u)
    np.testing.assert_equal(per_b, per_u)

    # and both equal ranking every selected user at once, then evaluating
    topk = top_k(scores[users], max(ks), exclude=train[users])
    np.testing.assert_equal(agg_b, evaluate_rankings(topk, truth[users], ks, popularity))


def test_evaluate_scores_per_user_output_and_skips_users_without_truth():
    n_items = 12
    rng = np.random.default_rng(0)
    scores = rng.random((5, n_items))
    train = csr(rng.random((5, n_items)) < 0.3)
    truth = truth_from_lists([[0, 1], [], [2], [3, 4, 5], []], n_items)
    truth = csr(truth.toarray() * (train.toarray() == 0))
    users = np.array([4, 3, 1, 0])
    seen: list[int] = []

    def score_fn(rows: np.ndarray) -> np.ndarray:
        seen.extend(rows.tolist())
        return scores[rows]

    agg, per_user = evaluate_scores(score_fn, users, train, truth, [5, 10, 12], np.ones(n_items), 2)
    assert sorted(seen) == [u for u in (0, 3) if truth[u].nnz]  # users 4 and 1 have no truth
    assert set(per_user) == {
        f"{m}@{k}" for m in ("ndcg", "recall", "precision", "hr", "map", "mrr") for k in (10, 12)
    }
    for v in per_user.values():
        assert v.shape == (4,)
        assert np.isnan(v[0]) and np.isnan(v[2])
    assert agg["n_users"] == int((np.diff(truth[users].indptr) > 0).sum())
    assert agg["ndcg@10"] == pytest.approx(np.nanmean(per_user["ndcg@10"]))


def test_rank_together_builds_each_batch_once_and_matches_rank_users() -> None:
    rng = np.random.default_rng(3)
    scores = {"a": rng.random((9, 6)), "b": rng.random((9, 6))}
    train = sp.csr_matrix(rng.random((9, 6)) < 0.3)
    users = np.array([0, 2, 3, 5, 8])
    built: list[list[int]] = []

    def batch(rows: np.ndarray) -> np.ndarray:
        built.append(rows.tolist())
        return rows

    together = rank_together(
        {name: (lambda rows, s=s: s[rows]) for name, s in scores.items()}, batch, users, train, 3, 2
    )
    assert built == [[0, 2], [3, 5], [8]]
    for name, s in scores.items():
        alone = rank_users(lambda rows, s=s: s[rows], users, train, np.ones(5, bool), 3, 4)
        assert np.array_equal(together[name], alone)
    with pytest.raises(ValueError, match="b returned shape"):
        rank_together({"b": lambda rows: scores["b"][rows, :5]}, batch, users, train, 3, 2)


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.sampled_from([0.0, -0.0, 1.0, 1.0, 2.5, -3.0, float("inf"), float("-inf"), float("nan")]),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    ),
    k=st.integers(1, 12),
)
def test_top_k_with_a_dense_mask_is_the_full_sort_rule(data: list[tuple[float, bool]], k: int) -> None:
    """What the service ranks per request: a full stable sort (score descending, NaN last, ties to the
    lower index) with the blocked items dropped, which the partial sort must reproduce exactly."""
    scores = np.array([s for s, _ in data], dtype=np.float32)
    blocked = np.array([b for _, b in data])
    keys = -scores.astype(np.float64) + 0.0  # -0.0 and 0.0 tie
    order = np.lexsort((np.arange(len(scores)), np.where(np.isnan(keys), np.inf, keys), np.isnan(keys)))
    expected = [int(i) for i in order if not blocked[i]][:k]
    picked = top_k(scores[None], k, exclude=blocked[None])[0]
    assert picked[picked >= 0].tolist() == expected
    sparse = top_k(scores[None], k, exclude=sp.csr_matrix(blocked[None]))[0]
    np.testing.assert_array_equal(picked, sparse)
