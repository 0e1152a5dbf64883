"""How often can a segment of n cold users show the fused model 10% over the best single plugin?

Comparing the best fuser with the best single plugin *on the cold segment* asks a lot of ML-100k: that
segment holds 6 test users with one test item each: the best of twelve plugins is picked on
those six, and each user's NDCG@10 is 0 or one rank's discount. This measures what such a small segment
can show, from a finished run and test users only, without fitting anything:

- warm test users are cut to their latest 1-5 training items, exactly as the evaluation's
  ``cold_simulated`` segment cuts them (``fuserec.segments.simulated_cold``, the run's seed);
- each keeps one test item, its earliest (as a real cold user with 5-6 positives has exactly one), or,
  with ``--truth all``, its whole test set as in ``cold_simulated``;
- every plugin and the run's best fuser (``significance.best_fuser`` in metrics.json) rank them;
- ``--draws`` random segments of n of those users (without replacement) are drawn for each n in
  ``--sizes``; a draw passes when the fuser's mean NDCG@10 is at least ``1 + --gain`` times the best
  plugin's mean *on that draw* (or positive where every plugin's is 0).

It prints the pass rate per size beside the whole pool's gain: what a segment of the real size can show
when the fuser's expected gain is the pool's. As a control, the pool's best plugin takes the fuser's place
against the other plugins: how often a model with a small gain passes.

Usage (after `fuserec run` or `research/fusion_seeds.py`):
    python research/cold_segment_power.py --outputs /tmp/fusion/seed42 /tmp/fusion/seed1 \\
        --seeds 42 1 [--truth all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fuserec.artifacts import fitted_fusers, load_algorithm, load_fuser, trained_models
from fuserec.config import load_params
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.fusion import SharedScores
from fuserec.layout import SPLIT_FILES, Layout
from fuserec.metrics import ndcg_at_k, rank_together
from fuserec.segments import simulated_cold

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@dataclass
class Run:
    """A finished run's training split, test split, metrics and fitted models, ready to score."""

    metrics: dict
    data: Dataset
    test: pd.DataFrame
    models: dict[str, SharedScores]
    fusers: dict[str, SharedScores]


def load_run(outputs: Path, fusers: list[str] | None) -> Run:
    """Load a run's plugins and its fusers (``None``: the best one in metrics.json; ``[]``: every one)."""
    layout = Layout(outputs)
    metrics = json.loads(layout.metrics.read_text())
    wanted = [metrics["significance"]["best_fuser"]] if fusers is None else fusers
    data = Dataset.load(layout.clean, interactions=layout.split / SPLIT_FILES["train"])
    test = pd.read_parquet(layout.split / SPLIT_FILES["test"])
    models = {f.name: SharedScores(load_algorithm(f)) for f in trained_models(layout)}
    fitted = {
        f.name: SharedScores(load_fuser(f, layout, models))
        for f in fitted_fusers(layout)
        if not wanted or f.name in wanted
    }
    return Run(metrics, data, test, models, fitted)


def earliest_test_item(test: pd.DataFrame) -> pd.DataFrame:
    """Each user's first test positive by (timestamp, item): what a user with 5-6 positives is tested on."""
    ordered = test.sort_values(["user", "timestamp", "item"], kind="stable")
    return ordered.drop_duplicates("user", keep="first")


def pass_rates(
    fused: np.ndarray, singles: dict[str, np.ndarray], sizes: list[int], draws: int, gain: float, seed: int
) -> dict[int, float]:
    """Per segment size, the share of random segments where the fuser beats the segment's best plugin."""
    rng = np.random.default_rng(seed)
    table = np.stack(list(singles.values()))  # [plugins, users]
    out = {}
    for size in sizes:
        if size > len(fused):
            continue
        passed = 0
        for _ in range(draws):
            rows = rng.choice(len(fused), size, replace=False)
            best, mine = table[:, rows].mean(axis=1).max(), fused[rows].mean()
            passed += mine >= (1.0 + gain) * best if best > 0 else mine > 0
        out[size] = passed / draws
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, nargs="+", required=True, help="runs' outputs folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="each run's train.seed")
    parser.add_argument("--source", default="movielens-100k", help="data.source the run used")
    parser.add_argument("--truth", choices=("earliest", "all"), default="earliest")
    parser.add_argument("--sizes", type=int, nargs="+", default=[6, 25, 50, 100, 200, 400])
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--gain", type=float, default=0.10, help="the relative gain a draw must show")
    parser.add_argument("--json", type=Path, help="also write the results (one per run) here")
    args = parser.parse_args()
    if len(args.seeds) != len(args.outputs):
        parser.error(f"give one --seeds value per --outputs folder ({len(args.outputs)})")
    results = [measure(folder, seed, args) for folder, seed in zip(args.outputs, args.seeds, strict=True)]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def measure(outputs: Path, seed: int, args: argparse.Namespace) -> dict:
    """One run's pool of cut users, scored by every plugin and the best fuser, and the pass rates."""
    overrides = [f"data.source={args.source}", f"outputs={outputs}", f"train.seed={seed}"]
    params = load_params(PARAMS, overrides)
    run = load_run(outputs, fusers=None)
    sig, data, test, models = run.metrics["significance"], run.data, run.test, run.models
    fuser = run.fusers[sig["best_fuser"]]
    hist, train_mat = data.histories(), data.matrix()
    users = np.unique(test["user"].to_numpy())
    cold = simulated_cold(hist, users, params.evaluate.simulated_cold_users, params.train.seed)
    assert cold is not None, "no warm test users to cut"
    cut, chosen = cold
    truth_frame = earliest_test_item(test) if args.truth == "earliest" else test
    truth = interactions_matrix(truth_frame, data.n_users, data.n_items)[chosen]
    scorers = {name: m.score for name, m in models.items()} | {sig["best_fuser"]: fuser.score}
    topks = rank_together(scorers, cut.select, chosen, sp.csr_matrix(train_mat), 10)
    ndcg = {name: ndcg_at_k(top, truth, 10) for name, top in topks.items()}
    fused = ndcg.pop(sig["best_fuser"])
    means = {name: float(v.mean()) for name, v in ndcg.items()}
    best = max(means, key=means.__getitem__)
    result = {
        "outputs": str(outputs),
        "seed": seed,
        "truth": args.truth,
        "pool_users": len(chosen),
        "fuser": sig["best_fuser"],
        "fuser_ndcg": round(float(fused.mean()), 4),
        "best_single_on_pool": best,
        "best_single_ndcg": round(means[best], 4),
        "pool_gain": round(float(fused.mean()) / means[best] - 1.0, 4),
        "gain_asked": args.gain,
        "pass_rate_by_size": pass_rates(fused, ndcg, args.sizes, args.draws, args.gain, seed),
        # control: the pool's best plugin in the fuser's place, against the eleven others
        "control_pool_gain": round(means[best] / max(v for k, v in means.items() if k != best) - 1.0, 4),
        "control_pass_rate_by_size": pass_rates(
            ndcg[best], {k: v for k, v in ndcg.items() if k != best}, args.sizes, args.draws, args.gain, seed
        ),
        "real_cold_segment": sig.get("cold_users"),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
