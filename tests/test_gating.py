"""Gating: the kit's checks, weights that sum to 1, the no-signal rule, what the network reads."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from fuserec.fusion import masked_zscore
from fuserec.histories import Histories
from fuserec.plugins.fusers.gating import USER_FEATURES, Gating
from fuserec.registry import FUSERS_GROUP, available
from fuserec.testing import FuserTests
from fuserec.testing.fusers import default_case

FAST = {"steps": 60, "eval_every": 5, "patience": 4, "hidden": 8, "fallback": False}


class TestGating(FuserTests):
    fuser = Gating
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [{"hidden": 0}, {"holdout": 1.0}, {"learning_rate": 0.0}]


class TestGatingWithoutColdCopies(TestGating):
    """The same kit learning from the real validation users only (cold copies are on by default)."""

    config: ClassVar[dict] = {**FAST, "cold_copies": 0.0}
    bad_configs: ClassVar[list[dict]] = [{"cold_copies": -0.1}, {"cold_copies": 1.5}]


@pytest.fixture(scope="module")
def fitted() -> Gating:
    case = default_case()
    fuser = Gating({**FAST, "seed": 0})
    return fuser.fit(case.inner_models, case.inner.fit, case.inner.truth).bind(case.models, case.train)


def test_is_an_entry_point_plugin() -> None:
    assert "gating" in available(FUSERS_GROUP)


def test_weights_sum_to_one_and_are_the_contributions_share(fitted: Gating) -> None:
    hist = default_case().probe
    weights = fitted.weights_for(hist)
    assert weights.shape == (len(hist), len(fitted.names_))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert (weights >= 0).all()
    _, parts = fitted.score_with_contributions(hist)
    seen = torch.from_numpy(hist.to_csr().toarray() > 0)
    z = masked_zscore(fitted.component_scores(hist), seen).numpy()
    np.testing.assert_allclose(parts, weights.T[:, :, None] * z, atol=1e-5)


def test_a_component_without_signal_gets_zero_weight(fitted: Gating) -> None:
    """Item-kNN scores an empty history with zeros: no signal, so weight 0, the others renormalised."""
    hist = Histories.from_lists([[], [0, 1, 2]], fitted.n_items_)
    knn = fitted.names_.index("itemknn")
    assert np.ptp(fitted.components_["itemknn"].score(hist.select([0]))) == 0.0
    weights = fitted.weights_for(hist)
    assert weights[0, knn] == 0.0
    assert weights[0].sum() == pytest.approx(1.0, abs=1e-6)
    assert weights[1, knn] > 0.0  # a real history: item-kNN speaks again
    fused, parts = fitted.score_with_contributions(hist)
    assert not parts[knn, 0].any() and np.isfinite(fused).all()


def test_features_are_named_finite_and_read_the_history(fitted: Gating) -> None:
    hist = Histories.from_lists([[], [0], [0, 1, 2, 3, 4, 5]], fitted.n_items_)
    seen = torch.from_numpy(hist.to_csr().toarray() > 0)
    scores = fitted.component_scores(hist)
    x, signal = fitted.user_features(scores, seen, masked_zscore(scores, seen))
    assert x.shape == (3, len(fitted.feature_names)) and fitted.feature_names[:3] == list(USER_FEATURES)
    assert torch.isfinite(x).all()
    assert x[:, 0].tolist() == pytest.approx(np.log1p([0, 1, 6]).tolist())
    assert float(x[0, 2]) == 0.0 and float(x[1, 2]) == pytest.approx(0.0, abs=1e-5)  # one item: no spread
    assert signal.shape == (3, len(fitted.names_))


def test_validation_record_survives_save_and_load(fitted: Gating, tmp_path) -> None:
    record = fitted.holdout_ndcg
    assert set(record) == {"fused", "uniform", "best_single"} and all(0 <= v <= 1 for v in record.values())
    back = Gating.load(fitted.save(tmp_path), fitted.components_)
    assert back.holdout_ndcg == record and back.training_["steps"] == fitted.training_["steps"]


def test_falls_back_to_the_best_component_when_gating_loses_on_held_out_users() -> None:
    case = default_case()
    fuser = Gating({**FAST, "fallback": True, "seed": 0}).fit(
        case.inner_models, case.inner.fit, case.inner.truth
    )
    record = fuser.holdout_ndcg
    assert (fuser.fallback_ >= 0) == (record["fused"] <= record["best_single"])
    fuser.bind(case.models, case.train)
    fuser.fallback_ = fuser.names_.index("itemknn")  # the branch a losing gate takes
    np.testing.assert_allclose(fuser.score(case.probe), case.models["itemknn"].score(case.probe), rtol=1e-6)
    weights = fuser.weights_for(case.probe)
    assert (weights[:, fuser.fallback_] == 1.0).all() and weights.sum() == len(case.probe)
