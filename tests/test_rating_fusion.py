"""Fused rating prediction (:mod:`fuserec.rating_fusion`): honest out-of-fold rows, fusers, the served graph.

Components here are small raters defined in this file (registered for the test through a patched
``get_rater``), so the tests do not depend on the built-in raters' served forms and run in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import fuserec.registry as registry
from fuserec.histories import Histories
from fuserec.plugins.rating_fusers.blend import Blend
from fuserec.plugins.rating_fusers.per_user import PerUser
from fuserec.rating import RatingAlgorithm, RatingConfig, RatingData, history_rows
from fuserec.rating_ensemble import RatingEnsemble
from fuserec.rating_fusion import (
    OutOfFold,
    fit_rating_ensemble,
    fold_ids,
    make_fuser,
    out_of_fold,
    select_predictor,
)
from fuserec.rating_meta import META_FEATURES, ItemStats, MetaModule, grid_meta, pair_meta
from fuserec.testing.ratings import planted_ratings

SUPPORT = META_FEATURES.index("user_support")
ITEM_SUPPORT = META_FEATURES.index("item_support")


# -- small raters with served forms -----------------------------------------------------------------
class ShrinkConfig(RatingConfig):
    shrink: float = 5.0


class HistoryMean(RatingAlgorithm):
    """The history's mean rating plus the item's shrunk offset from the global mean."""

    Config = ShrinkConfig
    config: ShrinkConfig
    uses_history = True

    def fit_ratings(self, data: RatingData) -> None:
        self.mu_ = data.global_mean
        counts = np.bincount(data.items, minlength=data.n_items)
        sums = np.bincount(data.items, data.ratings - self.mu_, data.n_items)
        self.offset_ = sums / (counts + self.config.shrink)

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        assert histories.ratings is not None
        n = histories.lengths
        sums = np.bincount(history_rows(histories), histories.ratings.astype(np.float64), len(histories))
        mean = (
            np.where(n > 0, sums / np.maximum(n, 1), self.mu_)
            if self.uses_history
            else np.full(len(n), self.mu_)
        )
        return mean[:, None] + self.offset_[items]

    def to_torch(self) -> torch.nn.Module:
        return _MeanModule(self.mu_, self.offset_, self.uses_history)

    def model_state(self) -> dict[str, np.ndarray]:
        return {"mu": np.asarray(self.mu_), "offset": self.offset_}

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.mu_, self.offset_ = float(state["mu"]), np.asarray(state["offset"])


class ItemMean(HistoryMean):
    """The item's shrunk mean: ignores the history."""

    uses_history = False


