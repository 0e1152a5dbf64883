"""Quality per dataset: every model and fuser of a real `fuserec run`, against the best single model.

Usage (from the repository root; one full `fuserec run` per seed, about 15 minutes on ML-100k on 2 cores):
    python benchmarks/quality.py --dataset movielens-100k --data ../shared/data/ml-100k --seeds 42 1 2
    python benchmarks/quality.py --dataset movielens-100k --seeds 42 1 2 --summarise-only
    python benchmarks/quality.py --dataset synthetic --set data.synthetic.n_interactions=100000

Each seed runs the Prefect flow (``python -m fuserec.cli run``) with ``data.source`` = ``--dataset``,
``train.seed`` = the seed and the dataset's own settings, into ``<--out>/<dataset>/seed<N>``; nothing is
tuned here. From each run's ``metrics.json`` it keeps, for every model and fuser, NDCG/Recall/HR/Coverage@10
and NDCG@10 relative to the best single model, and the evaluate stage's paired per-user comparison of the
best fuser with the best single model (mean difference, bootstrap 95% interval, paired t-test and Wilcoxon
p) on all test users, on the real cold users and on warm users cut to 1-5 items (``significance``).
Writes ``benchmarks/results/quality-<dataset>.json`` (or ``--results``), with the machine: torch's trained
models differ in their last digits from one kind of CPU to another.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METRICS = ("ndcg@10", "recall@10", "hr@10", "coverage@10")
COMPARISON = ("candidate_mean", "baseline_mean", "mean_difference", "relative_gain", "ci95", "p_value",
              "wilcoxon_p", "n_users", "users_better", "users_worse", "best_single_on_segment")  # fmt: skip


def run(dataset: str, data: str | None, seed: int, folder: Path, sets: list[str]) -> None:
    """One full pipeline run into ``folder``."""
    cmd = [sys.executable, "-m", "fuserec.cli", "run", "-s", f"data.source={dataset}"]
    if data:
        cmd += ["-s", f"data.path={Path(data).resolve()}"]
    cmd += ["-s", f"outputs={folder}", "-s", f"train.seed={seed}"]
    for item in sets:
        cmd += ["-s", item]
    subprocess.run(cmd, check=True, cwd=REPO)


def summarise(folder: Path, seed: int) -> dict[str, Any]:
    """Every model's and fuser's metrics, and the paired test, from one run's ``metrics.json``."""
    metrics = json.loads((folder / "metrics.json").read_text())
    sig = metrics.get("significance", {})
    best = sig.get("best_single")
    base = metrics["models"][best]["ndcg@10"] if best else None
    rows = []
    for kind in ("models", "fusers"):
        for name, values in sorted(metrics.get(kind, {}).items()):
            row = {"name": name, "kind": kind[:-1], **{m: values.get(m) for m in METRICS}}
            row["ndcg_vs_best_single"] = values["ndcg@10"] / base - 1.0 if base else None
            rows.append(row)
    paired = {
        segment: {k: sig[segment][k] for k in COMPARISON if k in sig[segment]}
        for segment in ("all_users", "cold_users", "cold_simulated")
        if segment in sig
    }
    return {
        "seed": seed,
        "outputs": str(folder),
        "test_users": metrics.get("protocol", {}).get("test_users"),
        "best_single": best,
        "best_fuser": sig.get("best_fuser"),
        "best_fuser_served_alone": sig.get("best_fuser_served_alone"),
        "paired_best_fuser_vs_best_single": paired,
        "rows": sorted(rows, key=lambda r: -(r["ndcg@10"] or 0.0)),
    }


def machine() -> dict[str, str]:
    """Where the runs ran (this machine: with --summarise-only, it must be the one that ran them)."""
    import torch

    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    return {
        "cpu": model,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def show(summary: dict[str, Any]) -> None:
    print(f"seed {summary['seed']}: best single {summary['best_single']}, best fuser {summary['best_fuser']}")
    for row in summary["rows"]:
        gain = row["ndcg_vs_best_single"]
        print(
            f"  {row['kind']:<6} {row['name']:<12} ndcg@10 {row['ndcg@10']:.4f}"
            f"  recall@10 {row['recall@10']:.4f}  hr@10 {row['hr@10']:.4f}"
            f"  coverage@10 {row['coverage@10']:.4f}"
            + (f"  {gain:+.1%} vs best single" if gain is not None else "")
        )
    for segment, test in summary["paired_best_fuser_vs_best_single"].items():
        print(f"  paired, {segment}: {json.dumps(test)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k", help="data.source of the runs")
    parser.add_argument("--data", default=None, help="data.path (a folder of the dataset's files)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fuserec-quality"), help="runs go here")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="extra params override for every run (e.g. data.synthetic.n_interactions=100000)",
    )  # fmt: skip
    parser.add_argument("--summarise-only", action="store_true", help="read existing runs, run nothing")
    parser.add_argument("--results", type=Path, default=None, help="default: results/quality-<dataset>.json")
    args = parser.parse_args()
    summaries = []
    for seed in args.seeds:
        folder = (args.out / args.dataset / f"seed{seed}").resolve()
        if not args.summarise_only:
            run(args.dataset, args.data, seed, folder, args.sets)
        summaries.append(summarise(folder, seed))
        show(summaries[-1])
    results = args.results or RESULTS / f"quality-{args.dataset}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": args.dataset, "overrides": args.sets, "machine": machine(), "runs": summaries}
    results.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
