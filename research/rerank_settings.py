"""Which re-ranking settings buy the most diversity per point of NDCG@10? Validation users only.

The exported scorer (``export.algorithm``, a fuser or a plugin) learns on half A of the validation users
(components fitted on train', as in the fuse stage) and half B's lists are re-ranked under every setting
(``fuserec.rerank.Rerank``: diversity weight, ``keep``, ``depth``, ``relevance``, ``order``). For each setting
it prints diversity@10 and NDCG@10 relative to no re-ranking; per (keep, depth, relevance, order), the largest
diversity gain whose NDCG@10 loss stays under ``--max-loss``.

Usage (after a `fuserec run` on ML-100k, whose outputs hold the train' fits in ``inner_models/``):
    python research/rerank_settings.py --outputs /tmp/fusion/seed42 --seed 42 --split 1
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuserec.artifacts import chosen_algorithm
from fuserec.config import load_params
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.features import item_content_vectors
from fuserec.layout import Layout
from fuserec.registry import FUSERS_GROUP, available, get_fuser
from fuserec.rerank import DiversityCurve, Rerank
from fuserec.stages.fuse import component_names, fusion_inputs

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a finished run's outputs folder")
    parser.add_argument("--seed", type=int, default=42, help="the run's train.seed")
    parser.add_argument("--split", type=int, default=1, help="seed of the A/B halves of validation users")
    parser.add_argument("--source", default="movielens-100k")
    parser.add_argument("--keep", type=int, nargs="+", default=[5, 6, 7])
    parser.add_argument("--depth", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--relevance", nargs="+", default=["minmax", "rank"])
    parser.add_argument("--order", nargs="+", default=["score", "greedy"])
    parser.add_argument("--weights", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(10)])
    parser.add_argument("--max-loss", type=float, default=0.05, help="largest relative NDCG@10 loss")
    args = parser.parse_args()
    name, scorer, inner, valid, half_b = scorer_on_half_b(args.outputs, args.seed, args.split, args.source)
    weights = sorted({0.0, *args.weights})
    grid = list(itertools.product(args.keep, args.depth, args.relevance, args.order))
    settings = [
        Rerank(diversity=w, keep=keep, depth=depth, relevance=rel, order=order)
        for keep, depth, rel, order in grid
        for w in weights
    ]
    matrix = inner.matrix()
    n_with_history = int((np.diff(matrix.indptr) > 0).sum())
    curve = DiversityCurve(
        item_content_vectors(inner.items), inner.item_popularity(), n_with_history, settings
    )
    hist = inner.histories()
    for start in range(0, len(half_b), 256):
        rows = half_b[start : start + 256]
        curve.add(scorer.score(hist.select(rows)), matrix[rows])
    points = curve.result(interactions_matrix(valid, inner.n_users, inner.n_items)[half_b])
    base = points[0]  # weight 0: the scorer's own order (the same for every setting)
    for i, (keep, depth, rel, order) in enumerate(grid):
        block = points[i * len(weights) : (i + 1) * len(weights)]
        rows = [
            {
                "weight": w,
                "diversity_gain": round(p["diversity@10"] / base["diversity@10"] - 1, 4),
                "ndcg_change": round(p["ndcg@10"] / base["ndcg@10"] - 1, 4),
            }
            for w, p in zip(weights, block, strict=True)
        ]
        ok = [r for r in rows if r["ndcg_change"] > -args.max_loss]
        best = max(ok, key=lambda r: r["diversity_gain"])
        head = {
            "scorer": name,
            "split": args.split,
            "keep": keep,
            "depth": depth,
            "relevance": rel,
            "order": order,
        }
        print(json.dumps(head | {"best_under_max_loss": best, "curve": rows}), flush=True)


def scorer_on_half_b(
    outputs: Path, seed: int, split: int, source: str
) -> tuple[str, Any, Dataset, pd.DataFrame, np.ndarray]:
    """The exported scorer learned on half A of the validation users, and half B's users to re-rank.

    Returns its name, the scorer, the train' dataset, the validation truth and half B's user indices.
    """
    params = load_params(PARAMS, [f"data.source={source}", f"outputs={outputs}", f"train.seed={seed}"])
    layout = Layout(outputs)
    inner, valid, models = fusion_inputs(layout, component_names(params, layout))
    users = np.random.default_rng(split).permutation(np.unique(valid["user"].to_numpy()))
    half_a, half_b = np.sort(users[: len(users) // 2]), np.sort(users[len(users) // 2 :])
    name = chosen_algorithm(params, layout)
    if name not in available(FUSERS_GROUP):
        return name, models[name], inner, valid, half_b
    cls = get_fuser(name)
    scorer = cls(cls.Config.model_validate({"seed": seed, **params.fuser_config(name)}))
    scorer.fit(models, inner, valid[valid["user"].isin(half_a)])
    return name, scorer, inner, valid, half_b


if __name__ == "__main__":
    main()
