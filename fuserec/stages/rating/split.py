"""Split the ratings: the temporal protocol (test = each user's latest ratings) or k random folds.

``temporal``: the rule of docs/protocol.md on every rating, not only positives: each user's ratings
sorted by (timestamp, item id), the latest ``floor(f * n + 0.5)`` to test, users with fewer than
``split.min_user_positives`` ratings train-only. ``kfold``: the ratings shuffled with ``rating.seed`` and
cut into ``rating.folds`` equal folds (Surprise's benchmark protocol). Then ``train`` holds every rating
(what the served model learns from), ``test`` is empty and ``folds.parquet`` carries the folds the
evaluate stage cross-validates over.
"""

from __future__ import annotations

import numpy as np

from fuserec.config import Params, SplitConfig
from fuserec.layout import Layout
from fuserec.manifest import write_json
from fuserec.splitting import split_frame
from fuserec.stages.rating.data import FOLDS_FILE, rated_interactions


def kfold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """``int64 [n]`` fold (1..folds) of each row: a seeded permutation cut into near-equal parts."""
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) * folds // max(n, 1) + 1
    return fold


def split(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    frame = rated_interactions(layout)
    layout.split.mkdir(parents=True, exist_ok=True)
    folds_path = layout.split / FOLDS_FILE
    cfg = params.rating
    if cfg.protocol == "temporal":
        rule = SplitConfig(
            method="temporal_user",
            test_fraction=params.split.test_fraction,
            min_user_positives=params.split.min_user_positives,
        )
        train, test = split_frame(frame, rule)
        folds_path.unlink(missing_ok=True)
    else:
        train, test = frame, frame.iloc[:0]
        frame.assign(fold=kfold_assignment(len(frame), cfg.folds, cfg.seed)).to_parquet(
            folds_path, index=False
        )
    train.to_parquet(layout.split_file("train"), index=False)
    test.to_parquet(layout.split_file("test"), index=False)
    for part in ("train_inner", "valid"):  # the ranking task's carve: not used here, not left stale
        layout.split_file(part).unlink(missing_ok=True)
    summary = {
        "task": "rating",
        "protocol": cfg.protocol,
        **({"folds": cfg.folds, "seed": cfg.seed} if cfg.protocol == "kfold" else {}),
        "train": {"ratings": len(train), "users": int(train["user"].nunique())},
        "test": {"ratings": len(test), "users": int(test["user"].nunique())},
    }
    write_json(layout.split / "summary.json", summary)
    return str(layout.split)


__all__ = ["kfold_assignment", "split"]
