"""What would a user's low ratings be worth as a second history? Measured before anything is built.

docs/protocol.md lets a model read ratings below the positive threshold as side information, if they are dated
before the user's first held-out positive. No plugin reads them: ``Histories`` carry positives only and the
served graph has one history input. This script fits plugins on positives as ``fuserec run`` would, then
scores each carve three ways:

- ``positives``: the plain protocol (what every number in README is);
- ``side excluded``: the same scores, with the user's low-rated items removed from the candidates;
- ``side as history``: the low-rated items are also added to the history the model scores from.

The validation carve (fit on train', scored on validation) is the one that would decide whether to build
it; test is printed beside it. Paired per-user comparisons use fuserec.significance.

Usage: python research/side_history.py [--data ../shared/data/ml-100k] [--algorithms ease itemknn]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fusion_seeds import machine  # research/ is on sys.path when this runs as a script

from fuserec.artifacts import seed_everything
from fuserec.config import load_params
from fuserec.evaluation import evaluate_model, load_carve
from fuserec.histories import Histories
from fuserec.layout import RATINGS_FILE, Layout
from fuserec.registry import get_algorithm
from fuserec.significance import paired_comparison
from fuserec.splitting import Carve
from fuserec.tasks.clean import clean
from fuserec.tasks.split import split
from fuserec.tasks.validate import validate

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "research" / "results"


def side_items(ratings: pd.DataFrame, carve: Carve) -> pd.DataFrame:
    """Each scored user's non-positive ratings dated strictly before their first held-out positive."""
    first_held_out = carve.truth.groupby("user")["timestamp"].min()
    low = ratings[~ratings["positive"]]
    cut = low["user"].map(first_held_out)
    return low[cut.notna() & (low["timestamp"] < cut)][["user", "item", "rating", "timestamp"]]


class WithSide:
    """A fitted plugin scored from positives (+ side items when ``add``), side items never recommended."""

    def __init__(self, algo: Any, carve: Carve, side: pd.DataFrame, add: bool) -> None:
        data = carve.fit
        self.algo = algo
        self.side = Histories.from_frame(side, data.n_users, data.n_items)
        merged = pd.concat([data.interactions[side.columns], side], ignore_index=True)
        self.history = Histories.from_frame(merged, data.n_users, data.n_items) if add else None

    def score(self, histories: Histories) -> np.ndarray:
        users = histories.users
        scores = self.algo.score(histories if self.history is None else self.history.select(users))
        side = self.side.select(users)
        scores[np.repeat(np.arange(len(side)), side.lengths), side.items] = -np.inf
        return scores


def measure(name: str, params: Any, carve: Carve, side: pd.DataFrame) -> dict[str, Any]:
    cls = get_algorithm(name)
    config = cls.Config.model_validate({"seed": params.train.seed, **params.algorithm_config(name)})
    seed_everything(config.seed)
    algo = cls(config).fit(carve.fit)
    variants = {
        "positives": algo,
        "side excluded": WithSide(algo, carve, side, add=False),
        "side as history": WithSide(algo, carve, side, add=True),
    }
    runs = {
        key: evaluate_model(model, carve.fit, carve.truth, [10], params.evaluate.batch_size, False, True)
        for key, model in variants.items()
    }
    base = runs["positives"]["per_user"]
    out: dict[str, Any] = {}
    for key, run in runs.items():
        per_user = run["per_user"]
        cold = per_user["cold"]
        out[key] = {
            "ndcg@10": round(run["ndcg@10"], 4),
            "cold_ndcg@10": round(float(per_user["ndcg@10"][cold].mean()), 4) if cold.any() else None,
            "n_cold": int(cold.sum()),
        }
        if key != "positives":
            out[key]["vs_positives"] = paired_comparison(per_user["ndcg@10"], base["ndcg@10"])
    # The service already leaves seen items out, so the question a second input answers is this one.
    added, excluded = runs["side as history"]["per_user"], runs["side excluded"]["per_user"]
    cold = added["cold"]
    out["side as history"]["vs_side_excluded"] = paired_comparison(added["ndcg@10"], excluded["ndcg@10"])
    out["side as history"]["cold_vs_side_excluded"] = paired_comparison(
        added["ndcg@10"][cold], excluded["ndcg@10"][cold]
    )
    return out


def _gain(diff: dict[str, Any]) -> str:
    if diff.get("relative_gain") is None or "p_value" not in diff:
        return f"{diff.get('mean_difference', float('nan')):+.4f}"
    return f"{diff['relative_gain']:+.1%} (p = {diff['p_value']:.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    parser.add_argument("--algorithms", nargs="+", default=["ease", "itemknn"])
    parser.add_argument("--results", type=Path, default=RESULTS / "side-history-ml100k.json")
    args = parser.parse_args()
    outputs = Path(tempfile.mkdtemp(prefix="fuserec-side-")) / "outputs"
    params = load_params(
        REPO / "params.yaml", [f"outputs={outputs}", "data.source=movielens-100k", f"data.path={args.data}"]
    )
    for stage in (validate, clean, split):
        stage.fn(params)
    ratings = pd.read_parquet(Layout(outputs).clean / RATINGS_FILE)
    result: dict[str, Any] = {"machine": machine()}
    for carve_name in ("validation", "test"):
        carve = load_carve(outputs, carve_name)
        side = side_items(ratings, carve)
        users = carve.truth["user"].nunique()
        result[carve_name] = {"side_items": len(side), "users": users, "models": {}}
        print(
            f"\n{carve_name}: {users} users, {len(side)} low-rated items before the first held-out positive"
        )
        for name in args.algorithms:
            rows = measure(name, params, carve, side)
            result[carve_name]["models"][name] = rows
            for key, row in rows.items():
                paired = "".join(
                    f"  {label} {_gain(row[field])}"
                    for label, field in (
                        ("vs positives", "vs_positives"),
                        ("vs side excluded", "vs_side_excluded"),
                        ("cold vs side excluded", "cold_vs_side_excluded"),
                    )
                    if field in row
                )
                print(
                    f"  {name:<8} {key:<16} NDCG@10 {row['ndcg@10']:.4f}"
                    f"  cold ({row['n_cold']}) {row['cold_ndcg@10']}{paired}"
                )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