class _MeanModule(torch.nn.Module):
    def __init__(self, mu: float, offset: np.ndarray, uses_history: bool) -> None:
        super().__init__()
        self.mu, self.uses_history = mu, uses_history
        self.register_buffer("offset", torch.from_numpy(offset))

    def forward(self, history: torch.Tensor, ratings: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        offset: torch.Tensor = self.offset  # type: ignore[assignment]
        valid = (history >= 0) & (history < offset.shape[0])
        n = valid.to(torch.float64).sum(1)
        total = torch.where(valid, ratings.to(torch.float64), torch.zeros((), dtype=torch.float64)).sum(1)
        mean = torch.where(n > 0, total / torch.clamp(n, min=1.0), torch.full_like(n, self.mu))
        if not self.uses_history:
            mean = torch.full_like(n, self.mu)
        return (mean[:, None] + offset[items]).to(torch.float32)


class Peek(RatingAlgorithm):
    """Cheats wherever it can: the rating itself if the item is in the history or was in its training data.

    Out-of-fold predictions of it must never find the rating: they then fall back to 3.
    """

    def fit_ratings(self, data: RatingData) -> None:
        self.seen_ = np.zeros((data.n_users, data.n_items))
        self.seen_[data.users, data.items] = data.ratings

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        assert histories.ratings is not None and histories.users is not None
        out = self.seen_[histories.users[:, None], items]
        for b in range(len(histories)):
            own = histories.ratings[histories.indptr[b] : histories.indptr[b + 1]]
            rated = dict(zip(histories.user(b).tolist(), own.tolist(), strict=True))
            for j, item in enumerate(items[b].tolist()):
                out[b, j] = rated.get(item, out[b, j])
        return np.where(out > 0, out, 3.0)

    def model_state(self) -> dict[str, np.ndarray]:
        return {"seen": self.seen_}

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.seen_ = state["seen"]


TEST_RATERS: dict[str, type[RatingAlgorithm]] = {
    "history_mean": HistoryMean,
    "item_mean": ItemMean,
    "peek": Peek,
}


@pytest.fixture
def test_raters(monkeypatch: pytest.MonkeyPatch) -> None:
    real = registry.get_rater
    monkeypatch.setattr(registry, "get_rater", lambda name: TEST_RATERS.get(name) or real(name))


@pytest.fixture(scope="module")
def planted() -> Any:
    return planted_ratings(n_users=120, n_items=60, density=0.35, seed=3)


def synthetic(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random component predictions, plausible meta-features, a truth and user groups (no target yet)."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(1.5, 4.5, n)
    meta = np.zeros((n, len(META_FEATURES)))
    meta[:, SUPPORT] = np.log1p(rng.choice([5, 50, 500], n))
    meta[:, ITEM_SUPPORT] = np.log1p(rng.integers(1, 60, n))
    return truth, meta, rng.normal(size=(n, 3)), rng.integers(0, 200, n)


def padded_inputs(histories: Histories, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The served graph's inputs: history padded with -1, its ratings aligned (``fill`` on padding)."""
    padded = histories.to_padded()
    ratings = np.full(padded.shape, fill, np.float32)
    assert histories.ratings is not None
    for b in range(len(histories)):
        n = histories.lengths[b]
        ratings[b, :n] = histories.ratings[histories.indptr[b] : histories.indptr[b] + n]
    return torch.from_numpy(padded), torch.from_numpy(ratings)


# -- out-of-fold rows -------------------------------------------------------------------------------
def test_out_of_fold_predictions_never_see_their_own_rating(planted: Any, test_raters: None) -> None:
    frame = planted.frame
    oof = out_of_fold(frame, planted.n_users, planted.n_items, {"peek": None}, folds=4, seed=1)
    assert len(oof.frame) == len(frame) and set(oof.frame["fold"]) == {0, 1, 2, 3}
    assert np.all(oof.predictions[:, 0] == 3.0), "an out-of-fold prediction found its own rating"
    # the test can fail: fitted on everything, the same rater finds every rating
    whole = Peek().fit(frame, planted.n_users, planted.n_items)
    histories = RatingData.from_frame(frame, planted.n_users, planted.n_items).histories()
    cheat = whole.predict_pairs(histories, frame["user"].to_numpy(), frame["item"].to_numpy())
    np.testing.assert_allclose(cheat, frame["rating"].to_numpy(), atol=1e-6)
    # meta-features come from the other folds too: the row's own rating is not counted
    for k in range(4):
        rows = oof.frame[oof.frame["fold"] == k]
        rest = oof.frame[oof.frame["fold"] != k]
        users, items = rows["user"].to_numpy(), rows["item"].to_numpy()
        n_user = np.bincount(rest["user"], minlength=planted.n_users)[users]
        n_item = np.bincount(rest["item"], minlength=planted.n_items)[items]
        np.testing.assert_allclose(rows["meta:user_support"], np.log1p(n_user))
        np.testing.assert_allclose(rows["meta:item_support"], np.log1p(n_item))


def test_single_carve_predicts_a_share_of_the_ratings() -> None:
    folds = fold_ids(10_000, 5, seed=0, crossfit=False, carve=0.1)
    assert set(np.unique(folds)) == {-1, 0} and 0.08 < (folds == 0).mean() < 0.12
    folds = fold_ids(10_000, 5, seed=0)
    assert np.bincount(folds).tolist() == [2000] * 5


def test_meta_features_numpy_and_torch_agree(planted: Any) -> None:
    frame = planted.frame
    stats = ItemStats.from_frame(frame, planted.n_items)
    some = RatingData.from_frame(frame, planted.n_users, planted.n_items).histories().select([0, 1, 2])
    # and an empty history: the global mean, no spread
    histories = Histories(
        np.append(some.indptr, some.indptr[-1]), some.items, some.n_items, None, some.ratings
    )
    items = np.arange(8).reshape(4, 2)
    expected = grid_meta(histories, items, stats)
    history, ratings = padded_inputs(histories, fill=np.nan)  # padding may hold anything
    got = MetaModule(stats)(history, ratings, torch.from_numpy(items))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert expected[3, 0, 0] == 0.0 and expected[3, 0, 1] == pytest.approx(stats.global_mean)
    rows = np.array([0, 3]), np.array([1, 6])  # items[0, 1] and items[3, 0]
    np.testing.assert_allclose(pair_meta(histories, *rows, stats), expected[[0, 3], [1, 0]])


# -- fusers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["blend", "per_user", "stacker"])
def test_parts_add_up_to_the_fused_rating(name: str) -> None:
    truth, meta, noise, groups = synthetic(seed=1)
    preds = truth[:, None] + noise * [0.3, 0.6, 0.9]
    fuser = make_fuser(name, {}).fit(preds, meta, truth, groups)
    fused, parts = fuser.combine(preds, meta)
    assert parts.shape == (len(truth), 3 + 2)
    np.testing.assert_allclose(parts.sum(axis=1), fused, atol=1e-5)
    assert np.sqrt(np.mean((fused - truth) ** 2)) < 0.3  # learned something: the best input has 0.3


def test_blend_recovers_known_weights() -> None:
    truth, meta, noise, groups = synthetic(seed=2)
    preds = 3.0 + noise
    target = 0.5 + preds @ np.array([0.2, 0.7, 0.1]) + np.random.default_rng(0).normal(0, 0.01, len(truth))
    fuser = make_fuser("blend", {"alpha": 1e-3}).fit(preds, meta, target, groups)
    assert isinstance(fuser, Blend)
    np.testing.assert_allclose(fuser.weights_, np.array([0.2, 0.7, 0.1]), atol=0.01)
    assert fuser.intercept_ == pytest.approx(0.5, abs=0.05)


def test_per_user_blends_each_history_length_bucket_apart() -> None:
    truth, meta, noise, groups = synthetic(seed=3)
    preds = truth[:, None] + noise * [0.2, 0.2, 1.0]
    length = np.rint(np.expm1(meta[:, SUPPORT]))
    # short histories: the first component is right, long ones: the second
    target = np.where(length < 10, preds[:, 0], np.where(length < 100, preds.mean(axis=1), preds[:, 1]))
    fuser = make_fuser("per_user", {"edges": (10, 100), "shrink": 0.1}).fit(preds, meta, target, groups)
    assert isinstance(fuser, PerUser)
    np.testing.assert_allclose(fuser.weights_[0], np.array([1.0, 0.0, 0.0]), atol=0.05)
    np.testing.assert_allclose(fuser.weights_[2], np.array([0.0, 1.0, 0.0]), atol=0.05)
    blend = make_fuser("blend", {}).fit(preds, meta, target, groups)
    assert isinstance(blend, Blend)
    per_user_rmse = np.sqrt(np.mean((fuser.combine(preds, meta)[0] - target) ** 2))
    blend_rmse = np.sqrt(np.mean((blend.combine(preds, meta)[0] - target) ** 2))
    assert per_user_rmse < 0.5 * blend_rmse
    # a heavy shrink pulls every bucket back to the global blend
    shrunk = make_fuser("per_user", {"edges": (10, 100), "shrink": 1e9}).fit(preds, meta, target, groups)
    assert isinstance(shrunk, PerUser)
    np.testing.assert_allclose(shrunk.weights_[0], blend.weights_, atol=1e-3)


def test_stacker_learns_an_interaction_with_a_meta_feature_that_the_blend_cannot() -> None:
    truth, meta, noise, groups = synthetic(n=6000, seed=4)
    preds = truth[:, None] + noise * [0.8, 0.8, 1.5]
    # where an item has few ratings the first component is exact, elsewhere the second
    rare = meta[:, ITEM_SUPPORT] < np.log1p(20)
    target = np.where(rare, preds[:, 0], preds[:, 1])
    fit, test = np.arange(6000) < 4500, np.arange(6000) >= 4500
    rmse = {}
    for name, config in (("blend", {}), ("stacker", {"learning_rate": 0.2})):
        fuser = make_fuser(name, config).fit(preds[fit], meta[fit], target[fit], groups[fit])
        rmse[name] = np.sqrt(np.mean((fuser.combine(preds[test], meta[test])[0] - target[test]) ** 2))
    assert rmse["stacker"] < 0.5 * rmse["blend"], rmse


def test_fuser_save_load_round_trip(tmp_path: Path) -> None:
    truth, meta, noise, groups = synthetic(seed=5)
    preds = truth[:, None] + noise * 0.5
    for name in ("blend", "per_user", "stacker"):
        fuser = make_fuser(name, {"seed": 3}).fit(preds, meta, truth, groups)
        loaded = type(fuser).load(fuser.save(tmp_path / name))
        assert loaded.config == fuser.config
        np.testing.assert_array_equal(loaded.combine(preds, meta)[1], fuser.combine(preds, meta)[1])


# -- selection --------------------------------------------------------------------------------------
def oof_of(preds: np.ndarray, meta: np.ndarray, target: np.ndarray, users: np.ndarray) -> OutOfFold:
    frame = pd.DataFrame({"user": users, "item": 0, "rating": target, "fold": 0})
    names = [f"c{j}" for j in range(preds.shape[1])]
    for j, name in enumerate(names):
        frame[f"pred:{name}"] = preds[:, j]
    for f, feature in enumerate(META_FEATURES):
        frame[f"meta:{feature}"] = meta[:, f]
    return OutOfFold(frame, names, {})


def test_selection_ranks_every_candidate_and_picks_the_best() -> None:
    truth, meta, noise, users = synthetic(seed=6)
    preds = truth[:, None] + noise * [0.2, 0.2, 1.0]
    length = np.rint(np.expm1(meta[:, SUPPORT]))
    target = np.where(length < 100, preds[:, 0], preds[:, 1])
    fusers = {"blend": None, "per_user": {"edges": (100,), "shrink": 10.0}}
    report = select_predictor(oof_of(preds, meta, target, users), fusers, (1.0, 5.0), selection_folds=3)
    ranking = report["ranking"]
    assert {r["name"] for r in ranking} == {"blend", "per_user", "c0", "c1", "c2"}
    assert [r["rmse"] for r in ranking] == sorted(r["rmse"] for r in ranking)
    assert report["chosen"] == "per_user" == ranking[0]["name"] and "per_user" in report["reason"]
    assert report["holdout_rows"] == len(target)  # k folds over users: every row scored once
    # a component that is exactly right beats every fuser (a ridge blend shrinks its weight a little)
    exact = np.column_stack([preds[:, :2], np.clip(target, 1, 5)])
    report = select_predictor(oof_of(exact, meta, np.clip(target, 1, 5), users), fusers, (1.0, 5.0))
    assert report["chosen"] == "c2" and report["ranking"][0]["rmse"] < 1e-6  # float32 predictions
    assert 0 < report["holdout_rows"] < len(target)  # one group of held-out users


# -- the fused model --------------------------------------------------------------------------------
@pytest.fixture
def ensemble(planted: Any, test_raters: None) -> RatingEnsemble:
    frame = planted.frame
    ens, report, oof = fit_rating_ensemble(
        frame,
        planted.n_users,
        planted.n_items,
        {"history_mean": None, "item_mean": {"shrink": 2.0}, "item_mean@loose": {"shrink": 0.0}},
        {"blend": None, "per_user": {"edges": (20.0,)}, "stacker": {"n_estimators": 200}},
        folds=3,
        seed=0,
    )
    assert len(oof) == len(frame) and report["chosen"] == ens.chosen
    assert set(report["learned"]) == {"blend", "per_user", "stacker"}
    return ens


def test_ensemble_explains_predicts_and_serves_the_same_in_torch(
    planted: Any, ensemble: RatingEnsemble
) -> None:
    histories = RatingData.from_frame(planted.frame, planted.n_users, planted.n_items).histories()
    histories = histories.select([0, 5, 9, 40])
    items = np.random.default_rng(0).integers(0, planted.n_items, (4, 7))
    history, ratings = padded_inputs(histories)
    for name in [*ensemble.fusers, "item_mean"]:
        rating, predictions, parts = ensemble.explain(histories, items, name)
        assert parts.shape == (len(ensemble.part_names(name)), 4, 7)
        np.testing.assert_allclose(ensemble.clip(parts.sum(axis=0)), rating, atol=1e-5)
        np.testing.assert_array_equal(rating, ensemble.predict(histories, items, name))
        assert rating.min() >= 1.0 and rating.max() <= 5.0
        module = ensemble.to_torch(name)
        with torch.no_grad():
            fused, served_preds, served_parts = module(history, ratings, torch.from_numpy(items))
        np.testing.assert_allclose(np.clip(fused.numpy(), 1.0, 5.0), rating, atol=1e-4)
        np.testing.assert_allclose(served_preds.numpy(), predictions, atol=1e-4)
        np.testing.assert_allclose(served_parts.numpy(), parts, atol=1e-4)
        np.testing.assert_allclose(served_parts.numpy().sum(axis=0), fused.numpy(), atol=1e-4)
    # predict_pairs: the same ratings, pair by pair
    rows = np.repeat(np.arange(4), 7)
    pairs = ensemble.predict_pairs(histories, rows, items.ravel())
    np.testing.assert_allclose(pairs, ensemble.predict(histories, items).ravel(), atol=1e-6)


def test_ensemble_save_load_round_trip(planted: Any, ensemble: RatingEnsemble, tmp_path: Path) -> None:
    loaded = RatingEnsemble.load(ensemble.save(tmp_path / "fused"))
    assert loaded.chosen == ensemble.chosen and loaded.names == ensemble.names
    assert loaded.selection["selection"]["ranking"] == ensemble.selection["selection"]["ranking"]
    histories = RatingData.from_frame(planted.frame, planted.n_users, planted.n_items).histories()
    items = np.tile(np.arange(planted.n_items), (len(histories), 1))
    for name in ensemble.fusers:
        np.testing.assert_array_equal(
            loaded.predict(histories, items, name), ensemble.predict(histories, items, name)
        )
    assert not list(tmp_path.rglob("*.pkl"))


def test_exported_onnx_graph_serves_the_fused_rating(
    planted: Any, ensemble: RatingEnsemble, tmp_path: Path
) -> None:
    rating_onnx = pytest.importorskip("fuserec.rating_onnx")
    histories = RatingData.from_frame(planted.frame, planted.n_users, planted.n_items).histories()
    histories = histories.select([2, 7, 11])
    items = np.random.default_rng(1).integers(0, planted.n_items, (3, 5))
    history, ratings = padded_inputs(histories)
    session = rating_onnx.RatingSession(ensemble.export_onnx(tmp_path / "fused.onnx", "stacker"))
    out = session.run_padded(history.numpy(), ratings.numpy(), items)
    rating, predictions, parts = ensemble.explain(histories, items, "stacker")
    np.testing.assert_allclose(out["ratings"], rating, atol=1e-4)
    np.testing.assert_allclose(out["predictions"], predictions, atol=1e-4)
    np.testing.assert_allclose(out["contributions"], parts, atol=1e-4)
    assert session.names(rating_onnx.PARTS_KEY) == ensemble.part_names("stacker")
