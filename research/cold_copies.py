"""Does learning from simulated cold users help? Validation users only, no test data.

The learned fusers can add copies of warm validation users cut to their latest 1-5 items
(``cold_copies``, see ``fuserec.fusion.ValidationScores``). This benchmark decides that setting the way
every setting is decided, on the validation carve: the validation users are split in two halves; each
fuser learns on half A (components fitted on train', as in the fuse stage) with and without copies and is
scored on half B twice: on B's real histories, and on B's warm users cut to their latest 1-5 items
(``fuserec.segments.simulated_cold``; their whole train' set stays excluded from the ranking).

Usage (after a `fuserec run` on ML-100k, whose outputs hold the train' fits in ``inner_models/``):
    python research/cold_copies.py --outputs /tmp/fusion/seed42 --seed 42 --splits 1 2 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fuserec.config import load_params
from fuserec.data.dataset import interactions_matrix
from fuserec.histories import Histories
from fuserec.layout import Layout
from fuserec.metrics import ndcg_at_k, top_k
from fuserec.registry import get_fuser
from fuserec.segments import simulated_cold
from fuserec.stages.fuse import component_names, fusion_inputs

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a finished run's outputs folder")
    parser.add_argument("--seed", type=int, default=42, help="the run's train.seed (fusers' seed)")
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3], help="seeds of the A/B halves")
    parser.add_argument("--copies", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--fusers", nargs="+", default=["gating", "stacking"])
    parser.add_argument("--source", default="movielens-100k", help="data.source the run used")
    args = parser.parse_args()
    overrides = [f"data.source={args.source}", f"outputs={args.outputs}", f"train.seed={args.seed}"]
    params = load_params(PARAMS, overrides)
    layout = Layout(args.outputs)
    inner, valid, models = fusion_inputs(layout, component_names(params, layout))
    hist, seen = inner.histories(), inner.matrix()
    truth = interactions_matrix(valid, inner.n_users, inner.n_items)

    def ndcg(score, users: np.ndarray, histories: Histories) -> float:
        ranked = top_k(np.asarray(score(histories.select(users)), np.float32), 10, exclude=seen[users])
        return float(np.nanmean(ndcg_at_k(ranked, truth[users], 10)))

    for split in args.splits:
        users = np.random.default_rng(split).permutation(np.unique(valid["user"].to_numpy()))
        half_a, half_b = np.sort(users[: len(users) // 2]), np.sort(users[len(users) // 2 :])
        cold = simulated_cold(hist, half_b, len(half_b), args.seed)
        assert cold is not None
        cut, cut_users = cold
        singles = {n: (ndcg(m.score, half_b, hist), ndcg(m.score, cut_users, cut)) for n, m in models.items()}
        best_real = max(singles, key=lambda n: singles[n][0])
        best_cut = max(singles, key=lambda n: singles[n][1])
        head = {"split": split, "users_b": len(half_b), "cut_users_b": len(cut_users)}
        head |= {"best_single_real": [best_real, round(singles[best_real][0], 4)]}
        print(json.dumps(head | {"best_single_cut": [best_cut, round(singles[best_cut][1], 4)]}), flush=True)
        for name in args.fusers:
            cls = get_fuser(name)
            for copies in args.copies:
                config = {"seed": args.seed, **params.fuser_config(name), "cold_copies": copies}
                fuser = cls(cls.Config.model_validate(config))
                fuser.fit(models, inner, valid[valid["user"].isin(half_a)])
                row = {"split": split, "fuser": name, "cold_copies": copies}
                row |= {"real": round(ndcg(fuser.score, half_b, hist), 4)}
                print(json.dumps(row | {"cut": round(ndcg(fuser.score, cut_users, cut), 4)}), flush=True)


if __name__ == "__main__":
    main()
