"""RMSE/MAE, rating segments and the k-fold assignment: properties over generated data."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.rating_metrics import errors, paired_errors, rating_report, segment_masks
from fuserec.segments import head_items
from fuserec.stages.rating.split import kfold_assignment

ratings = st.lists(st.integers(1, 5), min_size=1, max_size=60)


@given(ratings, st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_errors_match_their_definitions(actual: list[int], seed: int) -> None:
    truth = np.asarray(actual, np.float64)
    pred = truth + np.random.default_rng(seed).normal(0, 1, len(truth))
    out = errors(pred, truth)
    assert out["n"] == len(truth)
    assert out["rmse"] == np.sqrt(np.mean((pred - truth) ** 2))
    assert out["mae"] == np.mean(np.abs(pred - truth))
    assert out["mae"] <= out["rmse"] + 1e-12  # the quadratic mean bounds the arithmetic one
    assert errors(truth, truth)["rmse"] == 0.0


def test_an_empty_segment_has_no_error_rather_than_nan() -> None:
    assert errors(np.zeros(0), np.zeros(0)) == {"rmse": None, "mae": None, "n": 0}


@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 14)), min_size=1, max_size=80),
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 14)), min_size=1, max_size=40),
    st.integers(0, 6),
)
@settings(max_examples=60, deadline=None)
def test_segments_come_from_training_counts_only(train_pairs, test_pairs, cold_max: int) -> None:
    train = pd.DataFrame(train_pairs, columns=["user", "item"])
    test = pd.DataFrame(test_pairs, columns=["user", "item"])
    masks = segment_masks(train, test, 10, 15, cold_max)
    counts = np.bincount(train["user"], minlength=10)
    pop = np.bincount(train["item"], minlength=15)
    assert (masks["cold_users"] ^ masks["warm_users"]).all()  # every test rating is in exactly one
    assert (masks["cold_users"] == (counts[test["user"]] <= cold_max)).all()
    assert (masks["new_items"] == (pop[test["item"]] == 0)).all()
    assert (masks["long_tail_items"] == ~head_items(pop)[test["item"]]).all()


@given(st.integers(0, 500), st.integers(2, 10), st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_kfold_assignment_is_a_seeded_near_equal_partition(n: int, folds: int, seed: int) -> None:
    fold = kfold_assignment(n, folds, seed)
    sizes = np.bincount(fold, minlength=folds + 1)[1:]
    assert len(fold) == n and sizes.sum() == n and sizes.max() - sizes.min() <= 1
    assert (kfold_assignment(n, folds, seed) == fold).all()


def test_rating_report_and_paired_test_agree_with_each_other() -> None:
    rng = np.random.default_rng(0)
    test = pd.DataFrame({"user": rng.integers(0, 30, 400), "item": rng.integers(0, 50, 400)})
    test["rating"] = rng.integers(1, 6, 400).astype(float)
    good = test["rating"].to_numpy() + rng.normal(0, 0.5, 400)
    bad = test["rating"].to_numpy() + rng.normal(0, 1.5, 400)
    masks = {"all": np.ones(400, bool)}
    assert (
        rating_report(good, test, masks)["segments"]["all"]["rmse"]
        == rating_report(good, test, masks)["rmse"]
    )
    sq = lambda p: (p - test["rating"].to_numpy()) ** 2  # noqa: E731
    result = paired_errors(sq(good), sq(bad), test["user"].to_numpy(), 30)
    assert result["per_rating_ttest_p"] < 1e-6 and result["ratings_better"] > result["ratings_worse"]
    assert result["per_user"]["mean_difference"] > 0  # positive favours the candidate
