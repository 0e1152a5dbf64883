"""Fusion on ML-100k across seeds: every fuser beside the best single model, and the paired test.

Usage (from the repository root; each seed is one full `fuserec run`, about 15 minutes on 2 busy cores):
    python research/fusion_seeds.py --seeds 42 1 2 --out /tmp/fusion
    python research/fusion_seeds.py --seeds 42 1 2 --out /tmp/fusion --summarise-only

A seed changes every plugin's and every fuser's seed (`train.seed`); the data and split do not change.
Nothing is tuned here: the fusion configuration is params.yaml's, learned on the validation carve only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
RESULTS = Path(__file__).resolve().parent / "results" / "fusion-seeds-ml100k.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality import machine  # noqa: E402  (the product benchmark's record of where runs ran)


def run(seed: int, out: Path) -> Path:
    target = out / f"seed{seed}"
    cmd = [
        sys.executable, "-m", "fuserec.cli", "run",
        "-s", "data.source=movielens-100k", "-s", f"data.path={ML100K}",
        "-s", f"outputs={target}", "-s", f"train.seed={seed}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return target


def summarise(folder: Path, seed: int) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    sig = metrics.get("significance", {})
    allu = sig.get("all_users", {})
    best_single = sig.get("best_single")
    row = {
        "seed": seed,
        "best_single": best_single,
        "best_single_ndcg": metrics["models"][best_single]["ndcg@10"] if best_single else None,
        **{name: values["ndcg@10"] for name, values in sorted(metrics["fusers"].items())},
        "difference": allu.get("mean_difference"),
        "ci95": allu.get("ci95"),
        "p_value": allu.get("p_value"),
        "wilcoxon_p": allu.get("wilcoxon_p"),
    }
    keys = ("n_users", "candidate_mean", "baseline_mean", "best_single_on_segment", "relative_gain", "ci95")
    # cold_users: the real ones (<= 5 training positives); cold_simulated: warm users cut to 1-5 items.
    for segment in ("cold_users", "cold_simulated"):
        if segment in sig:
            row[segment] = {k: sig[segment].get(k) for k in (*keys, "p_value")}
    row["rerank"] = rerank_summary(metrics.get("rerank", {}))
    return row


def rerank_summary(rerank: dict, max_loss: float = 0.05) -> dict:
    """The exported scorer's diversity curve against no re-ranking, and its best point under ``max_loss``.

    The question asked of the curve: does some weight raise diversity@10 by 20% while NDCG@10 drops < 5%?
    """
    points = [p for p in rerank.get("curve", []) if p["novelty_weight"] == 0.0]
    if not points:
        return {}
    base = next(p for p in points if p["diversity_weight"] == 0.0)
    curve = [
        {
            "weight": p["diversity_weight"],
            "diversity_gain": round(p["diversity@10"] / base["diversity@10"] - 1, 4),
            "ndcg_change": round(p["ndcg@10"] / base["ndcg@10"] - 1, 4),
        }
        for p in points
    ]
    ok = [p for p in curve if p["ndcg_change"] > -max_loss]
    return {
        "scorer": rerank.get("scorer"),
        "best_under_5pct_loss": max(ok, key=lambda p: p["diversity_gain"]),
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fuserec-fusion"))
    parser.add_argument("--summarise-only", action="store_true", help="read existing runs, run nothing")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the rows are written")
    args = parser.parse_args()
    if not (ML100K / "u.data").exists():
        raise SystemExit(f"MovieLens-100k not found at {ML100K}: this benchmark needs ../shared/data")
    rows = []
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        if not args.summarise_only:
            run(seed, args.out)
        rows.append(summarise(folder, seed))
        print(json.dumps(rows[-1]))
    for row in rows:  # with --summarise-only: this machine, which must be the one that ran them
        row["machine"] = machine()
    args.results.parent.mkdir(exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
