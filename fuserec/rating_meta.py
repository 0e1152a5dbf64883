"""Meta-features of a (history, item) pair: what a rating fuser reads besides the components' predictions.

Which component to trust depends on how much is known: a neighbourhood model is noisy for a user with five
ratings or an item with three, a factor model is biased for a user far from the crowd. These features say
how much is known, from the same inputs the served graph has (a rated history and stored item arrays), so
the fused model serves new users and fresh ratings without retraining:

- user side, from the history: ``user_support`` (log1p of its length), ``user_mean`` and ``user_std`` of its
  ratings, ``user_offset`` (its mean minus the mean of its items' means: a crude user bias) and
  ``user_mainstream`` (mean item support of its items);
- item side, stored arrays from the training ratings: ``item_support`` (log1p count), ``item_mean``,
  ``item_std``, ``item_recency`` (days from its latest rating to the training set's end) and ``item_age``
  (days from its first rating to that end); -1 days for an item never rated, or without timestamps.

Computed once in numpy (:func:`pair_meta`) and once in torch (:class:`MetaModule`) with the same formulas;
the out-of-fold rows of :mod:`fuserec.rating_fusion` get them from the other folds' ratings, exactly as the
served model gets them from the whole training set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fuserec.histories import Histories

DAY = 86_400.0
USER_FEATURES = ("user_support", "user_mean", "user_std", "user_offset", "user_mainstream")
ITEM_FEATURES = ("item_support", "item_mean", "item_std", "item_recency", "item_age")
#: Column order of every meta-feature matrix ``[n, F]``.
META_FEATURES = USER_FEATURES + ITEM_FEATURES


@dataclass(frozen=True)
class ItemStats:
    """``table float64 [n_items, 5]`` (columns :data:`ITEM_FEATURES`) and the training ratings' mean."""

    table: np.ndarray
    global_mean: float

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, n_items: int) -> ItemStats:
        """Per-item statistics of a ``user, item, rating[, timestamp]`` frame (items without ratings: the
        global mean, zero spread, -1 days)."""
        items = frame["item"].to_numpy(np.int64)
        ratings = frame["rating"].to_numpy(np.float64)
        mu = float(ratings.mean()) if len(ratings) else 0.0
        count = np.bincount(items, minlength=n_items).astype(np.float64)
        safe = np.maximum(count, 1.0)
        mean = np.where(count > 0, np.bincount(items, ratings, n_items) / safe, mu)
        var = np.bincount(items, (ratings - mean[items]) ** 2, n_items) / safe
        recency = np.full(n_items, -1.0)
        age = np.full(n_items, -1.0)
        if "timestamp" in frame and len(frame):
            ts = frame["timestamp"].to_numpy(np.int64)
            end = int(ts.max())
            latest = np.full(n_items, np.iinfo(np.int64).min)
            first = np.full(n_items, np.iinfo(np.int64).max)
            np.maximum.at(latest, items, ts)
            np.minimum.at(first, items, ts)
            rated = count > 0
            recency[rated] = (end - latest[rated]) / DAY
            age[rated] = (end - first[rated]) / DAY
        table = np.column_stack([np.log1p(count), mean, np.sqrt(var), recency, age])
        return cls(table, mu)

    def state(self) -> dict[str, np.ndarray]:
        return {"item_table": self.table, "global_mean": np.asarray(self.global_mean, dtype=np.float64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ItemStats:
        return cls(np.asarray(state["item_table"], np.float64), float(state["global_mean"]))


def history_meta(histories: Histories, stats: ItemStats) -> np.ndarray:
    """``float64 [B, 5]``: :data:`USER_FEATURES` of each rated history (an empty one: the global mean)."""
    assert histories.ratings is not None, "meta-features need rated histories"
    b = len(histories)
    rows = np.repeat(np.arange(b), histories.lengths)
    ratings = histories.ratings.astype(np.float64)
    n = histories.lengths.astype(np.float64)
    safe = np.maximum(n, 1.0)
    mean = np.where(n > 0, np.bincount(rows, ratings, b) / safe, stats.global_mean)
    std = np.sqrt(np.bincount(rows, (ratings - mean[rows]) ** 2, b) / safe)
    item_mean = np.bincount(rows, stats.table[histories.items, 1], b) / safe
    offset = np.where(n > 0, mean - item_mean, 0.0)
    mainstream = np.bincount(rows, stats.table[histories.items, 0], b) / safe
    return np.column_stack([np.log1p(n), mean, std, offset, mainstream])


def pair_meta(histories: Histories, rows: np.ndarray, items: np.ndarray, stats: ItemStats) -> np.ndarray:
    """``float64 [n, F]``: the meta-features of pairs (history ``rows[n]``, item ``items[n]``)."""
    user = history_meta(histories, stats)
    return np.hstack([user[np.asarray(rows, np.int64)], stats.table[np.asarray(items, np.int64)]])


def grid_meta(histories: Histories, items: np.ndarray, stats: ItemStats) -> np.ndarray:
    """``float64 [B, m, F]``: the meta-features of every ``items[b, j]`` for history ``b``."""
    b, m = items.shape
    user = np.broadcast_to(history_meta(histories, stats)[:, None, :], (b, m, len(USER_FEATURES)))
    return np.concatenate([user, stats.table[items]], axis=2)


class MetaModule(torch.nn.Module):
    """The torch form of :func:`grid_meta` over the served inputs (padded history, its ratings, items).

    It computes in float64, as numpy does, and returns float32: the two agree to the last float32 bit
    almost always, which matters where a tree splits on a meta-feature.
    """

    table: torch.Tensor  # buffer float64 [n_items, 5]

    def __init__(self, stats: ItemStats) -> None:
        super().__init__()
        self.register_buffer("table", torch.from_numpy(np.asarray(stats.table, np.float64)))
        self.global_mean = float(stats.global_mean)

    def forward(self, history: torch.Tensor, ratings: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        table = self.table
        n_items = table.shape[0]
        valid = (history >= 0) & (history < n_items)
        w = valid.to(torch.float64)
        safe = torch.where(valid, history, torch.zeros_like(history))
        # where, not a product: padding may hold NaN ratings
        r = torch.where(valid, ratings.to(torch.float64), torch.zeros_like(w))
        n = w.sum(dim=1)
        denom = torch.clamp(n, min=1.0)
        mean = torch.where(n > 0, r.sum(dim=1) / denom, torch.full_like(n, self.global_mean))
        std = torch.sqrt(((r - mean[:, None]) ** 2 * w).sum(dim=1) / denom)
        hist = table[safe]  # [B, L, 5]
        item_mean = (hist[:, :, 1] * w).sum(dim=1) / denom
        offset = torch.where(n > 0, mean - item_mean, torch.zeros_like(n))
        mainstream = (hist[:, :, 0] * w).sum(dim=1) / denom
        user = torch.stack([torch.log1p(n), mean, std, offset, mainstream], dim=1)  # [B, 5]
        b, m = items.shape
        out = torch.cat([user[:, None, :].expand(b, m, user.shape[1]), table[items]], dim=2)
        return out.to(torch.float32)


__all__ = [
    "ITEM_FEATURES",
    "META_FEATURES",
    "USER_FEATURES",
    "ItemStats",
    "MetaModule",
    "grid_meta",
    "history_meta",
    "pair_meta",
]
