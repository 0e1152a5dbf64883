"""The one dataset model every stage after cleaning reads: contiguous ids, catalog and user tables.

- ``interactions``: ``user``, ``item`` (contiguous indices), ``rating`` (float32, NaN when unknown),
  ``timestamp`` (int64 unix seconds).
- ``items``: one row per catalog item in index order: ``item`` (= row position), ``item_id`` (raw id),
  then content columns (title, genres, tags, text, year, ...).
- ``users``: one row per user in index order: ``user``, ``user_id`` (raw id), then attributes.

The id maps are the ``item_id``/``user_id`` columns: index = position of the raw id in the sorted ids.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fuserec.histories import Histories

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"


@dataclass(frozen=True)
class Dataset:
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def with_interactions(self, interactions: pd.DataFrame) -> Dataset:
        """Same catalog and users, other interactions (e.g. a split's training part)."""
        return replace(self, interactions=interactions)

    def matrix(self) -> sp.csr_matrix:
        """Binary user x item matrix of the interactions."""
        return interactions_matrix(self.interactions, self.n_users, self.n_items)

    def histories(self) -> Histories:
        """Every user's history (users without interactions get an empty one), in time order."""
        return Histories.from_frame(self.interactions, self.n_users, self.n_items)

    def item_popularity(self) -> np.ndarray:
        """Number of interactions per item (``int64 [n_items]``)."""
        return np.bincount(self.interactions["item"].to_numpy(), minlength=self.n_items).astype(np.int64)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.interactions.to_parquet(folder / INTERACTIONS_FILE, index=False)
        self.items.to_parquet(folder / ITEMS_FILE, index=False)
        self.users.to_parquet(folder / USERS_FILE, index=False)
        return folder

    @classmethod
    def load(cls, folder: str | Path, interactions: str | Path | None = None) -> Dataset:
        """Load a saved dataset; ``interactions`` may point at another file (a split) over the same ids."""
        folder = Path(folder)
        frame = pd.read_parquet(interactions or folder / INTERACTIONS_FILE)
        return cls(frame, pd.read_parquet(folder / ITEMS_FILE), pd.read_parquet(folder / USERS_FILE))


def interactions_matrix(frame: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    data = np.ones(len(frame), dtype=np.float32)
    mat = sp.csr_matrix(
        (data, (frame["user"].to_numpy(), frame["item"].to_numpy())), shape=(n_users, n_items)
    )
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat
