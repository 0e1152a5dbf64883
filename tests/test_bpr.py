"""BPR: the conformance kit, plus training and fold-in behaviour on the planted dataset."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from fuserec.histories import Histories
from fuserec.plugins.bpr import BPR, _sample_negatives, _user_batches
from fuserec.testing import AlgorithmTests, planted_dataset

FAST = {"factors": 16, "epochs": 15, "lr": 0.02, "reg": 1e-4, "batch_size": 256}


class TestBPR(AlgorithmTests):
    algorithm = BPR
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [{"factors": 0}, {"lr": 0.0}, {"alpha": 1.5}, {"reg": -1.0}]


@pytest.fixture(scope="module")
def fitted() -> BPR:
    return BPR(FAST).fit(planted_dataset())


def test_loss_decreases(fitted: BPR) -> None:
    losses = fitted.losses_
    assert len(losses) == FAST["epochs"]
    assert losses[-1] < 0.5 * losses[0] and losses[0] < np.log(2) + 1e-3  # starts near chance: log 2


def test_fold_in_follows_the_history_cluster(fitted: BPR) -> None:
    # Planted: item i belongs to cluster i % 4. New users (not in training) with a cluster's items.
    n_items = fitted.n_items_
    cluster = np.arange(n_items) % 4
    hist = Histories.from_lists([[c, c + 4, c + 8, c + 12] for c in range(4)], n_items)
    scores = fitted.score(hist)
    for c in range(4):
        own = (cluster == c) & (np.arange(n_items) >= 16)  # unseen items of the same cluster
        other = (cluster != c) & (np.arange(n_items) >= 16)
        assert scores[c, own].mean() > scores[c, other].mean()


def test_fold_in_is_a_set_function_and_empty_is_bias(fitted: BPR) -> None:
    n = fitted.n_items_
    hist = Histories.from_lists([[3, 7, 11], [11, 3, 7, 7], []], n)
    scores = fitted.score(hist)
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6, atol=1e-6)  # order and repeats ignored
    np.testing.assert_allclose(scores[2], fitted.item_bias_, rtol=1e-6)
    with torch.no_grad():
        out = fitted.to_torch()(torch.from_numpy(hist.to_padded())).numpy()
    np.testing.assert_allclose(out, scores, rtol=1e-5, atol=1e-6)
    explained = fitted.explain(np.array([3, 7, 11]), 15)
    assert explained["score"] == pytest.approx(float(scores[0, 15]), rel=1e-4, abs=1e-5)


def test_negatives_avoid_positives_and_batches_cover_users() -> None:
    rng = np.random.default_rng(0)
    known = np.sort(np.array([0 * 5 + 1, 0 * 5 + 2, 0 * 5 + 3, 1 * 5 + 0]))  # user 0: {1,2,3}; user 1: {0}
    neg = _sample_negatives(rng, np.zeros(2000, dtype=np.int64), 5, known)
    # User 0 likes 3 of 5 items: a negative stays positive only if 11 draws in a row hit (0.6 ** 11 < 0.4%).
    assert np.isin(neg, [0, 4]).mean() > 0.98
    lengths = np.array([3, 1, 0, 5, 2])
    batches = _user_batches(np.array([4, 0, 3, 1]), lengths, 4)
    assert np.concatenate(batches).tolist() == [4, 0, 3, 1]
