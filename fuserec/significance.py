"""Is the fused model really better? A per-user paired comparison against the best single model.

Averages hide how often a gain comes from a few users; pairing by user removes the between-user
variance (some users are just easy), so a real gain of 1-2% is detectable on ~1,000 users. The bootstrap
interval needs no normality assumption; the paired t-test p-value is the headline number,
and the Wilcoxon signed-rank test is there as a check that a few outliers do not drive it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def paired_comparison(
    candidate: np.ndarray, baseline: np.ndarray, n_boot: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Per-user ``candidate - baseline`` (NaN users dropped): mean, bootstrap 95% interval, p-values."""
    from scipy import stats

    candidate, baseline = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if candidate.shape != baseline.shape:
        raise ValueError(f"paired arrays differ in shape: {candidate.shape} vs {baseline.shape}")
    keep = np.isfinite(candidate) & np.isfinite(baseline)
    diff = candidate[keep] - baseline[keep]
    n = int(diff.size)
    if n < 2:
        return {"n_users": n, "mean_difference": float(diff.mean()) if n else float("nan")}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # chunks bound memory at 1000 x n
        stop = min(start + 1000, n_boot)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    nonzero = diff[diff != 0]
    # Every pair equal: the t statistic is 0/0 (scipy says NaN, which is not JSON); no evidence of a
    # difference reads as p = 1, as the Wilcoxon test's does.
    p_value = float(stats.ttest_rel(candidate[keep], baseline[keep]).pvalue) if nonzero.size else 1.0
    return {
        "n_users": n,
        "candidate_mean": float(candidate[keep].mean()),
        "baseline_mean": float(baseline[keep].mean()),
        "mean_difference": float(diff.mean()),
        "relative_gain": float(diff.mean() / baseline[keep].mean()) if baseline[keep].mean() else None,
        "ci95": [float(low), float(high)],
        "p_value": p_value,
        "wilcoxon_p": float(stats.wilcoxon(nonzero).pvalue) if nonzero.size else 1.0,
        "users_better": int((diff > 0).sum()),
        "users_worse": int((diff < 0).sum()),
        "bootstrap_samples": n_boot,
    }


def best_by(results: dict[str, dict[str, Any]], metric: str) -> str | None:
    """Name of the entry with the highest ``metric`` (None when there is none)."""
    scored = {name: values[metric] for name, values in results.items() if metric in values}
    return max(scored, key=lambda name: scored[name]) if scored else None
