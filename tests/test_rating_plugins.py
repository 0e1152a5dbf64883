"""Rating-prediction plugins (``fuserec.raters``): the contract, recovery of planted structure, fold-in.

Models are fitted once per configuration on small planted data (:mod:`fuserec.testing.ratings`), so the
whole file runs in seconds; hypothesis drives the data-handling checks against those fitted models.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fuserec.histories import Histories
from fuserec.rating import RatingAlgorithm, RatingData
from fuserec.registry import RATERS_GROUP, PluginError, discover, get_rater
from fuserec.testing.ratings import PlantedRatings, planted_ratings

RATERS = ("baseline", "knn_baseline", "svd", "svdpp", "user_similarity")
# Settings under which the factor models train to convergence on the small planted data (the library
# defaults are Surprise's, tuned for ML-100k's 80k ratings, and stop early here by design).
CONVERGED = {
    "svd": {"factors": 8, "epochs": 60, "lr": 0.01, "fold_in_reg": 2.0},
    "svdpp": {"factors": 8, "epochs": 60, "lr": 0.01, "fold_in_reg": 2.0},
}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def planted() -> tuple[PlantedRatings, pd.DataFrame, pd.DataFrame]:
    """Planted ratings split 80/20 at random: (data, train, test)."""
    data = planted_ratings()
    test = np.random.default_rng(0).random(len(data.frame)) < 0.2
    return data, data.frame[~test].reset_index(drop=True), data.frame[test].reset_index(drop=True)


@cache
def fitted(name: str, converged: bool = True) -> RatingAlgorithm:
    data, train, _ = planted()
    config = CONVERGED.get(name, {}) if converged else {}
    return get_rater(name)(config).fit(train, data.n_users, data.n_items)


@cache
def train_histories() -> Histories:
    data, train, _ = planted()
    return RatingData.from_frame(train, data.n_users, data.n_items).histories()


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - truth) ** 2)))


def test_every_rater_is_found_through_its_entry_point() -> None:
    infos = {p.name: p for p in discover(RATERS_GROUP)}
    assert set(RATERS) <= set(infos)
    for name in RATERS:
        info = infos[name]
        assert info.ok, info.error
        assert info.distribution == "fuserec"
        assert info.cls is not None and issubclass(info.cls, RatingAlgorithm)
        assert get_rater(name) is info.cls
    with pytest.raises(PluginError, match="available"):
        get_rater("no_such_rater")
    with pytest.raises(PluginError):
        get_rater("itemknn")  # a ranking algorithm is not a rater


@pytest.mark.parametrize("name", RATERS)
def test_recovers_planted_structure_better_than_the_global_mean(name: str) -> None:
    data, train, test = planted()
    model = fitted(name)
    pred = model.predict_pairs(train_histories(), test["user"].to_numpy(), test["item"].to_numpy())
    actual = test["rating"].to_numpy(np.float64)
    floor = rmse(data.truth[test["user"], test["item"]], actual)  # the noise: no model can beat it
    mean_only = rmse(np.full(len(actual), train["rating"].mean()), actual)
    assert mean_only > 2 * floor  # the planted structure is there to find
    assert rmse(pred, actual) < 0.7 * mean_only, f"{name}: {rmse(pred, actual):.3f} vs mean {mean_only:.3f}"


@pytest.mark.parametrize(
    ("name", "ratio"), [("svd", 0.9), ("svdpp", 0.9), ("knn_baseline", 0.9), ("user_similarity", 0.95)]
)
def test_models_of_interactions_beat_biases_alone(name: str, ratio: float) -> None:
    _, _, test = planted()
    users, items = test["user"].to_numpy(), test["item"].to_numpy()
    actual = test["rating"].to_numpy(np.float64)
    biases = rmse(fitted("baseline").predict_pairs(train_histories(), users, items), actual)
    assert rmse(fitted(name).predict_pairs(train_histories(), users, items), actual) < ratio * biases


@pytest.mark.parametrize("name", ["baseline", "knn_baseline"])
def test_bias_fold_in_equals_the_fitted_bias(name: str) -> None:
    # the ALS user step comes last, so folding a training user's ratings in reproduces the fit exactly
    _, _, test = planted()
    model = fitted(name)
    users, items = test["user"].to_numpy(), test["item"].to_numpy()
    folded = model.predict_pairs(train_histories(), users, items)
    plain = model.predict_fitted(users, items)
    assert plain is not None
    np.testing.assert_allclose(folded, plain, atol=1e-5)


@pytest.mark.parametrize("name", ["svd", "svdpp"])
def test_factor_fold_in_of_a_training_history_is_close_to_the_fitted_user(name: str) -> None:
    _, train, _ = planted()
    model = fitted(name)
    users, items = train["user"].to_numpy(), train["item"].to_numpy()
    folded = model.predict_pairs(train_histories(), users, items)
    plain = model.predict_fitted(users, items)
    assert plain is not None
    assert np.abs(folded - plain).mean() < 0.08
    assert np.corrcoef(folded, plain)[0, 1] > 0.99
    # and the default (early-stopped) fit keeps a fitted path too: the benchmark's gap is measurable
    assert fitted(name, converged=False).predict_fitted(users[:5], items[:5]) is not None


def test_a_model_without_per_user_parameters_has_no_fitted_path() -> None:
    assert fitted("user_similarity").predict_fitted(np.array([0]), np.array([0])) is None


@st.composite
def rated_histories(draw: st.DrawFn, n_items: int) -> tuple[Histories, np.ndarray]:
    """Histories of random length (empty ones, repeated items, ratings outside the training range)."""
    n = draw(st.integers(1, 6))
    lists = [draw(st.lists(st.integers(0, n_items - 1), max_size=12)) for _ in range(n)]
    hist = Histories.from_lists(lists, n_items)
    ratings = draw(st.lists(st.floats(-2.0, 9.0), min_size=len(hist.items), max_size=len(hist.items)))
    hist = Histories(hist.indptr, hist.items, n_items, ratings=np.asarray(ratings, dtype=np.float32))
    m = draw(st.integers(1, 5))
    items = np.asarray(draw(st.lists(st.integers(0, n_items - 1), min_size=n * m, max_size=n * m)))
    return hist, items.reshape(n, m)


@pytest.mark.parametrize("name", RATERS)
@SETTINGS
@given(data=st.data())
def test_predictions_are_finite_float32_within_the_training_range(name: str, data: st.DataObject) -> None:
    model = fitted(name)
    hist, items = data.draw(rated_histories(planted()[0].n_items))
    pred = model.predict(hist, items)
    low, high = model.rating_range_ or (np.nan, np.nan)
    assert pred.dtype == np.float32 and pred.shape == items.shape
    assert np.isfinite(pred).all()
    assert (pred >= low).all() and (pred <= high).all()


@pytest.mark.parametrize("name", RATERS)
@SETTINGS
@given(data=st.data())
def test_a_history_is_a_set_of_ratings_and_pairs_group_like_rows(name: str, data: st.DataObject) -> None:
    model = fitted(name)
    hist, items = data.draw(rated_histories(planted()[0].n_items))
    expected = model.predict(hist, items)
    # the order of a history's ratings does not matter
    perm = np.concatenate(
        [hist.indptr[u] + data.draw(st.permutations(range(n))) for u, n in enumerate(hist.lengths)]
    )
    perm = perm.astype(np.int64)
    assert hist.ratings is not None
    shuffled = Histories(hist.indptr, hist.items[perm], hist.n_items, ratings=hist.ratings[perm])
    np.testing.assert_allclose(model.predict(shuffled, items), expected, rtol=1e-5, atol=1e-5)
    # predict_pairs in any order equals predicting row by row
    rows = np.repeat(np.arange(len(hist)), items.shape[1])
    order = np.asarray(data.draw(st.permutations(range(rows.size))), dtype=np.int64)
    pairs = model.predict_pairs(hist, rows[order], items.ravel()[order])
    np.testing.assert_allclose(pairs, expected.ravel()[order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", RATERS)
def test_state_round_trip_gives_identical_predictions(name: str, tmp_path: Path) -> None:
    model = fitted(name)
    _, _, test = planted()
    users, items = test["user"].to_numpy(), test["item"].to_numpy()
    expected = model.predict_pairs(train_histories(), users, items)
    state = model.get_state()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    restored = get_rater(name)(model.config)
    restored.set_state(state)
    np.testing.assert_array_equal(restored.predict_pairs(train_histories(), users, items), expected)
    loaded = get_rater(name).load(model.save(tmp_path / name))  # through npz, allow_pickle=False
    np.testing.assert_array_equal(loaded.predict_pairs(train_histories(), users, items), expected)
    assert loaded.config == model.config and loaded.rating_range_ == model.rating_range_


def test_predictions_are_clipped_to_the_training_range() -> None:
    data, train, _ = planted()
    narrow = train.assign(rating=train["rating"].clip(2.0, 4.0))
    model = get_rater("baseline")({"reg_users": 0.0}).fit(narrow, data.n_users, data.n_items)
    hist = Histories.from_lists([[0, 1], [2]], data.n_items)
    hist = Histories(hist.indptr, hist.items, data.n_items, ratings=np.array([5.0, 5.0, 1.0], np.float32))
    pred = model.predict(hist, np.arange(2 * data.n_items).reshape(2, -1) % data.n_items)
    assert model.rating_range_ == (2.0, 4.0)
    assert pred.min() >= 2.0 and pred.max() <= 4.0
    assert pred[0].max() == 4.0 and pred[1].min() == 2.0  # the clip bites on both sides


def test_a_new_user_is_served_from_their_ratings_alone() -> None:
    # no retraining: one who loves what item 0's fans love is predicted to like it more than one who hates it
    data, _, _ = planted()
    fans = np.argsort(data.truth[:, 0])[-20:]
    liked = np.argsort(data.truth[fans].mean(axis=0))[-6:]
    liked = liked[liked != 0][:5]
    for name in ("svd", "knn_baseline", "user_similarity"):
        model = fitted(name)
        hist = Histories.from_lists([list(liked), list(liked)], data.n_items)
        ratings = np.r_[np.full(len(liked), 5.0), np.full(len(liked), 1.0)].astype(np.float32)
        hist = Histories(hist.indptr, hist.items, data.n_items, ratings=ratings)
        lover, hater = model.predict(hist, np.array([[0], [0]]))[:, 0]
        assert lover > hater + 0.5, name


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("baseline", {"reg_users": -1.0}),
        ("baseline", {"epochs": 0}),
        ("svd", {"factors": 0}),
        ("svd", {"lr": 0.0}),
        ("svd", {"fold_in_reg": 0.0}),
        ("svdpp", {"batch_size": 0}),
        ("svdpp", {"init_std": -0.1}),
        ("knn_baseline", {"k": 0}),
        ("knn_baseline", {"shrinkage": -5.0}),
        ("user_similarity", {"similarity": "jaccard"}),
        ("user_similarity", {"k": 0}),
        ("svd", {"factorz": 10}),  # a typo is an error, not a silent default
    ],
)
def test_configs_reject_bad_values(name: str, bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        get_rater(name)(bad)


def test_inputs_are_checked() -> None:
    data, train, _ = planted()
    model = fitted("baseline")
    hist = train_histories().select([0, 1])
    with pytest.raises(ValueError, match="ratings"):
        model.predict(Histories(hist.indptr, hist.items, hist.n_items), np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match=r"\[2, m\]"):
        model.predict(hist, np.zeros((3, 1), np.int64))
    with pytest.raises(ValueError, match="item indices"):
        model.predict(hist, np.full((2, 1), data.n_items))
    with pytest.raises(ValueError, match="lacks columns"):
        get_rater("svd")().fit(train.drop(columns="rating"), data.n_users, data.n_items)
    with pytest.raises(ValueError, match="user indices"):
        get_rater("svd")().fit(train, int(train["user"].max()), data.n_items)
    with pytest.raises(ValueError, match="finite"):
        get_rater("svd")().fit(train.assign(rating=np.nan), data.n_users, data.n_items)
    with pytest.raises(RuntimeError, match="not fitted"):
        get_rater("svd")().predict(hist, np.zeros((2, 1), np.int64))


@SETTINGS
@given(
    triples=st.lists(
        st.tuples(
            st.integers(0, 5), st.integers(0, 6), st.sampled_from([1.0, 2.0, 3.5, 5.0]), st.integers(0, 9)
        ),
        min_size=1,
        max_size=40,
    )
)
def test_rated_histories_keep_every_rating_with_its_item(triples: list[tuple[int, int, float, int]]) -> None:
    frame = pd.DataFrame(triples, columns=["user", "item", "rating", "timestamp"])
    hist = RatingData.from_frame(frame, 6, 7).histories()
    assert hist.ratings is not None and hist.timestamps is not None
    assert len(hist) == 6 and list(hist.lengths) == list(np.bincount(frame["user"], minlength=6))
    rows = np.repeat(np.arange(6), hist.lengths)
    got = sorted(
        zip(rows.tolist(), hist.items.tolist(), hist.ratings.tolist(), hist.timestamps.tolist(), strict=True)
    )
    assert got == sorted(map(tuple, frame[["user", "item", "rating", "timestamp"]].to_numpy().tolist()))
    for u in range(6):  # time order within a history
        ts = hist.timestamps[hist.indptr[u] : hist.indptr[u + 1]]
        assert (np.diff(ts) >= 0).all()
