"""What every rating stage reads: the rated interactions, side information and histories.

Users and items keep the indices clean gave them (the ranking task's), so a rating model and a ranking
model of the same run agree on what item 17 is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fuserec.config import Params
from fuserec.data.dataset import ITEMS_FILE, USERS_FILE
from fuserec.features import AttributeEncoder, item_content_vectors, user_attribute_matrix
from fuserec.histories import Histories
from fuserec.layout import RATINGS_FILE, Layout
from fuserec.rating import RatingData, RatingSide
from fuserec.registry import RATERS_GROUP, resolve_names

COLUMNS = ["user", "item", "rating", "timestamp"]
FOLDS_FILE = "folds.parquet"  # split/ under rating.protocol: kfold: every rating with its fold (1..k)


@dataclass(frozen=True)
class Catalogue:
    """Sizes of the run's users and items tables and the side information raters may read."""

    n_users: int
    n_items: int
    side: RatingSide
    users: pd.DataFrame

    def attribute_rows(self, rows: np.ndarray, columns: tuple[str, ...]) -> np.ndarray:
        """``float32 [len(rows), g]``: the users' one-hot attributes in the served graph's ``columns``
        (the encoding the raters were fitted with, :func:`fuserec.features.user_attribute_matrix`)."""
        return AttributeEncoder.fit(self.users).table(self.users, columns)[rows].astype(np.float32)


def rated_interactions(layout: Layout) -> pd.DataFrame:
    """Every deduplicated rated interaction clean kept (positives or not); rows without a rating are left out.

    Raises a ValueError that says what to change when the source has no ratings at all.
    """
    path = layout.clean / RATINGS_FILE
    frame = pd.read_parquet(path)
    frame = frame[frame["rating"].notna()]
    if frame.empty:
        raise ValueError(
            f"task: rating needs ratings, but {path} has none: the source has no rating column. Map one "
            "with data.columns.rating, or run the ranking task (task: ranking)"
        )
    return frame[COLUMNS].reset_index(drop=True)


def catalogue(layout: Layout) -> Catalogue:
    """The users and items tables' sizes, item content vectors and one-hot user attributes."""
    items = pd.read_parquet(layout.clean / ITEMS_FILE)
    users = pd.read_parquet(layout.clean / USERS_FILE)
    item_features = item_content_vectors(items).astype(np.float32)
    user_features, names = user_attribute_matrix(users)
    side = RatingSide(item_features, user_features.astype(np.float32), tuple(names))
    return Catalogue(len(users), len(items), side, users)


def rater_names(params: Params) -> list[str]:
    """The raters this run fits (``rating.raters``), in a stable order."""
    return resolve_names(params.rating.raters, RATERS_GROUP)


def histories_of(train: pd.DataFrame, n_users: int, n_items: int) -> Histories:
    """Every user's rated training history in time order (an empty one for a user without ratings)."""
    if train.empty:
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        empty_i, empty_r = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return Histories(indptr, empty_i, n_items, np.zeros(0, np.int64), empty_r, np.arange(n_users))
    return RatingData.from_frame(train, n_users, n_items).histories()
