"""The neural rater (``neural``): planted structure, determinism, state, served form and side information.

Every model is fitted once (cached) on small planted data with a tiny config, so the file runs in seconds.
Side information is planted too: a user attribute that shifts all of a user's ratings, and an item genre
that shifts all of an item's ratings, so the tests can ask whether the model reads each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from fuserec.histories import Histories
from fuserec.plugins.rating.neural import NeuralRater
from fuserec.rating import RatingData, RatingSide
from fuserec.registry import get_rater
from fuserec.testing.ratings import planted_ratings

TINY = {"dim": 8, "hidden": 16, "lr": 0.01}
COLD_ITEMS = 12  # items whose every rating is held out of training in the content test


def rmse(pred: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - actual) ** 2)))


def rated(
    lists: list[list[int]], ratings: list[list[float]], n_items: int, users: list[int] | None = None
) -> Histories:
    """Histories with ratings (and optionally rows of the users table; -1: unknown) from per-row lists."""
    hist = Histories.from_lists(lists, n_items)
    flat = np.asarray([r for row in ratings for r in row], dtype=np.float32)
    rows = None if users is None else np.asarray(users, dtype=np.int64)
    return Histories(hist.indptr, hist.items, n_items, ratings=flat, users=rows)


@dataclass(frozen=True)
class Sided:
    """Planted ratings plus a user group (+0.6 / −0.6 on every rating) and an item genre (−0.9, 0, +0.9)."""

    frame: pd.DataFrame
    n_users: int
    n_items: int
    group: np.ndarray
    genre: np.ndarray
    side: RatingSide


@cache
def sided() -> Sided:
    data = planted_ratings(seed=3)
    rng = np.random.default_rng(3)
    group = rng.integers(0, 2, data.n_users)
    genre = rng.integers(0, 3, data.n_items)
    frame = data.frame.copy()
    shift = 1.2 * (group[frame["user"]] - 0.5) + 0.9 * (genre[frame["item"]] - 1.0)
    frame["rating"] = np.clip(frame["rating"] + shift, 1.0, 5.0).astype(np.float32)
    side = RatingSide(
        item_features=np.eye(3, dtype=np.float32)[genre],
        user_features=np.eye(2, dtype=np.float32)[group],
        user_feature_names=("group:0", "group:1"),
    )
    return Sided(frame, data.n_users, data.n_items, group, genre, side)


@cache
def planted_split() -> tuple[pd.DataFrame, pd.DataFrame, int, int]:
    data = planted_ratings()
    test = np.random.default_rng(0).random(len(data.frame)) < 0.2
    frame = data.frame
    return frame[~test].reset_index(drop=True), frame[test].reset_index(drop=True), data.n_users, data.n_items


@cache
def fitted(seed: int = 0) -> NeuralRater:
    train, _, n_users, n_items = planted_split()
    return NeuralRater({**TINY, "seed": seed}).fit(train, n_users, n_items)


@cache
def fitted_sided(use_side: bool = True) -> NeuralRater:
    s = sided()
    return NeuralRater(TINY).fit(s.frame, s.n_users, s.n_items, s.side if use_side else None)


def test_found_through_its_entry_point() -> None:
    assert get_rater("neural") is NeuralRater
    assert NeuralRater.reads_user_features


def test_keeps_the_rater_contract() -> None:
    from fuserec.testing.raters import RATING_PARITY_ATOL, check_rater

    report = check_rater(NeuralRater, TINY)  # predict, clipping, empty history, batches, save/load, ONNX
    assert report["served"] and report["onnx_max_abs_diff"] <= RATING_PARITY_ATOL


def test_learns_planted_structure_better_than_the_global_mean() -> None:
    train, test, _, _ = planted_split()
    model = fitted()
    hist = RatingData.from_frame(train, model.n_users_ or 0, model.n_items_ or 0).histories()
    pred = model.predict_pairs(hist, test["user"].to_numpy(), test["item"].to_numpy())
    actual = test["rating"].to_numpy(np.float64)
    mean_only = rmse(np.full(len(actual), train["rating"].mean()), actual)
    assert rmse(pred, actual) < 0.7 * mean_only
    log = model.training_log_
    assert 1 <= model.best_epoch_ <= len(log) and all("val_rmse" in row for row in log)


def test_a_fit_is_repeatable_with_its_seed() -> None:
    train, _, n_users, n_items = planted_split()
    again = NeuralRater({**TINY, "seed": 0}).fit(train, n_users, n_items)
    first, second = fitted(0).get_state(), again.get_state()
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    other = fitted(1).get_state()
    assert not np.array_equal(first["item_vectors"], other["item_vectors"])


def test_save_and_load_predict_identically(tmp_path: Path) -> None:
    s = sided()
    model = fitted_sided()
    hist = RatingData.from_frame(s.frame, s.n_users, s.n_items).histories().select(np.arange(30))
    items = np.random.default_rng(0).integers(0, s.n_items, (30, 7))
    state = model.get_state()
    assert all(isinstance(v, np.ndarray) and v.dtype.kind in "biuf" for v in state.values())
    loaded = NeuralRater.load(model.save(tmp_path / "neural"))
    np.testing.assert_array_equal(loaded.predict(hist, items), model.predict(hist, items))
    assert loaded.config == model.config and loaded.rating_range_ == model.rating_range_
    assert loaded.user_feature_names_ == ("group:0", "group:1")
    np.testing.assert_array_equal(loaded.user_features_, s.side.user_features)


def padded(hist: Histories) -> tuple[torch.Tensor, torch.Tensor]:
    """The served layout, with odd padding: ids outside the catalogue and NaN ratings."""
    assert hist.ratings is not None
    history = hist.to_padded()
    values = np.full(history.shape, np.nan, dtype=np.float32)
    for b in range(len(hist)):
        values[b, : hist.lengths[b]] = hist.ratings[hist.indptr[b] : hist.indptr[b + 1]]
    history = np.where(history < 0, hist.n_items + 5, history)
    return torch.from_numpy(history), torch.from_numpy(values)


def test_the_torch_module_equals_estimate_with_attributes() -> None:
    s = sided()
    model = fitted_sided()
    train = RatingData.from_frame(s.frame, s.n_users, s.n_items).histories()
    hist = Histories.concat([train.select([0, 5, 9]), rated([[], [4]], [[], [2.0]], s.n_items, [7, -1])])
    items = np.random.default_rng(1).integers(0, s.n_items, (len(hist), 6))
    expected = model.estimate(hist, items)
    module = model.to_torch()
    assert module.user_feature_names == ("group:0", "group:1")
    features = torch.from_numpy(model.user_feature_rows(hist))
    assert features[-1].abs().sum() == 0  # the unknown user: zeros
    with torch.no_grad():
        got = module(*padded(hist), torch.from_numpy(items), features)
    assert got.dtype == torch.float32 and tuple(got.shape) == items.shape
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_onnx_export_serves_what_predict_measures(tmp_path: Path) -> None:
    from fuserec.rating_onnx import RatingSession, export_rating_onnx

    s = sided()
    model = fitted_sided()
    assert model.n_items_ is not None and model.rating_range_ is not None
    path = export_rating_onnx(
        model.to_torch(), tmp_path / "neural.onnx", model.n_items_, model.rating_range_, True
    )
    session = RatingSession(path)
    assert session.feature_names == ("group:0", "group:1")
    train = RatingData.from_frame(s.frame, s.n_users, s.n_items).histories()
    hist = Histories.concat([train.select([1, 2, 3]), rated([[]], [[]], s.n_items, [4])])
    items = np.random.default_rng(2).integers(0, s.n_items, (len(hist), 5))
    history, values = padded(hist)
    out = session.run_padded(history.numpy(), values.numpy(), items, model.user_feature_rows(hist))
    np.testing.assert_allclose(out["ratings"], model.predict(hist, items), atol=1e-4)


def test_user_attributes_are_read_and_unknown_users_get_zeros() -> None:
    s = sided()
    model = fitted_sided()
    items = np.tile(np.arange(s.n_items), (2, 1))
    group0, group1 = (int(np.flatnonzero(s.group == g)[0]) for g in (0, 1))
    # two new users with no ratings yet, found through their rows in the users table
    cold = model.predict(rated([[], []], [[], []], s.n_items, [group1, group0]), items)
    # the planted gap is 1.2 on every item; training users' histories already carry most of it (their
    # mean rating), so the attribute weight learns the rest: a clear gap, in the right direction
    assert (cold[0] - cold[1]).mean() > 0.2
    unknown = model.predict(rated([[], []], [[], []], s.n_items, [-1, s.n_users + 10]), items)
    without = model.predict(rated([[], []], [[], []], s.n_items), items)
    np.testing.assert_array_equal(unknown, without)
    module = model.to_torch()
    with torch.no_grad():  # unknown = an all-zero attribute row
        zeros = module(
            torch.full((2, 1), -1), torch.zeros(2, 1), torch.from_numpy(items), torch.zeros(2, 2)
        ).numpy()
    np.testing.assert_allclose(unknown, np.clip(zeros, *model.rating_range_ or (1.0, 5.0)), atol=1e-6)
    blind = fitted_sided(use_side=False)
    alike = blind.predict(rated([[], []], [[], []], s.n_items, [group1, group0]), items)
    np.testing.assert_array_equal(alike[0], alike[1])  # no attributes fitted: nothing to tell them apart


def test_content_rates_an_item_without_training_ratings_better_than_the_mean() -> None:
    s = sided()
    cold = np.random.default_rng(5).choice(s.n_items, COLD_ITEMS, replace=False)
    held = s.frame["item"].isin(cold).to_numpy()
    train, test = s.frame[~held], s.frame[held]
    model = NeuralRater(TINY).fit(train, s.n_users, s.n_items, RatingSide(item_features=s.side.item_features))
    hist = RatingData.from_frame(train, s.n_users, s.n_items).histories()
    pred = model.predict_pairs(hist, test["user"].to_numpy(), test["item"].to_numpy())
    actual = test["rating"].to_numpy(np.float64)
    mean_only = rmse(np.full(len(actual), train["rating"].mean()), actual)
    assert rmse(pred, actual) < 0.85 * mean_only
    # and it is the genre that tells the cold items apart
    by_item = pd.Series(pred).groupby(test["item"].to_numpy()).mean()
    assert np.corrcoef(by_item.to_numpy(), s.genre[by_item.index.to_numpy()])[0, 1] > 0.8


@pytest.mark.parametrize(
    "bad",
    [{"dim": 0}, {"lr": 0.0}, {"dropout": 1.0}, {"validation_share": 1.0}, {"device": "tpu"}, {"dims": 8}],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        NeuralRater(bad)
