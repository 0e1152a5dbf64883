"""Split: positives -> train / test, and the same split of train -> train' / validation.

``temporal_user`` is the protocol of ../shared/PROTOCOL.md: each user's positives sorted by (timestamp,
item id), the last floor(f * n + 0.5) to test, users with fewer than ``min_user_positives`` train-only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import task

from fuserec.config import Params, SplitConfig
from fuserec.data.dataset import INTERACTIONS_FILE
from fuserec.layout import Layout
from fuserec.manifest import write_json

SPLIT_FILES = {
    "train": "train.parquet",
    "test": "test.parquet",
    "train_inner": "train_inner.parquet",
    "valid": "valid.parquet",
}


def split_frame(frame: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) of an interactions frame with ``user``, ``item``, ``timestamp`` columns."""
    if cfg.method == "global_time":
        cut = np.quantile(frame["timestamp"].to_numpy(), 1.0 - cfg.test_fraction, method="lower")
        is_test = (frame["timestamp"] > cut).to_numpy()
        return frame[~is_test].reset_index(drop=True), frame[is_test].reset_index(drop=True)
    ordered = frame.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)
    n = ordered.groupby("user")["user"].transform("size").to_numpy()
    rank = ordered.groupby("user").cumcount().to_numpy()
    if cfg.method == "temporal_user":
        n_test = np.floor(cfg.test_fraction * n + 0.5).astype(np.int64)
    else:  # leave_last_out
        n_test = np.ones_like(n)
    n_test = np.where(n >= cfg.min_user_positives, n_test, 0)
    is_test = rank >= n - n_test
    return ordered[~is_test].reset_index(drop=True), ordered[is_test].reset_index(drop=True)


def split_all(frame: pd.DataFrame, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    train, test = split_frame(frame, cfg)
    train_inner, valid = split_frame(train, cfg)
    return {"train": train, "test": test, "train_inner": train_inner, "valid": valid}


@task(name="split")
def split(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    frame = pd.read_parquet(layout.clean / INTERACTIONS_FILE)
    parts = split_all(frame, params.split)
    layout.split.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        part.to_parquet(layout.split / SPLIT_FILES[name], index=False)
    summary = {name: {"interactions": len(p), "users": int(p["user"].nunique())} for name, p in parts.items()}
    write_json(layout.split / "summary.json", {"method": params.split.method, **summary})
    return str(layout.split)
