"""Stacking: the kit's checks, the tree walk against LightGBM, the time features' no-look-ahead rule."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from fuserec.data.dataset import Dataset
from fuserec.fusion import ValidationScores
from fuserec.histories import Histories
from fuserec.plugins.fusers.stacking import CONTEXT_FEATURES, NEVER, Stacking
from fuserec.testing import FuserTests
from fuserec.testing.fusers import default_case
from fuserec.trees import average_arrays, base_value, booster_arrays, leaf_tables, predict_trees

FAST = {"n_estimators": 60, "folds": 3, "min_child_samples": 10, "early_stopping": 10}


class TestStacking(FuserTests):
    fuser = Stacking
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [{"candidates": 0}, {"folds": 1}, {"learning_rate": 0.0}]


class TestStackingWithoutColdCopies(TestStacking):
    """The same kit learning from the real validation users only (cold copies are on by default)."""

    config: ClassVar[dict] = {**FAST, "cold_copies": 0.0}
    bad_configs: ClassVar[list[dict]] = [{"cold_copies": -0.1}]


@pytest.fixture(scope="module")
def fitted() -> Stacking:
    case = default_case()
    fuser = Stacking({**FAST, "seed": 0, "fallback": False})  # the ranker itself, even where it loses
    return fuser.fit(case.inner_models, case.inner.fit, case.inner.truth).bind(case.models, case.train)


def test_tree_walk_equals_lightgbm_predictions() -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5)).astype(np.float32)
    x[:, 2] = np.round(x[:, 2])  # values equal to thresholds must go the same way
    y = (x[:, 0] + x[:, 2] * x[:, 1] > 0.3).astype(float) + (x[:, 3] > 1)
    booster = lgb.train(
        {"objective": "lambdarank", "num_leaves": 7, "verbose": -1, "min_child_samples": 5},
        lgb.Dataset(x, y, group=[30] * 20),
        num_boost_round=25,
    )
    arrays = booster_arrays(booster, 5)
    tables = {k: torch.from_numpy(v) for k, v in leaf_tables(arrays, 5).items()}
    out, attributions = predict_trees(tables, torch.from_numpy(x))
    # leaves are chosen exactly (rows on a threshold included); the sums run in float32
    np.testing.assert_allclose(out.numpy(), booster.predict(x), rtol=1e-5, atol=1e-5)
    leaf = booster.predict(x, pred_leaf=True)
    slots = tables["paths"].shape[2]
    onehot = np.zeros((len(x), leaf.shape[1] * slots))
    onehot[np.arange(len(x))[:, None], np.arange(leaf.shape[1]) * slots + leaf] = 1.0
    chosen = (torch.from_numpy(onehot).float() @ tables["leaf"])[:, 0].numpy()
    np.testing.assert_allclose(out.numpy(), chosen, rtol=1e-6, atol=1e-6)
    base = base_value({k: torch.from_numpy(v) for k, v in arrays.items()}).item()
    np.testing.assert_allclose(base + attributions.sum(1).numpy(), out.numpy(), rtol=1e-5, atol=1e-5)


def test_averaged_boosters_predict_their_mean_with_attributions_that_add_up() -> None:
    import lightgbm as lgb

    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] * x[:, 2] > 0.2).astype(float)
    boosters = [
        lgb.train(
            {
                "objective": "lambdarank",
                "num_leaves": leaves,
                "bagging_fraction": 0.7,
                "bagging_freq": 1,
                "seed": seed,
                "verbose": -1,
                "min_child_samples": 5,
            },
            lgb.Dataset(x, y, group=[20] * 20),
            num_boost_round=rounds,
        )
        for seed, leaves, rounds in ((0, 7, 12), (1, 4, 20), (2, 9, 5))  # unequal widths and tree counts
    ]
    arrays = average_arrays([booster_arrays(b, 4) for b in boosters])
    assert arrays["value"].shape[0] == 12 + 20 + 5
    tables = {k: torch.from_numpy(v) for k, v in leaf_tables(arrays, 4).items()}
    out, attributions = predict_trees(tables, torch.from_numpy(x))
    expected = np.mean([b.predict(x) for b in boosters], axis=0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    base = base_value({k: torch.from_numpy(v) for k, v in arrays.items()}).item()
    np.testing.assert_allclose(base + attributions.sum(1).numpy(), out.numpy(), rtol=1e-5, atol=1e-5)


def test_features_are_named_and_finite(fitted: Stacking) -> None:
    case = default_case()
    hist = case.probe
    scores = fitted.component_scores(hist)
    seen = torch.from_numpy(hist.to_csr().toarray() > 0)
    x, flat, _ = fitted.candidate_features(scores, seen, torch.from_numpy(fitted.history_time(hist)))
    assert x.shape == (len(flat), len(fitted.feature_names))
    assert len(fitted.feature_names) == 2 * len(fitted.names_) + len(CONTEXT_FEATURES)
    assert torch.isfinite(x).all()
    assert set(fitted.importance) == set(fitted.feature_names)


def test_candidates_are_the_union_of_top_n_each_scored_once(fitted: Stacking) -> None:
    """One row per (user, item) however many components chose it: the rows are what the trees cost."""
    hist = default_case().probe
    scores = fitted.component_scores(hist)
    seen = torch.from_numpy(hist.to_csr().toarray() > 0)
    _, flat, _ = fitted.candidate_features(scores, seen, torch.from_numpy(fitted.history_time(hist)))
    n, top_n = fitted.n_items_, fitted.config.candidates
    assert torch.all(flat[1:] > flat[:-1])  # distinct, ordered by user then item
    for u in range(len(hist)):
        unseen = np.flatnonzero(~seen[u].numpy())
        union: set[int] = set()
        for m in range(scores.shape[0]):
            order = np.argsort(-scores[m, u, unseen].numpy(), kind="stable")  # protocol ties: lower index
            union |= set(unseen[order[:top_n]].tolist())
        own = flat[(flat >= u * n) & (flat < (u + 1) * n)] - u * n
        assert set(own.tolist()) == union


def _tiny(times: list[int]) -> Dataset:
    frame = pd.DataFrame(
        {"user": [0, 1, 1, 2], "item": [0, 1, 2, 2], "rating": np.nan, "timestamp": np.asarray(times)}
    )
    items = pd.DataFrame({"item": range(4), "item_id": range(4), "genres": ["a", "b", "a|b", "b"]})
    users = pd.DataFrame({"user": range(3), "user_id": range(3)})
    return Dataset(frame, items, users)


def test_time_features_never_read_later_interactions() -> None:
    """docs/protocol.md: a user's features may only use interactions dated at or before their latest event."""
    day = 86_400
    fuser = Stacking({"recent_days": 2})
    fuser.names_, fuser.n_items_ = ["a"], 4
    fuser.observe(_tiny([0, 10 * day, 20 * day, 30 * day]))
    assert fuser.tables_["first_seen"][3] == NEVER
    scores = torch.arange(4, dtype=torch.float32).expand(1, 2, 4).contiguous()
    seen = torch.zeros(2, 4, dtype=torch.bool)
    when = torch.tensor([15 * day, 40 * day])
    x, flat, _ = fuser.candidate_features(scores, seen, when)
    col = {name: i for i, name in enumerate(fuser.feature_names)}
    rows = {(int(f) // 4, int(f) % 4): row for f, row in zip(flat, x, strict=True)}
    at = {i: row for (u, i), row in rows.items() if u == 0}
    # item 2's positives are at day 20 and 30, after day 15: no age, no popularity then
    assert at[2][col["age_days"]] == -1.0 and at[2][col["log_popularity_then"]] == 0.0
    assert at[1][col["age_days"]] == pytest.approx(5.0)  # first positive at day 10
    later = {i: row for (u, i), row in rows.items() if u == 1}
    assert later[2][col["log_popularity_then"]] == pytest.approx(np.log1p(2.0))
    assert later[2][col["log_recent_popularity"]] == 0.0  # nothing in the 2 days before day 40


def test_exported_graph_reads_last_time(fitted: Stacking, tmp_path) -> None:
    from fuserec.onnx_model import OnnxRecommender, export_onnx

    session = OnnxRecommender(export_onnx(fitted, tmp_path / "model.onnx", k=5))
    hist = default_case().probe
    with pytest.raises(ValueError, match="last_time"):
        session.run(hist.to_padded())
    early, late = (np.full(len(hist), t, dtype=np.int64) for t in (fitted.reference_time_ - 10**7, 2**40))
    a, b = session.run(hist.to_padded(), early)[0], session.run(hist.to_padded(), late)[0]
    assert a.shape == b.shape == (len(hist), fitted.n_items_)
    assert not np.allclose(a, b)  # the time input reaches the features


def test_history_time_falls_back_to_the_data_end(fitted: Stacking) -> None:
    hist = Histories.from_lists([[0], []], fitted.n_items_, timestamps=[[123], []])
    assert fitted.history_time(hist).tolist() == [123, fitted.reference_time_]


def test_validation_estimate_is_recorded(fitted: Stacking) -> None:
    assert 0.0 <= fitted.cv_ndcg_ <= 1.0 and 0.0 <= fitted.cv_best_single_ <= 1.0
    assert fitted.rounds_ >= 1


def test_falls_back_to_the_best_component_when_the_ranker_does_not_win() -> None:
    case = default_case()
    fuser = Stacking({**FAST, "seed": 0}).fit(case.inner_models, case.inner.fit, case.inner.truth)
    assert (fuser.fallback_ >= 0) == (fuser.cv_ndcg_ <= fuser.cv_best_single_)
    fuser.bind(case.models, case.train)
    fuser.fallback_ = fuser.names_.index("itemknn")  # the branch a losing ranker takes
    np.testing.assert_allclose(fuser.score(case.probe), case.models["itemknn"].score(case.probe), rtol=1e-6)


def test_components_the_trees_barely_read_are_pruned_and_the_graph_still_matches() -> None:
    from fuserec.testing import checks

    case = default_case()
    full = case.fit(Stacking, {**FAST, "fallback": False, "prune_share": 0.0})
    shares = full.component_shares()
    assert set(shares) == set(full.names_) and sum(shares.values()) <= 1.0 + 1e-9
    top = max(shares, key=shares.__getitem__)
    # a bar only the most-read component clears, and any out-of-fold loss accepted: only it remains
    pruned = case.fit(Stacking, {**FAST, "fallback": False, "prune_share": 0.99, "prune_tolerance": 1.0})
    assert pruned.names_ == [top] and sorted(pruned.pruned_) == sorted(n for n in full.names_ if n != top)
    assert pruned.cv_unpruned_ == pytest.approx(full.cv_ndcg_)
    report = checks.check_onnx_parity(pruned, case.probe)  # the served graph reads only what is kept
    assert report["contributions_match_at_top"]
    # no loss accepted and a bar everyone but the top misses: pruning happens only if it costs nothing
    strict = case.fit(Stacking, {**FAST, "fallback": False, "prune_share": 0.99, "prune_tolerance": 0.0})
    assert strict.names_ == full.names_ or strict.cv_ndcg_ >= full.cv_ndcg_


def test_pruning_goes_as_far_as_the_tolerance_allows_and_keeps_the_last_step_that_held() -> None:
    """Shares tried at a quarter, half, then all of prune_share: a refused step leaves the one before."""
    case = default_case()
    names = case.fit(Stacking, {**FAST, "fallback": False, "prune_share": 0.0}).names_
    n = len(names)
    assert n >= 3
    shares = {names[0]: 0.05, names[1]: 0.15} | {m: 0.8 / (n - 2) for m in names[2:]}
    cv = {n: 0.30, n - 1: 0.299, n - 2: 0.29}  # one component less holds within 0.002, two do not

    class Scripted(Stacking):
        def component_shares(self) -> dict[str, float]:
            return {m: shares[m] for m in self.names_}

        def _learn(self, val: ValidationScores, last: torch.Tensor) -> None:
            super()._learn(val, last)
            self.fallback_, self.cv_ndcg_ = -1, cv.get(len(self.names_), 0.0)

    fitted = case.fit(Scripted, {**FAST, "fallback": False, "prune_share": 0.4, "prune_tolerance": 0.002})
    assert fitted.names_ == names[1:] and fitted.pruned_ == [names[0]]
    assert fitted.cv_unpruned_ == 0.30 and fitted.cv_pruned_ == 0.299 == fitted.cv_ndcg_
