"""The evaluation protocol's split: positives -> train / test, and train -> train' / validation.

``temporal_user`` is the protocol of ``docs/protocol.md``: each user's positives sorted by (timestamp,
item id), the last floor(f * n + 0.5) to test, users with fewer than ``min_user_positives`` train-only.
Plugins that early-stop carve their own validation the same way, so this lives below the stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fuserec.config import SplitConfig
from fuserec.data.dataset import Dataset


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


@dataclass(frozen=True)
class Carve:
    """What a model fits on (``fit``) and the held-out positives it is scored against (``truth``)."""

    fit: Dataset
    truth: pd.DataFrame


def carve_validation(data: Dataset, fraction: float = 0.2, min_user_positives: int = 5) -> Carve | None:
    """The protocol's per-user temporal split of ``data`` in memory; None when nothing would be held out.

    Why here: a plugin that early-stops, and the fuser test kit, hold out validation exactly as the split
    stage does, without reading the stage's files.
    """
    cfg = SplitConfig(method="temporal_user", test_fraction=fraction, min_user_positives=min_user_positives)
    fit, truth = split_frame(data.interactions, cfg)
    if truth.empty:
        return None
    return Carve(data.with_interactions(fit), truth)
