"""ALS passes the conformance kit; its batched CG fold-in is the exact solve and agrees with implicit."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from fuserec.api import Histories
from fuserec.data.dataset import Dataset
from fuserec.plugins.als import ALS, auto_cg_steps
from fuserec.testing import AlgorithmTests, planted_dataset

SMALL = {"factors": 8, "regularization": 1.0, "alpha": 4.0, "iterations": 10, "num_threads": 1}
# alpha = 1 needs 7 CG steps, alpha = 4 needs 13: the unrolled graph of the kit's export is half as long
KIT = {**SMALL, "alpha": 1.0}


class TestALS(AlgorithmTests):
    algorithm = ALS
    config: ClassVar[dict] = KIT
    bad_configs: ClassVar[list[dict]] = [
        {"factors": 0},
        {"alpha": -1.0},
        {"regularization": 0.0},
        {"cg_steps": 0},
    ]


@pytest.fixture(scope="module")
def data() -> Dataset:
    return planted_dataset()


@pytest.fixture(scope="module")
def fitted(data: Dataset) -> ALS:
    return ALS(SMALL).fit(data)


def _exact(algo: ALS, hist: Histories) -> np.ndarray:
    """Per-user np.linalg.solve of (YᵀY + λI + alpha Σ_h y yᵀ) x = (1 + alpha) Σ_h y: the reference."""
    y = algo.item_factors_.astype(np.float64)
    alpha, gram = algo.config.alpha, y.T @ y + algo.config.regularization * np.eye(y.shape[1])
    x = hist.to_csr()
    out = np.zeros((len(hist), y.shape[1]))
    for u in range(len(hist)):
        yh = y[x[u].indices]
        out[u] = np.linalg.solve(gram + alpha * yh.T @ yh, (1.0 + alpha) * yh.sum(0))
    return out


def test_cg_fold_in_matches_the_exact_solve(fitted: ALS, data: Dataset) -> None:
    hist = data.histories()
    exact = _exact(fitted, hist)
    folded = fitted.user_representation(hist)
    rel = np.linalg.norm(folded - exact, axis=1) / np.maximum(np.linalg.norm(exact, axis=1), 1e-12)
    assert rel.max() < 1e-4, f"CG fold-in relative error {rel.max():.2e} with {fitted.n_cg_steps} steps"
    np.testing.assert_allclose(fitted.score(hist), exact @ fitted.item_factors_.T, rtol=1e-3, atol=1e-4)


def test_too_few_cg_steps_are_visibly_inexact(fitted: ALS, data: Dataset) -> None:
    # Guards the test above: the step count is what buys the accuracy, not a trivially easy system.
    one_step = ALS({**SMALL, "cg_steps": 1})
    one_step.set_state(fitted.get_state())
    one_step.n_items_ = fitted.n_items_
    hist = data.histories()
    exact = _exact(fitted, hist)
    rel = np.linalg.norm(one_step.user_representation(hist) - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert rel.max() > 1e-2


def test_fold_in_of_a_training_history_approximates_implicits_user_factor(data: Dataset) -> None:
    from implicit.cpu.als import AlternatingLeastSquares

    cfg = {**SMALL, "iterations": 30}
    algo = ALS(cfg).fit(data)
    # Plain implicit on the binary matrix: its alpha multiplies, so confidence 1 + a is alpha = 1 + a.
    plain = AlternatingLeastSquares(
        factors=8, regularization=1.0, alpha=1.0 + cfg["alpha"], iterations=30, num_threads=1, random_state=42
    )
    plain.fit(data.matrix(), show_progress=False)
    np.testing.assert_allclose(algo.item_factors_, plain.item_factors, rtol=1e-4, atol=1e-5)
    hist = data.histories()
    folded = algo.user_representation(hist)
    users = plain.user_factors
    cos = (folded * users).sum(1) / (np.linalg.norm(folded, axis=1) * np.linalg.norm(users, axis=1))
    assert cos.mean() > 0.99 and cos.min() > 0.95
    # implicit's own exact recalculation on the final item factors is what the fold-in solves.
    exact = plain.recalculate_user(np.arange(len(hist)), data.matrix())
    np.testing.assert_allclose(folded, exact, rtol=1e-3, atol=1e-4)


def test_empty_history_scores_are_finite_and_duplicates_count_once(fitted: ALS, data: Dataset) -> None:
    hist = Histories.from_lists([[], [1, 2], [1, 2, 2, 1]], data.n_items)
    scores = fitted.score(hist)
    assert np.isfinite(scores).all() and np.all(scores[0] == 0.0)
    np.testing.assert_allclose(scores[1], scores[2], rtol=1e-5, atol=1e-6)
    module = fitted.to_torch()
    import torch

    with torch.no_grad():
        padded = module(torch.from_numpy(hist.to_padded())).numpy()
    np.testing.assert_allclose(padded, scores, rtol=1e-5, atol=1e-6)


def test_auto_cg_steps_follow_the_condition_bound() -> None:
    assert auto_cg_steps(0.0) == 1
    steps = [auto_cg_steps(a) for a in (0.01, 1.0, 10.0, 100.0)]
    assert steps == sorted(steps) and steps[1] <= 10 and steps[2] <= 30


def test_representations(fitted: ALS, data: Dataset) -> None:
    assert fitted.item_representation().shape == (data.n_items, 8)
    assert fitted.user_representation(data.histories()).shape == (data.n_users, 8)
