"""RMSE and MAE of predicted ratings, overall and per segment, with segments defined from training only.

The segments mirror the ranking task's (:mod:`fuserec.segments`): cold users have at most ``cold_user_max``
training ratings, long-tail items are outside the top 20% of items by training ratings, new items have
none. Every held-out rating of a segment counts, so a segment's RMSE is over ratings, not users.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fuserec.segments import head_items

RATING_SEGMENTS = ("cold_users", "warm_users", "long_tail_items", "new_items")


def errors(pred: np.ndarray, actual: np.ndarray) -> dict[str, float | int | None]:
    """``{"rmse", "mae", "n"}`` of ``pred`` against ``actual`` (None for an empty set: JSON has no NaN)."""
    diff = np.asarray(pred, np.float64) - np.asarray(actual, np.float64)
    if not len(diff):
        return {"rmse": None, "mae": None, "n": 0}
    return {"rmse": float(np.sqrt(np.mean(diff**2))), "mae": float(np.mean(np.abs(diff))), "n": len(diff)}


def segment_masks(
    train: pd.DataFrame, test: pd.DataFrame, n_users: int, n_items: int, cold_user_max: int
) -> dict[str, np.ndarray]:
    """Boolean masks over the rows of ``test``, one per :data:`RATING_SEGMENTS` name."""
    user_counts = np.bincount(train["user"].to_numpy(np.int64), minlength=n_users)
    item_counts = np.bincount(train["item"].to_numpy(np.int64), minlength=n_items)
    users, items = test["user"].to_numpy(np.int64), test["item"].to_numpy(np.int64)
    cold = user_counts[users] <= cold_user_max
    return {
        "cold_users": cold,
        "warm_users": ~cold,
        "long_tail_items": ~head_items(item_counts)[items],
        "new_items": item_counts[items] == 0,
    }


def rating_report(pred: np.ndarray, test: pd.DataFrame, masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Overall errors of ``pred`` (aligned with ``test``'s rows) plus ``segments``: each mask's errors."""
    actual = test["rating"].to_numpy(np.float64)
    out: dict[str, Any] = dict(errors(pred, actual))
    out["segments"] = {name: errors(pred[mask], actual[mask]) for name, mask in masks.items()}
    return out


def paired_errors(
    sq_candidate: np.ndarray, sq_baseline: np.ndarray, users: np.ndarray, n_users: int, seed: int = 0
) -> dict[str, Any]:
    """Is the candidate's squared error lower? Paired per rating (t-test, Wilcoxon) and per user (each
    user's mean squared error first: ratings of one user are not independent)."""
    from scipy import stats

    from fuserec.significance import paired_comparison

    sq_a, sq_b = np.asarray(sq_candidate, np.float64), np.asarray(sq_baseline, np.float64)
    nonzero = (sq_a - sq_b) != 0
    counts = np.bincount(users, minlength=n_users)
    rated = counts > 0
    per_user_a = np.bincount(users, sq_a, n_users) / np.maximum(counts, 1)
    per_user_b = np.bincount(users, sq_b, n_users) / np.maximum(counts, 1)
    return {
        "n_ratings": len(sq_a),
        "mse_candidate": float(sq_a.mean()),
        "mse_baseline": float(sq_b.mean()),
        "per_rating_ttest_p": float(stats.ttest_rel(sq_a, sq_b).pvalue) if nonzero.any() else 1.0,
        "per_rating_wilcoxon_p": float(stats.wilcoxon(sq_a[nonzero] - sq_b[nonzero]).pvalue)
        if nonzero.any()
        else 1.0,
        "ratings_better": int((sq_a < sq_b).sum()),
        "ratings_worse": int((sq_a > sq_b).sum()),
        # negated MSE: positive differences favour the candidate
        "per_user": paired_comparison(-per_user_a[rated], -per_user_b[rated], seed=seed),
    }


__all__ = ["RATING_SEGMENTS", "errors", "paired_errors", "rating_report", "segment_masks"]
