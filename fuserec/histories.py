"""Batches of user histories: the one input every algorithm scores.

Scoring from histories rather than user ids is what lets a new user, or a user with a fresh event, be
served by the exported graph without retraining. Items of each user are kept in time order so that
sequence models get order and timestamps while set-based models read the same object as a set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

PAD = -1  # padding value of the padded (ONNX) history layout


@dataclass(frozen=True)
class Histories:
    """CSR-shaped histories of ``len(self)`` users over a catalog of ``n_items`` items.

    ``items[indptr[u]:indptr[u+1]]`` are user u's item indices in time order (oldest first);
    ``timestamps`` and ``ratings`` align with ``items`` when known. ``users`` optionally gives each
    history's row in the fitted dataset's users table (-1 for a user it does not know), so models that
    read user attributes (cold start) can find them; models must not require it.
    """

    indptr: np.ndarray
    items: np.ndarray
    n_items: int
    timestamps: np.ndarray | None = None
    ratings: np.ndarray | None = None
    users: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.indptr.ndim != 1 or self.indptr[0] != 0 or self.indptr[-1] != len(self.items):
            raise ValueError("Histories.indptr must start at 0 and end at len(items)")
        if len(self.items) and (self.items.min() < 0 or self.items.max() >= self.n_items):
            raise ValueError(
                f"history item indices must lie in [0, {self.n_items}); map raw ids through the catalog first"
            )

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def user(self, u: int) -> np.ndarray:
        return self.items[self.indptr[u] : self.indptr[u + 1]]

    @classmethod
    def from_lists(
        cls,
        lists: Sequence[Sequence[int]],
        n_items: int,
        timestamps: Sequence[Sequence[int]] | None = None,
    ) -> Histories:
        """Build from per-user item lists already in time order (an empty list is a user with no history)."""
        lengths = np.array([len(x) for x in lists], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if len(lists) else np.zeros(0)
        ts = None
        if timestamps is not None:
            ts = np.concatenate([np.asarray(x, dtype=np.int64) for x in timestamps]) if len(lists) else None
        return cls(indptr, items.astype(np.int64), n_items, ts)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, n_users: int, n_items: int) -> Histories:
        """Histories of users 0..n_users-1 from an interactions frame (``user``, ``item``, ``timestamp``)."""
        order = np.lexsort(
            (frame["item"].to_numpy(), frame["timestamp"].to_numpy(), frame["user"].to_numpy())
        )
        users = frame["user"].to_numpy()[order]
        counts = np.bincount(users, minlength=n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ratings = frame["rating"].to_numpy(np.float32)[order] if "rating" in frame else None
        return cls(
            indptr,
            frame["item"].to_numpy(np.int64)[order],
            n_items,
            frame["timestamp"].to_numpy(np.int64)[order],
            ratings,
            np.arange(n_users, dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: Sequence[Histories]) -> Histories:
        """One batch of the histories of ``parts`` in order; optional fields are kept when all have them."""
        if not parts:
            raise ValueError("Histories.concat needs at least one batch")
        n_items = parts[0].n_items
        if any(p.n_items != n_items for p in parts):
            raise ValueError("Histories.concat: every batch must have the same catalog size")
        lengths = np.concatenate([p.lengths for p in parts])
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def joined(field: str) -> np.ndarray | None:
            values = [getattr(p, field) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(
            indptr,
            np.concatenate([p.items for p in parts]),
            n_items,
            *map(joined, ("timestamps", "ratings", "users")),
        )

    def select(self, rows: np.ndarray | Sequence[int]) -> Histories:
        """A sub-batch of these users, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        take = concat_ranges(starts, lengths)
        ts = None if self.timestamps is None else self.timestamps[take]
        ratings = None if self.ratings is None else self.ratings[take]
        users = None if self.users is None else self.users[rows]
        return Histories(indptr, self.items[take], self.n_items, ts, ratings, users)

    def latest(self, keep: np.ndarray | Sequence[int]) -> Histories:
        """The same users with only their latest ``keep[u]`` items (all of them where ``keep[u]`` is larger).

        Used to simulate cold users from warm ones: a user's most recent events are kept, so the time of
        the last event, which time-aware fusers read, does not move.
        """
        keep = np.asarray(keep, dtype=np.int64)
        if keep.shape != (len(self),):
            raise ValueError(f"keep must give one count per history ({len(self)}), got shape {keep.shape}")
        counts = np.clip(keep, 0, self.lengths)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        take = concat_ranges(self.indptr[1:] - counts, counts)
        ts = None if self.timestamps is None else self.timestamps[take]
        ratings = None if self.ratings is None else self.ratings[take]
        return Histories(indptr, self.items[take], self.n_items, ts, ratings, self.users)

    def to_csr(self) -> sp.csr_matrix:
        """Binary user x item matrix (an item seen twice counts once)."""
        data = np.ones(len(self.items), dtype=np.float32)
        mat = sp.csr_matrix((data, self.items, self.indptr), shape=(len(self), self.n_items))
        mat.sum_duplicates()
        mat.data[:] = 1.0
        return mat

    def to_padded(self, max_len: int | None = None) -> np.ndarray:
        """``int64 [n_users, L]``: each row the latest ``max_len`` items, oldest first, right-padded with -1.

        This is the input layout of exported ONNX graphs. L is at least 1 so an all-empty batch is valid.
        """
        lengths = self.lengths
        width = int(lengths.max()) if len(lengths) else 0
        width = max(1, min(width, max_len) if max_len else width)
        keep = np.minimum(lengths, width)
        out = np.full((len(self), width), PAD, dtype=np.int64)
        rows = np.repeat(np.arange(len(self)), keep)
        cols = concat_ranges(np.zeros(len(self), dtype=np.int64), keep)
        src = concat_ranges(self.indptr[1:] - keep, keep)
        out[rows, cols] = self.items[src]
        return out


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each pair, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + np.arange(total) - offsets
