"""What the served lists are worth on test: every seen item left out, against the history alone.

The evaluate stage follows the protocol: it leaves out each user's training positives and nothing else.
The service and ``fuserec recommend`` also leave out every other item the user has an event for: a film
rated below the implicit threshold (before the test period, as the first-start import stores it) and a
positive older than the served history window. This benchmark scores the exported ONNX model through the
batch path (``fuserec.serving.batch``, the same rules as ``POST /recommend``) for every test user, twice:
leaving out only the served history (the service's rule before, kept here for comparison) and leaving out
everything seen (the rule now). It reports NDCG@10 and Recall@10 against the test positives and how many
listed slots held a film the user had already rated low.

These are served-list numbers, not protocol numbers: the protocol's anchors do not leave low ratings out.

Usage (after `fuserec run`s on ML-100k, e.g. those of ``research/fusion_seeds.py``):
    python research/served_lists.py --outputs /tmp/fusion/seed42 /tmp/fusion/seed1 /tmp/fusion/seed2 \
        --json research/results/served-lists-ml100k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fuserec.data.dataset import interactions_matrix
from fuserec.layout import CATALOG_FILE, MODEL_FILE, SPLIT_FILES, Layout
from fuserec.manifest import read_json
from fuserec.metrics import evaluate_rankings
from fuserec.onnx_model import OnnxRecommender
from fuserec.serving.batch import score_batches, training_events, training_histories

NOW = 2_000_000_000  # after every ML-100k event, so no history is cut by time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--outputs", type=Path, nargs="+", required=True, help="finished runs' outputs folders"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args()
    results = [served_lists(outputs, args.k) for outputs in args.outputs]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def served_lists(outputs: Path, k: int) -> dict:
    """Both rules' served top-``k`` for one run's test users, measured on its test positives."""
    layout = Layout(outputs)
    manifest = read_json(layout.export / "manifest.json")
    model = OnnxRecommender(
        layout.export / MODEL_FILE, manifest["providers"], prepack=manifest.get("prepack", False)
    )
    n_items = len(pd.read_parquet(layout.export / CATALOG_FILE))
    test = pd.read_parquet(layout.split / SPLIT_FILES["test"], columns=["user", "item"])
    users = pd.read_parquet(layout.clean / "users.parquet", columns=["user", "user_id"])
    test_users = np.unique(test["user"].to_numpy())
    user_ids = users.set_index("user")["user_id"].astype(str)[test_users].tolist()
    row = np.full(len(users), -1)
    row[test_users] = np.arange(len(test_users))
    truth = interactions_matrix(test.assign(user=row[test["user"].to_numpy()]), len(test_users), n_items)
    events = training_events(layout)
    positives = events[events["positive"].to_numpy(bool)]
    popularity = np.bincount(positives["item"].to_numpy(), minlength=n_items)
    low = events[~events["positive"].to_numpy(bool)]
    low = low.assign(user=row[low["user"].to_numpy()])
    rated_low = interactions_matrix(low[low["user"] >= 0], len(test_users), n_items)  # test users' only
    served = training_histories(layout, user_ids, int(manifest["max_history"]), NOW)
    results = {"outputs": str(outputs), "model": manifest["algorithm"]["name"], "users": len(user_ids)}
    rules = {
        "history_only": dataclasses.replace(served, seen=[[] for _ in served.items]),
        "every_seen_item": served,
    }
    for rule, histories in rules.items():
        top = np.full((len(user_ids), k), -1, dtype=np.int64)
        for _, frame in score_batches(model, histories, n_items, k, 256):
            top[frame["user"].to_numpy(), frame["rank"].to_numpy() - 1] = frame["item"].to_numpy()
        metrics = evaluate_rankings(top, truth, [k], popularity)
        listed = top >= 0
        held_low = np.asarray(rated_low[np.nonzero(listed)[0], top[listed]]).ravel() > 0
        results[rule] = {
            f"ndcg@{k}": round(float(metrics[f"ndcg@{k}"]), 4),
            f"recall@{k}": round(float(metrics[f"recall@{k}"]), 4),
            "slots": int(listed.sum()),
            "slots_rated_low": int(held_low.sum()),
        }
        print(outputs, rule, results[rule], flush=True)
    return results


if __name__ == "__main__":
    main()
