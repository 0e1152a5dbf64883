"""Feature fusion: the kit's checks, the clear error without representations, blocks and alignment."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from fuserec.plugins.ease import EASE
from fuserec.plugins.fusers.features import FeatureFusion, _align
from fuserec.plugins.userknn import UserKNN
from fuserec.registry import FUSERS_GROUP, available
from fuserec.testing import FuserTests
from fuserec.testing.fusers import default_case

FAST = {"steps": 60, "eval_every": 5, "patience": 4, "dims": 16, "fallback": False}


class TestFeatureFusion(FuserTests):
    fuser = FeatureFusion
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [{"dims": 0}, {"bilinear": "mlp"}, {"item_vectors": "raw"}]


@pytest.fixture(scope="module")
def fitted() -> FeatureFusion:
    case = default_case()
    fuser = FeatureFusion({**FAST, "seed": 0})
    return fuser.fit(case.inner_models, case.inner.fit, case.inner.truth).bind(case.models, case.train)


def test_is_an_entry_point_plugin() -> None:
    assert "features" in available(FUSERS_GROUP)


def test_without_item_representations_the_error_names_the_plugins_that_have_them() -> None:
    case = default_case()
    components = {"ease": EASE().fit(case.inner.fit), "userknn": UserKNN({"k": 10}).fit(case.inner.fit)}
    with pytest.raises(ValueError, match=r"none of the components \['ease', 'userknn'\]") as info:
        FeatureFusion(FAST).fit(components, case.inner.fit, case.inner.truth)
    assert (
        "Plugins that do: " in str(info.value) and "als" in str(info.value) and "content" in str(info.value)
    )


def test_components_without_a_block_are_skipped_and_contribute_nothing() -> None:
    case = default_case()
    components = {**case.inner_models, "ease": EASE().fit(case.inner.fit)}
    fuser = FeatureFusion({**FAST, "steps": 10}).fit(components, case.inner.fit, case.inner.truth)
    assert fuser.blocks_ == ["content", "itemknn", "popularity"]
    fused, parts = fuser.score_with_contributions(case.probe)
    assert not parts[fuser.names_.index("ease")].any()
    np.testing.assert_allclose(parts.sum(axis=0), fused, atol=1e-5)


def test_blocks_are_normalised_and_weighted(fitted: FeatureFusion) -> None:
    for name, table in zip(fitted.blocks_, fitted.reference_, strict=True):
        if table.shape[1] == 1:
            assert np.abs(table).max() == pytest.approx(1.0)
        else:
            norms = np.linalg.norm(table, axis=1)
            assert np.allclose(norms[norms > 0], 1.0, atol=1e-5), name
        assert table.shape[1] <= FAST["dims"]
    case = default_case()
    halved = FeatureFusion({**FAST, "steps": 1, "block_weights": {"content": 0.5, "popularity": 0.0}})
    halved.fit(case.inner_models, case.inner.fit, case.inner.truth)
    assert halved.blocks_ == ["content", "itemknn"]  # weight 0 drops a block
    norms = np.linalg.norm(halved.reference_[0], axis=1)
    assert np.allclose(norms[norms > 0], 0.5, atol=1e-5)
    assert set(fitted.block_weights) == set(fitted.blocks_)


def test_alignment_undoes_a_rotation_and_keeps_the_fitted_scores() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 6)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    np.testing.assert_allclose(
        _align(reference @ rotation.T.astype(np.float32), reference), reference, atol=1e-5
    )
    case = default_case()  # bound to the very components it learned on, aligned and fitted vectors agree
    scores = []
    for mode in ("aligned", "fitted"):
        fuser = FeatureFusion({**FAST, "steps": 10, "item_vectors": mode})
        fuser.fit(case.inner_models, case.inner.fit, case.inner.truth).bind(case.inner_models)
        scores.append(fuser.score(case.probe))
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-4)


def test_validation_record_survives_save_and_load(fitted: FeatureFusion, tmp_path) -> None:
    record = fitted.holdout_ndcg
    assert set(record) == {"fused", "uniform", "best_single"} and all(0 <= v <= 1 for v in record.values())
    back = FeatureFusion.load(fitted.save(tmp_path), fitted.components_)
    assert back.holdout_ndcg == record and back.blocks_ == fitted.blocks_


def test_falls_back_to_the_best_component_when_the_scorer_loses_on_held_out_users(tmp_path) -> None:
    case = default_case()
    fuser = FeatureFusion({**FAST, "fallback": True, "seed": 0})
    fuser.fit(case.inner_models, case.inner.fit, case.inner.truth).bind(case.models, case.train)
    record = fuser.holdout_ndcg
    assert (fuser.fallback_ >= 0) == (record["fused"] <= record["best_single"])
    assert fuser.served_alone == (fuser.names_[fuser.fallback_] if fuser.fallback_ >= 0 else None)
    fuser.fallback_ = fuser.names_.index("itemknn")  # the branch a losing scorer takes
    assert fuser.served_alone == "itemknn"
    np.testing.assert_allclose(fuser.score(case.probe), case.models["itemknn"].score(case.probe), rtol=1e-6)
    back = FeatureFusion.load(fuser.save(tmp_path), fuser.components_)
    assert back.fallback_ == fuser.fallback_


def test_the_fallback_rule_picks_the_best_component_on_the_held_out_rows_only() -> None:
    from fuserec.listwise import fallback_component

    class Val:  # two components, four users: the first is better on rows 0-1, the second on rows 2-3
        scores = torch.zeros(2, 4, 3)

        @staticmethod
        def ndcg(scores: torch.Tensor, rows: np.ndarray) -> float:
            return float(scores.sum())

    Val.scores[0, :2] = 5.0
    Val.scores[1, 2:] = 1.0
    lost = {"holdout_rows": np.array([2, 3]), "holdout_fused": 0.1, "holdout_best_single": 0.2}
    assert fallback_component(Val, lost, enabled=True) == 1
    assert fallback_component(Val, lost, enabled=False) == -1
    assert fallback_component(Val, {**lost, "holdout_fused": 0.3}, enabled=True) == -1
    assert fallback_component(Val, {**lost, "holdout_rows": np.array([], np.int64)}, enabled=True) == -1
