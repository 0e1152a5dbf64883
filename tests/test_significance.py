"""The paired comparison: it detects a real per-user gain, not a shuffled one, and its interval holds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.significance import best_by, paired_comparison


def test_a_consistent_gain_is_significant_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(500)
    better = paired_comparison(base + 0.02 + rng.normal(0, 0.02, 500), base)
    assert better["p_value"] < 1e-6 and better["ci95"][0] > 0
    same = paired_comparison(base + rng.normal(0, 0.05, 500), base)
    assert same["p_value"] > 0.01 and same["ci95"][0] < 0 < same["ci95"][1]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=3, max_size=60), st.floats(-0.5, 0.5))
def test_interval_contains_the_mean_difference(values: list[float], shift: float) -> None:
    a = np.asarray(values)
    b = np.clip(a + shift * np.linspace(0, 1, len(a)), 0, 1)
    out = paired_comparison(a, b, n_boot=500)
    low, high = out["ci95"]
    assert low - 1e-12 <= out["mean_difference"] <= high + 1e-12


def test_users_without_a_value_are_dropped_and_shapes_must_match() -> None:
    out = paired_comparison(np.array([0.5, np.nan, 0.2, 0.4]), np.array([0.1, 0.3, np.nan, 0.2]))
    assert out["n_users"] == 2
    with pytest.raises(ValueError, match="shape"):
        paired_comparison(np.zeros(3), np.zeros(4))


def test_identical_users_give_p_one_and_strict_json() -> None:
    """Two users both at zero (a tiny segment): the t-test is 0/0; metrics.json must still be JSON."""
    import json

    out = paired_comparison(np.zeros(2), np.zeros(2), n_boot=100)
    assert out["p_value"] == 1.0 and out["wilcoxon_p"] == 1.0 and out["mean_difference"] == 0.0
    json.dumps(out, allow_nan=False)
    shifted = paired_comparison(np.array([0.1, 0.3, 0.2]), np.array([0.1, 0.2, 0.2]), n_boot=100)
    assert 0.0 < shifted["p_value"] < 1.0  # one differing user: an ordinary t-test again


def test_best_by_picks_the_highest() -> None:
    assert best_by({"a": {"ndcg@10": 0.1}, "b": {"ndcg@10": 0.3}}, "ndcg@10") == "b"
    assert best_by({}, "ndcg@10") is None
