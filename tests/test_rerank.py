"""Re-ranking and beyond-accuracy metrics: MMR's limits, diversity, Gini, and the curve's shape."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.rerank import (
    DiversityCurve,
    Rerank,
    diversity_curve,
    gini_of_exposure,
    intra_list_diversity,
    mmr_top_k,
    novelty_bonus,
    unit_vectors,
)

# two genres: items 0-4 are genre a, 5-9 genre b; scores favour genre a
VECTORS = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5, dtype=np.float32)
SCORES = torch.tensor([[10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])


def _mmr(rerank: Rerank, k: int = 4, seen: list[int] | None = None) -> list[int]:
    mask = torch.zeros(1, 10, dtype=torch.bool)
    if seen:
        mask[0, seen] = True
    bonus = torch.zeros(10)
    return mmr_top_k(SCORES, mask, torch.from_numpy(VECTORS), bonus, k, rerank)[0].tolist()


def test_no_weights_is_the_plain_top_k_and_skips_seen_items() -> None:
    assert _mmr(Rerank(keep=0)) == [0, 1, 2, 3]
    assert _mmr(Rerank(keep=0), seen=[0, 2]) == [1, 3, 4, 5]


def test_diversity_weight_interleaves_genres() -> None:
    greedy = Rerank(diversity=0.6, keep=0, order="greedy")
    assert _mmr(greedy) == [0, 5, 1, 6]  # mean similarity keeps the genres balanced
    assert _mmr(Rerank(diversity=0.6, keep=2, order="greedy")) == [0, 1, 5, 6]  # the head stays in order
    max_penalty = Rerank(diversity=0.6, penalty="max", keep=0, order="greedy")
    assert _mmr(max_penalty) == [0, 5, 1, 2]  # MMR: once both are listed, relevance


def test_score_order_lists_the_greedy_choice_by_score() -> None:
    assert _mmr(Rerank(diversity=0.6, keep=0)) == [0, 1, 5, 6]
    assert _mmr(Rerank(diversity=0.6, penalty="max", keep=0)) == [0, 1, 2, 5]
    assert _mmr(Rerank(diversity=0.6, keep=0), k=4, seen=[0, 1, 2, 3, 4, 5, 6, 7]) == [8, 9, -1, -1]
    with pytest.raises(ValueError, match="order"):
        Rerank(order="random")


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**16),
    st.integers(1, 12),
    st.integers(0, 4),
    st.floats(0.0, 0.95),
    st.integers(0, 18),
)
def test_score_order_is_the_same_set_sorted_by_score(
    seed: int, k: int, keep: int, diversity: float, n_seen: int
) -> None:
    rng = np.random.default_rng(seed)
    n = 20
    scores = torch.from_numpy(rng.permutation(n).astype(np.float32)).unsqueeze(0)  # distinct scores
    seen = torch.zeros(1, n, dtype=torch.bool)
    seen[0, rng.choice(n, n_seen, replace=False)] = True
    vectors = torch.from_numpy(unit_vectors(rng.random((n, 3)).astype(np.float32)))
    args = (scores, seen, vectors, torch.zeros(n), k)
    settings_ = {"diversity": diversity, "keep": keep, "depth": 15}
    greedy = mmr_top_k(*args, Rerank(**settings_, order="greedy"))[0].tolist()
    listed = mmr_top_k(*args, Rerank(**settings_))[0].tolist()
    items = [i for i in listed if i >= 0]
    assert sorted(items) == sorted(i for i in greedy if i >= 0)
    assert listed == items + [-1] * (len(listed) - len(items))  # empty slots last
    assert [scores[0, i].item() for i in items] == sorted((scores[0, i].item() for i in items), reverse=True)


def test_novelty_weight_prefers_rare_items() -> None:
    bonus = torch.from_numpy(novelty_bonus(np.array([100, 100, 100, 100, 100, 0, 0, 0, 0, 0]), 100))
    mask = torch.zeros(1, 10, dtype=torch.bool)
    out = mmr_top_k(SCORES, mask, torch.from_numpy(VECTORS), bonus, 3, Rerank(novelty=5.0, keep=0))[
        0
    ].tolist()
    assert set(out) <= {5, 6, 7, 8, 9}


def test_bad_weights_are_refused_with_the_rule() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Rerank(diversity=1.0)
    with pytest.raises(ValueError, match="novelty"):
        Rerank(novelty=-1.0)


def test_intra_list_diversity_and_gini_on_known_lists() -> None:
    assert intra_list_diversity(np.array([[0, 1, 2]]), VECTORS) == pytest.approx(0.0)
    assert intra_list_diversity(np.array([[0, 5]]), VECTORS) == pytest.approx(1.0)
    assert gini_of_exposure(np.array([[0, 1], [2, 3]]), 4) == pytest.approx(0.0)
    assert gini_of_exposure(np.array([[0], [0]]), 4) == pytest.approx(0.75)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=30))
def test_gini_lies_in_zero_one(items: list[int]) -> None:
    value = gini_of_exposure(np.array([items]), 10)
    assert 0.0 <= value <= 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 9), min_size=2, max_size=6), min_size=1, max_size=5))
def test_diversity_lies_in_zero_one(lists: list[list[int]]) -> None:
    width = max(len(x) for x in lists)
    topk = np.array([x + [-1] * (width - len(x)) for x in lists])
    value = intra_list_diversity(topk, np.abs(VECTORS) + 0.1)
    assert np.isnan(value) or -1e-6 <= value <= 1.0 + 1e-6


def test_curve_trades_accuracy_for_diversity() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 10
    truth = sp.csr_matrix((rng.random((n_users, n_items)) < 0.3).astype(np.float32))
    train = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    scores = np.tile(SCORES.numpy(), (n_users, 1))
    curve = diversity_curve(
        lambda rows: scores[: len(rows)],
        np.arange(n_users),
        train,
        truth,
        VECTORS,
        np.ones(n_items),
        [Rerank(keep=0), Rerank(diversity=0.6, keep=0)],
        k=4,
    )
    assert curve[0]["diversity@4"] == pytest.approx(0.0) and curve[1]["diversity@4"] == pytest.approx(2 / 3)
    assert unit_vectors(np.zeros((1, 2))).tolist() == [[0.0, 0.0]]


def test_curve_takes_read_only_shared_scores_without_a_warning_or_a_write() -> None:
    scores = np.tile(SCORES.numpy(), (3, 1))
    scores.flags.writeable = False  # as evaluate's shared scores are
    curve = DiversityCurve(VECTORS, np.ones(10), 3, [Rerank(keep=0), Rerank(diversity=0.6, keep=0)], k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curve.add(scores, sp.csr_matrix((3, 10), dtype=np.float32))
    assert np.array_equal(scores, np.tile(SCORES.numpy(), (3, 1)))
    assert curve.lists[0][0].tolist() == [[0, 1, 2, 3]] * 3


def test_the_served_graph_applies_the_configured_re_ranking(tmp_path) -> None:
    from fuserec.onnx_model import OnnxRecommender, Reranker, export_onnx
    from fuserec.parity import parity_check
    from fuserec.plugins.itemknn import ItemKNN
    from fuserec.testing import planted_dataset
    from fuserec.testing.checks import probe_histories

    data = planted_dataset()
    algo = ItemKNN({"k": 20}).fit(data)
    from fuserec.features import item_content_vectors

    vectors = item_content_vectors(data.items)
    reranker = Reranker(Rerank(diversity=0.5, keep=2), vectors, np.zeros(data.n_items, np.float32))
    session = OnnxRecommender(export_onnx(algo, tmp_path / "m.onnx", k=10, reranker=reranker))
    hist = probe_histories(data)
    report = parity_check(algo, session, hist, 10, reranker)
    assert report["top_items_match_up_to_ties"] and report["scores_match"]
    plain = OnnxRecommender(export_onnx(algo, tmp_path / "p.onnx", k=10))
    diverse, same = session.run(hist.to_padded())[1], plain.run(hist.to_padded())[1]
    assert intra_list_diversity(diverse, vectors) > intra_list_diversity(same, vectors)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 9), min_size=2, max_size=6), min_size=1, max_size=7))
def test_diversity_equals_the_pairwise_definition(lists: list[list[int]]) -> None:
    width = max(len(x) for x in lists)
    topk = np.array([x + [-1] * (width - len(x)) for x in lists])
    unit = unit_vectors(np.abs(VECTORS) + 0.1)
    per_list = []
    for row in topk:
        items = row[row >= 0]
        pairs = [(a, b) for i, a in enumerate(items) for j, b in enumerate(items) if i != j]
        if pairs:
            per_list.append(np.mean([1.0 - unit[a] @ unit[b] for a, b in pairs]))
    value = intra_list_diversity(topk, np.abs(VECTORS) + 0.1, chunk=2)
    if per_list:
        assert value == pytest.approx(float(np.mean(per_list)), abs=1e-5)
    else:
        assert np.isnan(value)


def test_the_served_graph_lists_a_short_re_ranked_list_by_score_then_empty_slots(tmp_path) -> None:
    from fuserec.features import item_content_vectors
    from fuserec.histories import Histories
    from fuserec.onnx_model import OnnxRecommender, Reranker, export_onnx
    from fuserec.plugins.itemknn import ItemKNN
    from fuserec.testing import planted_dataset

    data = planted_dataset()
    algo = ItemKNN({"k": 20}).fit(data)
    reranker = Reranker(
        Rerank(diversity=0.9, keep=1), item_content_vectors(data.items), np.zeros(data.n_items, np.float32)
    )
    session = OnnxRecommender(export_onnx(algo, tmp_path / "m.onnx", k=10, reranker=reranker))
    left = [0, 1, 2, 30, 31, 32]  # the history holds every other item: 6 can be listed in 10 slots
    hist = Histories.from_lists([[i for i in range(data.n_items) if i not in left]], data.n_items)
    _, items, top, _ = session.run_with_contributions(hist.to_padded(), None)
    expected = algo.score(hist)
    seen = torch.from_numpy(hist.to_csr().toarray() > 0)
    with torch.no_grad():
        reference = reranker(torch.from_numpy(expected), seen, 10).numpy()
    assert items.tolist() == reference.tolist()
    listed = items[0, :6]
    assert sorted(listed.tolist()) == left and items[0, 6:].tolist() == [-1] * 4
    assert np.all(np.diff(expected[0, listed]) <= 0)  # listed by score (greedy order differs here)
    assert np.allclose(top[0, :6], expected[0, listed], atol=1e-4)  # each listed item's own score
