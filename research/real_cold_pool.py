"""Real cold users pooled over several runs: is the fused model 10% over the best single plugin on them?

The question: is the fused model's NDCG@10 on cold users (<= 5 training positives) at least 10% over
the best single plugin on that segment? ML-100k has 6 such test users, too few to
decide it (``cold_segment_power.py``). Other MovieLens data made from ML-100k have more: dropping films
leaves users whose positives were mostly on the dropped ones (``movielens_proxies.py``). This reads
finished runs, fits nothing, and pools their real cold test users:

- each run's cold test users are ranked on their real histories, as the evaluation ranks them (its
  ``cold_users`` segment; the recomputed means are printed beside metrics.json's as a check);
- per-user NDCG@10 of every plugin and fuser are pooled over the runs (a user in two runs counts twice:
  the runs are different data, but not independent users, so the interval is a lower bound on the
  uncertainty);
- the best single plugin is picked on the pool, which favours the plugin (it is chosen on the same users),
  and each fuser, and each run's own best fuser (``significance.best_fuser``, chosen on all users), is
  compared with it per user: mean difference, bootstrap 95% interval, paired t-test
  (:func:`fuserec.significance.paired_comparison`);
- the same for look-alikes: each run's warm test users cut to their latest items, as many as a real cold
  test user of that run has (drawn from theirs: 4 or 5 under the protocol's split, which tests only users
  with 5+ positives), keeping their earliest test item; and whether a fuser's per-user gain differs
  between real users and look-alikes (Welch's t-test): are real cold users harder to fuse for, or just few;
- per run, the literal reading of the question: the run's best fuser against the best plugin picked on
  that run's few real cold users. The best of twelve noisy means is biased upward, which the pooled
  comparison shows.

Usage (after ``fuserec run`` on each data set):
    python research/real_cold_pool.py --outputs RUN [RUN ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import scipy.sparse as sp

# research/ is on sys.path when this runs as a script
from cold_segment_power import earliest_test_item, load_run

from fuserec.data.dataset import interactions_matrix
from fuserec.metrics import ndcg_at_k, rank_together
from fuserec.segments import COLD_USER_MAX
from fuserec.significance import paired_comparison

BEST_FUSER = "best fuser of each run"


def cold_ndcg(outputs: Path, seed: int) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Per pool (real cold test users, their cut look-alikes), per-user NDCG@10 of every model; a summary."""
    run = load_run(outputs, fusers=[])
    data, sig = run.data, run.metrics["significance"]
    hist, train_mat = data.histories(), sp.csr_matrix(data.matrix())
    users = np.unique(run.test["user"].to_numpy())
    cold = users[hist.lengths[users] <= COLD_USER_MAX]
    warm = users[hist.lengths[users] > COLD_USER_MAX]
    # look-alikes: warm users cut to the lengths real cold test users have (4-5 under the protocol's split)
    lengths = hist.lengths[cold] if cold.size else np.arange(1, COLD_USER_MAX + 1)
    keep = np.zeros(data.n_users, dtype=np.int64)
    keep[warm] = np.random.default_rng(seed).choice(lengths, warm.size)
    pools = {
        "real": (hist, cold, interactions_matrix(run.test, data.n_users, data.n_items)[cold]),
        "lookalike": (
            hist.latest(keep),
            warm,
            interactions_matrix(earliest_test_item(run.test), data.n_users, data.n_items)[warm],
        ),
    }
    scorers = {name: m.score for name, m in (run.models | run.fusers).items()}
    out: dict[str, dict[str, np.ndarray]] = {}
    for pool, (histories, rows, truth) in pools.items():
        topks = rank_together(scorers, histories.select, rows, train_mat, 10)
        out[pool] = {name: ndcg_at_k(top, truth, 10) for name, top in topks.items()}
        out[pool][BEST_FUSER] = out[pool][sig["best_fuser"]]
    logged = run.metrics["segments"].get("cold_users", {})
    real = {name: float(v.mean()) for name, v in out["real"].items() if name in run.models}
    picked = max(real, key=real.__getitem__) if real else None
    summary = {
        "outputs": str(outputs),
        "cold_test_users": int(cold.size),
        "their_history_lengths": dict(Counter(hist.lengths[cold].tolist())),
        "lookalike_users": int(warm.size),
        "best_fuser": sig["best_fuser"],
        "fusers": sorted(run.fusers),
        "ndcg@10": {pool: {n: round(float(v.mean()), 4) for n, v in nd.items()} for pool, nd in out.items()},
        "metrics_json_cold_users_ndcg@10": {name: logged[name].get("ndcg@10") for name in logged},
        # the literal reading on this run: the best plugin picked on these few users
        "best_single_on_segment": picked,
        "best_fuser_gain_on_segment": (
            float(out["real"][BEST_FUSER].mean()) / real[picked] - 1.0 if picked and real[picked] else None
        ),
    }
    return out, summary


