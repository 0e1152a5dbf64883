"""Evaluation segments: definitions from training data, and their metrics in evaluate_model."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from fuserec.evaluation import evaluate_model
from fuserec.histories import Histories
from fuserec.segments import head_items, segment_truths, simulated_cold
from fuserec.splitting import carve_validation
from fuserec.testing import planted_dataset


def test_head_items_is_the_top_share_with_ties_to_the_lower_index() -> None:
    pop = np.array([5, 9, 9, 0, 1, 2, 3, 4, 8, 7])
    assert np.flatnonzero(head_items(pop)).tolist() == [1, 2]
    assert head_items(np.array([1, 1, 1])).tolist() == [True, False, False]  # ceil(0.6) = 1


def test_segment_truths_split_users_and_interactions() -> None:
    truth = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=np.float32))
    user_counts = np.array([3, 10, 6])
    popularity = np.array([50, 4, 0, 7])
    seg = segment_truths(truth, user_counts, popularity)
    assert seg["cold_users"][0].tolist() == [0]
    assert seg["warm_users"][0].tolist() == [1, 2]
    assert seg["rare_items"][1].nonzero()[1].tolist() == [2, 1]  # items 2 (0 positives) and 1 (4)
    assert seg["new_items"][0].tolist() == [0] and seg["new_items"][1].nnz == 1
    assert seg["cold_users"][1].nnz + seg["warm_users"][1].nnz == truth.nnz


class _Scores:
    def __init__(self, item_scores: np.ndarray) -> None:
        self.item_scores = item_scores.astype(np.float32)

    def score(self, histories: Histories) -> np.ndarray:
        return np.tile(self.item_scores, (len(histories), 1))


def test_evaluate_model_reports_segments_and_a_tail_scorer_wins_there() -> None:
    carve = carve_validation(planted_dataset())
    assert carve is not None
    pop = carve.fit.item_popularity().astype(np.float64)
    head = evaluate_model(_Scores(pop), carve.fit, carve.truth, [10], 64)
    tail = evaluate_model(_Scores(-pop), carve.fit, carve.truth, [10], 64)
    for name in ("cold_users", "warm_users", "long_tail_items", "rare_items", "new_items"):
        assert name in head["segments"]
    seg = head["segments"]
    assert seg["warm_users"]["n_users"] + seg["cold_users"]["n_users"] == head["n_users"]
    assert tail["segments"]["long_tail_items"]["ndcg@10"] > head["segments"]["long_tail_items"]["ndcg@10"]
    assert head["ndcg@10"] > tail["ndcg@10"]


def test_simulated_cold_cuts_only_chosen_warm_users_to_their_latest_items() -> None:
    lists = [list(range(n)) for n in (3, 8, 12, 5, 6, 20)]
    hist = Histories.from_lists(lists, 30)
    users = np.array([0, 1, 2, 3, 4, 5])
    cut, chosen = simulated_cold(hist, users, 2, seed=1)
    assert len(chosen) == 2 and set(chosen) <= {1, 2, 4, 5}  # warm: more than 5 items
    for u in range(len(lists)):
        if u in set(chosen):
            assert 1 <= cut.lengths[u] <= 5 and cut.user(u).tolist() == lists[u][-cut.lengths[u] :]
        else:
            assert cut.user(u).tolist() == lists[u]
    again, same = simulated_cold(hist, users, 2, seed=1)
    assert same.tolist() == chosen.tolist() and again.lengths.tolist() == cut.lengths.tolist()
    assert simulated_cold(hist, users, 0, seed=1) is None
    assert simulated_cold(hist, np.array([0, 3]), 5, seed=1) is None  # nobody warm to cut
