"""Choose RP3beta's defaults on the MovieLens-100k validation carve, then score test once.

Under docs/protocol.md every choice is made on validation (fit on train', score validation); only the
chosen setting is refit on the full train and scored on test. Needs the split stage's outputs of an
ML-100k run, e.g.::

    fuserec stage validate --set data.source=movielens-100k --set data.path=../shared/data/ml-100k \\
        --set outputs=/tmp/ml100k/outputs          # then the same for clean and split
    python examples/external-plugin/tune_ml100k.py /tmp/ml100k/outputs
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from fuserec.evaluation import CarveData, evaluate_model, load_carve

from fuserec_rp3beta import RP3beta

GRID = {
    "alpha": [0.0, 0.25, 0.5, 0.75, 1.0],
    "beta": [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
    "k": [50, 100, 200, 400, 800, 1600],
}


def ndcg10(config: dict[str, float], carve: CarveData) -> float:
    algo = RP3beta(config).fit(carve.fit)
    return float(evaluate_model(algo, carve.fit, carve.truth, [10], 1024, segments=False)["ndcg@10"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path, help="outputs folder holding clean/ and split/ of ML-100k")
    parser.add_argument("--write", type=Path, help="write the search and the test score as JSON here")
    args = parser.parse_args()

    validation = load_carve(args.outputs, "validation")
    trials = []
    start = time.perf_counter()
    for alpha, beta, k in itertools.product(GRID["alpha"], GRID["beta"], GRID["k"]):
        config = {"alpha": alpha, "beta": beta, "k": k}
        trials.append({**config, "validation_ndcg@10": round(ndcg10(config, validation), 6)})
        print(trials[-1], flush=True)
    best = max(trials, key=lambda t: t["validation_ndcg@10"])
    chosen = {key: best[key] for key in GRID}
    test = load_carve(args.outputs, "test")
    algo = RP3beta(chosen).fit(test.fit)
    metrics = evaluate_model(algo, test.fit, test.truth, [10], 1024, segments=False)
    summary = {
        "grid": GRID,
        "chosen_on_validation": chosen,
        "validation_ndcg@10": best["validation_ndcg@10"],
        "test": {m: round(float(metrics[m]), 6) for m in ("ndcg@10", "recall@10", "hr@10", "coverage@10")},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps({**summary, "trials": trials}, indent=2) + "\n")


if __name__ == "__main__":
    main()
