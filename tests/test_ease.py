"""EASE passes the conformance kit and is exactly Steck's closed form."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from fuserec.api import Histories
from fuserec.data.dataset import Dataset
from fuserec.plugins.ease import EASE
from fuserec.testing import AlgorithmTests


class TestEASE(AlgorithmTests):
    algorithm = EASE
    config: ClassVar[dict] = {"l2": 10.0}
    bad_configs: ClassVar[list[dict]] = [{"l2": 0.0}, {"l2": -1.0}, {"max_items": 0}]


def _tiny() -> Dataset:
    pairs = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2), (2, 3), (3, 3), (4, 0), (4, 1), (4, 3)]
    inter = pd.DataFrame(
        {
            "user": [u for u, _ in pairs],
            "item": [i for _, i in pairs],
            "rating": np.ones(len(pairs), dtype=np.float32),
            "timestamp": np.arange(len(pairs), dtype=np.int64),
        }
    )
    items = pd.DataFrame({"item": np.arange(4), "item_id": np.arange(4) + 1})
    users = pd.DataFrame({"user": np.arange(5), "user_id": np.arange(5) + 1})
    return Dataset(inter, items, users)


def test_closed_form_matches_numpy_and_has_zero_diagonal() -> None:
    data, l2 = _tiny(), 3.0
    algo = EASE({"l2": l2}).fit(data)
    x = data.matrix().toarray().astype(np.float64)
    p = np.linalg.inv(x.T @ x + l2 * np.eye(4))
    want = np.eye(4) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(algo.weights_, want, atol=1e-6)
    assert np.all(np.diag(algo.weights_) == 0.0)
    hist = Histories.from_lists([[0, 1], [3], []], 4)
    np.testing.assert_allclose(algo.score(hist), hist.to_csr().toarray() @ want, atol=1e-6)


def test_each_column_is_the_constrained_ridge_solution() -> None:
    # Why the formula: column j of B minimises ||X_j - X B_j||² + λ||B_j||² with B_jj = 0.
    data, l2 = _tiny(), 2.0
    b = EASE({"l2": l2}).fit(data).weights_.astype(np.float64)
    x = data.matrix().toarray().astype(np.float64)
    for j in range(4):
        others = [i for i in range(4) if i != j]
        xo = x[:, others]
        ridge = np.linalg.solve(xo.T @ xo + l2 * np.eye(3), xo.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], ridge, atol=1e-6)


def test_explain_sums_to_the_score() -> None:
    algo = EASE({"l2": 1.0}).fit(_tiny())
    why = algo.explain(np.array([0, 1, 1]), 3)
    assert why["score"] == pytest.approx(float(algo.score(Histories.from_lists([[0, 1]], 4))[0, 3]), abs=1e-6)


def test_refuses_a_catalog_too_large_with_a_fix() -> None:
    with pytest.raises(MemoryError, match="max_items"):
        EASE({"max_items": 3}).fit(_tiny())
