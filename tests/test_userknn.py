"""UserKNN: the conformance kit, plus a hand-computed example and the neighbour cut."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from fuserec.data.dataset import Dataset
from fuserec.histories import Histories
from fuserec.plugins.userknn import UserKNN
from fuserec.testing import AlgorithmTests


class TestUserKNN(AlgorithmTests):
    algorithm = UserKNN
    config: ClassVar[dict] = {"k": 20, "shrinkage": 5.0, "exponent": 2.0}
    bad_configs: ClassVar[list[dict]] = [
        {"k": 0},
        {"shrinkage": -1.0},
        {"exponent": 0.0},
        {"weighting": "tf"},
    ]


def tiny(rows: list[list[int]], n_items: int = 5) -> Dataset:
    """Users with the given item lists (in time order) over ``n_items`` items."""
    records = [(u, i, 5.0, 1000 * u + t) for u, items in enumerate(rows) for t, i in enumerate(items)]
    inter = pd.DataFrame(records, columns=["user", "item", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype(np.float32)
    items = pd.DataFrame({"item": np.arange(n_items), "item_id": np.arange(n_items) + 1})
    users = pd.DataFrame({"user": np.arange(len(rows)), "user_id": np.arange(len(rows)) + 1})
    return Dataset(inter, items, users)


# u0 {0,1,2}, u1 {0,1}, u2 {2,3}, u3 {4}; the history {0,1} overlaps u0 in 2 items and is u1.
DATA = tiny([[0, 1, 2], [0, 1], [2, 3], [4]])
HIST = Histories.from_lists([[0, 1]], 5)
PLAIN = {"shrinkage": 0.0, "exponent": 1.0}  # plain cosine, so expected values are easy to read


def test_matches_hand_computed_example() -> None:
    sim0, sim1 = 2 / (np.sqrt(2) * np.sqrt(3)), 1.0  # cosine of {0,1} with u0 and u1; u2, u3 share nothing
    algo = UserKNN({"k": 2, "shrinkage": 0.0, "exponent": 2.0}).fit(DATA)
    expected = sim0**2 * np.array([1, 1, 1, 0, 0]) + sim1**2 * np.array([1, 1, 0, 0, 0])
    np.testing.assert_allclose(algo.score(HIST)[0], expected, rtol=1e-6)
    shrunk = UserKNN({"k": 2, "shrinkage": 1.0, "exponent": 1.0}).fit(DATA).score(HIST)[0]
    s0, s1 = 2 / (np.sqrt(6) + 1), 2 / (2 + 1)
    np.testing.assert_allclose(
        shrunk, s0 * np.array([1, 1, 1, 0, 0]) + s1 * np.array([1, 1, 0, 0, 0]), rtol=1e-6
    )


def test_top_k_restricts_neighbours() -> None:
    one = UserKNN({"k": 1, **PLAIN}).fit(DATA).score(HIST)[0]
    # Only u1 (sim 1) is kept: item 2, which only u0 has, gets nothing.
    np.testing.assert_allclose(one, [1, 1, 0, 0, 0], rtol=1e-6)
    # Ties at the cut are all kept, so the result does not depend on which tied user top-k returns.
    tied = UserKNN({"k": 1, **PLAIN}).fit(tiny([[0, 1], [0, 2], [3]]))
    np.testing.assert_allclose(
        tied.score(Histories.from_lists([[0]], 5))[0], np.array([2, 1, 1, 0, 0]) / np.sqrt(2)
    )


def test_new_and_empty_histories_and_torch_module_agree() -> None:
    algo = UserKNN({"k": 2, "shrinkage": 1.0, "exponent": 1.5}).fit(DATA)
    hist = Histories.from_lists([[0, 1], [], [3, 3], [4, 2]], 5)
    scores = algo.score(hist)
    assert np.isfinite(scores).all() and (scores[1] == 0).all()
    with torch.no_grad():
        out = algo.to_torch()(torch.from_numpy(hist.to_padded())).numpy()
    np.testing.assert_allclose(out, scores, rtol=1e-6, atol=1e-7)


def test_idf_weighting_changes_similarity_not_score_support() -> None:
    algo = UserKNN({"k": 4, "weighting": "idf", **PLAIN}).fit(DATA)
    scores = algo.score(HIST)[0]
    assert scores[4] == 0 and scores[2] > 0  # only neighbours' (binary) items are scored
    assert algo.explain(np.array([0, 1]), 2)["neighbours"][0][0] == 0  # item 2 comes from u0


class TestUserKNNSparse(AlgorithmTests):
    """The whole kit again with scoring forced onto the sparse path (the ONNX graph stays dense)."""

    algorithm = UserKNN
    config: ClassVar[dict] = {"k": 20, "shrinkage": 5.0, "exponent": 2.0, "dense_max_cells": 0}


def test_the_sparse_path_scores_like_the_dense_module() -> None:
    from fuserec.testing import planted_dataset

    data = planted_dataset()
    histories = data.histories()
    for weighting in ("none", "idf"):
        config = {"k": 5, "shrinkage": 2.0, "exponent": 1.5, "weighting": weighting}
        dense = UserKNN(config).fit(data)
        sparse = UserKNN({**config, "dense_max_cells": 0}).fit(data)
        assert dense._dense_scoring() and not sparse._dense_scoring()
        np.testing.assert_allclose(sparse.score(histories), dense.score(histories), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            sparse.user_representation(histories), dense.user_representation(histories), rtol=1e-5, atol=1e-7
        )
    item = int(np.argmax(dense.score(Histories.from_lists([[0, 1]], data.n_items))[0]))
    assert sparse.explain(np.array([0, 1]), item)["score"] == pytest.approx(
        dense.explain(np.array([0, 1]), item)["score"]
    )
