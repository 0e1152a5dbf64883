"""Which scorer should feature fusion use: bilinear, an MLP, or an MLP over an autoencoder's code?

Each variant of the ``features`` fuser learns on the validation carve of a finished run (components fitted
on train', as in the fuse stage) and prints its held-out validation NDCG@10 beside the best component's,
the choice's evidence. It is then bound to the components refitted on full train and scored once on test
(NDCG@10 under the protocol, for the record, not for choosing), with its fit time: the scorer itself, and
what is served (the best component alone when the scorer lost to it on held-out users: ``fallback``).

Usage (after a `fuserec run` on ML-100k, whose outputs hold the train' fits in ``inner_models/``):
    python research/feature_scorers.py --outputs outputs --seed 42
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fuserec.artifacts import load_algorithm, trained_models
from fuserec.config import load_params
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.layout import SPLIT_FILES, Layout
from fuserec.metrics import evaluate_rankings
from fuserec.plugins.fusers.features import FeatureFusion
from fuserec.stages.fuse import component_names, fusion_inputs

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
VARIANTS = {
    "bilinear": {},
    "bilinear-train'-vectors": {"item_vectors": "fitted"},
    "mlp": {"scorer": "mlp"},
    "mlp+autoencoder32": {"scorer": "mlp", "autoencoder": 32},
    "mlp+autoencoder64": {"scorer": "mlp", "autoencoder": 64},
}


def test_ndcg(fuser: FeatureFusion, train: Dataset, test: pd.DataFrame) -> float:
    """NDCG@10 over the test users, training items excluded (the protocol's full ranking)."""
    users = np.unique(test["user"].to_numpy())
    hist, seen = train.histories(), train.matrix()
    lists = []
    for start in range(0, len(users), 256):
        rows = users[start : start + 256]
        scores = fuser.score(hist.select(rows))
        scores[seen[rows].toarray() > 0] = -np.inf
        lists.append(np.argsort(-scores, axis=1, kind="stable")[:, :10])  # ties: lower item index first
    truth = interactions_matrix(test, train.n_users, train.n_items)[users]
    return evaluate_rankings(np.concatenate(lists), truth, [10], train.item_popularity())["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a finished run's outputs folder")
    parser.add_argument("--seed", type=int, default=42, help="the run's train.seed")
    parser.add_argument("--source", default="movielens-100k")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    params = load_params(
        PARAMS, [f"data.source={args.source}", f"outputs={args.outputs}", f"train.seed={args.seed}"]
    )
    layout = Layout(args.outputs)
    names = component_names(params, layout)
    inner, valid, inner_models = fusion_inputs(layout, names)
    train = Dataset.load(layout.clean, interactions=layout.split / SPLIT_FILES["train"])
    test = pd.read_parquet(layout.split / SPLIT_FILES["test"])
    models = {p.name: load_algorithm(p) for p in trained_models(layout) if p.name in names}
    base = {"seed": args.seed, **params.fuser_config("features")}
    for variant in args.variants:
        start = time.perf_counter()
        fuser = FeatureFusion({**base, **VARIANTS[variant]}).fit(inner_models, inner, valid)
        fit_s = time.perf_counter() - start
        fuser.bind(models, train)
        fallback = fuser.fallback_
        served = test_ndcg(fuser, train, test)
        fuser.fallback_ = -1  # the scorer itself, whether or not it is served
        record = {
            "variant": variant,
            "seed": args.seed,
            "holdout_ndcg@10": {k: round(v, 4) for k, v in fuser.holdout_ndcg.items()},
            "steps": fuser.training_["steps"],
            "autoencoder_error": round(getattr(fuser, "autoencoder_error_", float("nan")), 4),
            "fallback_to": fuser.names_[fallback] if fallback >= 0 else None,
            "test_ndcg@10_scorer": round(test_ndcg(fuser, train, test), 4),
            "test_ndcg@10_served": round(served, 4),
            "fit_s": round(fit_s, 1),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
