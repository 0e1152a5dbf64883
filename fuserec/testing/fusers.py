"""``FuserTests``: the aggregate pytest class every fuser's tests subclass, like ``AlgorithmTests``.

The components are small built-ins fitted on the planted dataset: the fuser learns on an inner
validation carve of the training part (components fitted on train'), is bound to the components refitted
on the training part, and is checked on the held-out part, the same protocol as the fuse stage.
"""

from __future__ import annotations

import tempfile
from functools import cache
from typing import Any, ClassVar

import numpy as np
import pytest

from fuserec.api import Algorithm
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.fusion import STATE_FILE, Fuser
from fuserec.histories import Histories
from fuserec.metrics import evaluate_scores
from fuserec.splitting import Carve, carve_validation
from fuserec.testing import checks
from fuserec.testing.data import planted_dataset


class FusionCase:
    """The planted data split twice (train/test, then train'/validation) and the fitted components."""

    def __init__(self, components: dict[str, tuple[type[Algorithm], dict[str, Any]]]) -> None:
        data = planted_dataset()
        outer = carve_validation(data)
        assert outer is not None
        inner = carve_validation(outer.fit)
        assert inner is not None
        self.outer: Carve = outer
        self.inner: Carve = inner
        self.train: Dataset = outer.fit
        self.inner_models = {n: cls(cfg).fit(inner.fit) for n, (cls, cfg) in components.items()}
        self.models = {n: cls(cfg).fit(outer.fit) for n, (cls, cfg) in components.items()}
        self.probe: Histories = checks.probe_histories(outer.fit)

    def fit(self, cls: type[Fuser], config: dict[str, Any] | None) -> Fuser:
        fuser = cls(cls.Config.model_validate({**(config or {}), "seed": 0}))
        return fuser.fit(self.inner_models, self.inner.fit, self.inner.truth).bind(self.models, self.train)

    def test_ndcg(self, scorer: Any) -> float:
        data, truth = self.train, self.outer.truth
        hist = data.histories()
        metrics, _ = evaluate_scores(
            lambda rows: scorer.score(hist.select(rows)),
            np.unique(truth["user"].to_numpy()),
            data.matrix(),
            interactions_matrix(truth, data.n_users, data.n_items),
            [10],
            data.item_popularity(),
        )
        return float(metrics["ndcg@10"])


@cache
def default_case() -> FusionCase:
    """The case with the default components, built once per process (fits are the slow part)."""
    return FusionCase(_components())


def _components() -> dict[str, tuple[type[Algorithm], dict[str, Any]]]:
    from fuserec.plugins.content import Content
    from fuserec.plugins.itemknn import ItemKNN
    from fuserec.plugins.popularity import Popularity

    return {"popularity": (Popularity, {}), "itemknn": (ItemKNN, {"k": 20}), "content": (Content, {})}


class FuserTests:
    """Subclass and set ``fuser`` (optionally ``config``, ``bad_configs``, ``components``)."""

    fuser: ClassVar[type[Fuser]]
    config: ClassVar[dict[str, Any] | None] = None
    bad_configs: ClassVar[list[dict[str, Any]]] = []
    components: ClassVar[dict[str, tuple[type[Algorithm], dict[str, Any]]] | None] = None
    parity_tolerance: ClassVar[float] = 1e-4

    @pytest.fixture(scope="class")
    def case(self) -> FusionCase:
        return FusionCase(self.components) if self.components else default_case()

    @pytest.fixture(scope="class")
    def fitted(self, case: FusionCase) -> Fuser:
        return case.fit(self.fuser, self.config)

    def test_config_round_trips_and_rejects_bad_values(self) -> None:
        checks.check_config(self.fuser, self.config, self.bad_configs)  # type: ignore[arg-type]

    def test_scores_shape_dtype_finite(self, fitted: Fuser, case: FusionCase) -> None:
        checks.check_scores(fitted, case.probe)  # type: ignore[arg-type]

    def test_contributions_add_up_to_the_fused_score(self, fitted: Fuser, case: FusionCase) -> None:
        fused, parts = fitted.score_with_contributions(case.probe)
        if parts.shape != (len(fitted.components_), *fused.shape):
            checks._fail(
                self.fuser,  # type: ignore[arg-type]
                "contributions shape",
                f"got {parts.shape}, expected {(len(fitted.components_), *fused.shape)}",
                "return contributions [M, B, n_items], one slice per component in names_ order",
            )
        if not np.allclose(parts.sum(axis=0), fused, rtol=1e-5, atol=1e-5):
            checks._fail(
                self.fuser,  # type: ignore[arg-type]
                "contributions add up",
                "sum over components != fused score",
                "make combine() return the per-component terms whose sum is the fused score",
            )

    def test_fit_is_deterministic(self, case: FusionCase) -> None:
        a = case.fit(self.fuser, self.config).score(case.probe)
        b = case.fit(self.fuser, self.config).score(case.probe)
        if not np.allclose(a, b, atol=1e-6):
            checks._fail(
                self.fuser,  # type: ignore[arg-type]
                "deterministic fit",
                "two fits with the same seed score differently",
                "derive every random generator (searches included) from config.seed",
            )

    def test_save_load_and_bind(self, fitted: Fuser, case: FusionCase) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            fitted.save(tmp)
            with np.load(f"{tmp}/{STATE_FILE}", allow_pickle=False) as npz:
                _ = [npz[k] for k in npz.files]
            back = type(fitted).load(tmp, case.models)
            unbound = type(fitted).load(tmp)
        if not np.allclose(back.score(case.probe), fitted.score(case.probe), atol=1e-6):
            checks._fail(
                self.fuser,  # type: ignore[arg-type]
                "save/load round-trip",
                "the loaded fuser scores differently",
                "put every fitted array of the combination in get_state() and restore it in set_state()",
            )
        with pytest.raises(ValueError, match="train them"):
            unbound.bind({})  # bound to missing components: a clear error, not a KeyError later

    def test_onnx_export_matches_python(self, fitted: Fuser, case: FusionCase) -> None:
        checks.check_onnx_parity(fitted, case.probe, self.parity_tolerance)  # type: ignore[arg-type]

    def test_beats_popularity_on_held_out_data(self, fitted: Fuser, case: FusionCase) -> None:
        fused, popular = case.test_ndcg(fitted), case.test_ndcg(case.models["popularity"])
        if fused <= popular:
            checks._fail(
                self.fuser,  # type: ignore[arg-type]
                "fusion uses its components",
                f"held-out NDCG@10 {fused:.4f} <= popularity's {popular:.4f}",
                "check that combine() reads every component's scores per user",
            )