def compare(per_run: list[tuple[dict[str, np.ndarray], dict]]) -> dict:
    """Pool per-user NDCG@10 over runs; every fuser against the pool's best plugin, paired by user."""
    names = set.intersection(*(set(ndcg) for ndcg, _ in per_run))
    pooled = {name: np.concatenate([ndcg[name] for ndcg, _ in per_run]) for name in sorted(names)}
    fusers = {BEST_FUSER}.union(*(s["fusers"] for _, s in per_run)) & names
    plugins = {n: v for n, v in pooled.items() if n not in fusers}
    best = max(plugins, key=lambda n: plugins[n].mean())
    comparisons = {name: paired_comparison(pooled[name], pooled[best]) for name in sorted(fusers)}
    for name, c in comparisons.items():
        print(
            f"  {name}: {c['candidate_mean']:.4f} vs {best} {c['baseline_mean']:.4f} "
            f"({c['relative_gain']:+.1%}), 95% [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], "
            f"p = {c['p_value']:.3g}"
        )
    return {
        "differences": {name: pooled[name] - pooled[best] for name in sorted(fusers)},
        "pooled_users": int(pooled[best].size),
        "pooled_ndcg@10": {n: round(float(v.mean()), 4) for n, v in pooled.items()},
        "best_single_on_pool": best,
        "against_best_single": comparisons,
    }


def gap(real: dict[str, np.ndarray], lookalike: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Is a fuser's gain on real cold users smaller than on look-alikes? Welch's t-test on per-user gains."""
    from scipy import stats

    out = {}
    print("real vs look-alike, gain over each pool's best plugin:")
    for name in sorted(real.keys() & lookalike.keys()):
        test = stats.ttest_ind(real[name], lookalike[name], equal_var=False)
        out[name] = {
            "real": float(real[name].mean()),
            "lookalike": float(lookalike[name].mean()),
            "p_value": float(test.pvalue),
        }
        print(f"  {name}: {out[name]['real']:+.4f} vs {out[name]['lookalike']:+.4f}, p = {test.pvalue:.3g}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, nargs="+", required=True, help="runs' outputs folders")
    parser.add_argument("--seed", type=int, default=0, help="draws the look-alikes' cut lengths")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    per_run = [cold_ndcg(folder, args.seed) for folder in args.outputs]
    for _, summary in per_run:
        print(json.dumps(summary))
    for _, summary in per_run:
        gain = summary["best_fuser_gain_on_segment"]
        print(
            f"{summary['outputs']}: {summary['cold_test_users']} real cold users, {summary['best_fuser']} "
            f"against {summary['best_single_on_segment']} (picked on them): "
            + ("-" if gain is None else f"{gain:+.1%}")
        )
    result: dict = {"runs": [s for _, s in per_run]}
    for pool in ("real", "lookalike"):
        print(f"{pool}:")
        result[pool] = compare([(ndcg[pool], s) for ndcg, s in per_run])
    differences = [result[pool].pop("differences") for pool in ("real", "lookalike")]
    result["real_vs_lookalike"] = gap(*differences)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
