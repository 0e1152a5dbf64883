"""Every built-in passes the public conformance kit; the kit catches a broken algorithm."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from fuserec.api import Histories
from fuserec.plugins.itemknn import ItemKNN
from fuserec.plugins.popularity import Popularity
from fuserec.testing import AlgorithmTests, ConformanceError, checks, planted_dataset


class TestPopularity(AlgorithmTests):
    algorithm = Popularity

    def test_recovers_planted_structure(self, data) -> None:
        # Popularity is the baseline of this check: it cannot beat itself, and the kit must say so.
        with pytest.raises(ConformanceError, match="planted structure"):
            checks.check_planted_structure(Popularity, None, data)


class TestItemKNN(AlgorithmTests):
    algorithm = ItemKNN
    config: ClassVar[dict] = {"k": 20}
    bad_configs: ClassVar[list[dict]] = [{"k": 0}, {"shrinkage": -1.0}]


class _IgnoresHistory(Popularity):
    """Broken on purpose: random scores (not seeded), float64, and not saved."""

    def score(self, histories: Histories) -> np.ndarray:
        return np.random.default_rng().random((len(histories), self.n_items_ + 1))


class _NotSeeded(ItemKNN):
    def fit(self, data):
        super().fit(data)
        self.weights_ = self.weights_ * np.random.default_rng().random(self.weights_.shape).astype(np.float32)
        self._matrix = None
        return self


def test_kit_catches_wrong_shape_with_a_fix() -> None:
    data = planted_dataset()
    algo = _IgnoresHistory().fit(data)
    with pytest.raises(ConformanceError, match=r"score shape.*To fix"):
        checks.check_scores(algo, checks.probe_histories(data))


def test_kit_catches_nondeterminism_and_unexported_state() -> None:
    data = planted_dataset()
    with pytest.raises(ConformanceError, match="deterministic fit"):
        checks.check_deterministic(_NotSeeded, {"k": 10}, data, checks.probe_histories(data))


def test_kit_catches_accepted_bad_config() -> None:
    with pytest.raises(ConformanceError, match="was accepted"):
        checks.check_config(ItemKNN, None, [{"shrinkage": 1.0}])


def test_kit_catches_onnx_mismatch() -> None:
    class _WrongExport(ItemKNN):
        def to_torch(self):
            return Popularity().fit(planted_dataset()).to_torch()

    data = planted_dataset()
    with pytest.raises(ConformanceError, match="ONNX parity"):
        checks.check_onnx_parity(_WrongExport({"k": 10}).fit(data), checks.probe_histories(data))


def test_kit_catches_contributions_that_the_served_graph_misattributes() -> None:
    import torch

    from fuserec.plugins.fusers.weighted import Weighted
    from fuserec.testing.fusers import default_case

    class _SwappedShares(Weighted):
        def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fused, parts = super().combine(scores, seen)
            if torch.onnx.is_in_onnx_export():  # same fused scores, shares credited to the wrong models
                parts = parts.flip(0)
            return fused, parts

    case = default_case()
    fuser = _SwappedShares({"normalization": "zscore", "n_trials": 5})
    fitted = fuser.fit(case.inner_models, case.inner.fit, case.inner.truth).bind(case.models, case.train)
    with pytest.raises(ConformanceError, match="ONNX contributions"):
        checks.check_onnx_parity(fitted, case.probe)


def test_kit_catches_misattributed_shares_of_a_rank_based_fuser() -> None:
    """Rank-based fusers may serve another score where tied items swap; never other shares of one score."""
    import torch

    from fuserec.plugins.fusers.voting import Borda
    from fuserec.testing.fusers import default_case

    class _SwappedBorda(Borda):
        def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fused, parts = super().combine(scores, seen)
            if torch.onnx.is_in_onnx_export():
                parts = parts.flip(0)
            return fused, parts

    case = default_case()
    with pytest.raises(ConformanceError, match="ONNX contributions"):
        checks.check_onnx_parity(case.fit(_SwappedBorda, None), case.probe)
    checks.check_onnx_parity(case.fit(Borda, None), case.probe)  # the same fuser, shares as in Python


def test_rank_based_shares_may_move_with_the_score_but_must_add_up() -> None:
    from fuserec.parity import contributions_agree

    moved = {
        "contributions_match_at_top": False,
        "contributions_match_where_scores_match": True,
        "contributions_add_up": True,
    }
    assert contributions_agree(moved, exact=False) and not contributions_agree(moved, exact=True)
    assert not contributions_agree(moved | {"contributions_add_up": False}, exact=False)
    assert not contributions_agree(moved | {"contributions_match_where_scores_match": False}, exact=False)
