"""Clean: validated tables -> positives with contiguous ids (the Dataset every later stage reads).

With ``privacy.retention_days`` set, interactions older than that many days before the newest one are
dropped first, and users left with none leave the users table; ``summary.json`` counts both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fuserec.config import CleanConfig, Params
from fuserec.data.dataset import Dataset
from fuserec.layout import RATINGS_FILE, Layout
from fuserec.manifest import write_json
from fuserec.privacy.minimise import apply_retention


def build_dataset(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame,
    cfg: CleanConfig,
    retention_days: float | None = None,
) -> tuple[Dataset, pd.DataFrame, dict[str, Any]]:
    """Drop expired interactions, dedupe, convert to implicit positives, apply the k-core filter and map
    ids to indices.

    Returns (dataset of positives, all deduplicated interactions with a ``positive`` flag, counts).
    Ratings below the threshold are not positives but are kept in the second frame: nothing is lost but
    what ``retention_days`` expires, which is counted (``retention_dropped``, ``retention_users_dropped``).
    """
    counts: dict[str, Any] = {"rows_in": len(interactions)}
    if retention_days is not None:
        before = interactions["user_id"].unique()
        interactions, retention = apply_retention(interactions, retention_days)
        expired = np.setdiff1d(before, interactions["user_id"].unique())
        users = users[~users["user_id"].isin(expired)]
        counts |= retention | {"retention_users_dropped": len(expired)}
    # Duplicate (user, item) pairs keep the earliest; a stable sort keeps file order among equal times.
    frame = interactions.sort_values("timestamp", kind="stable")
    frame = frame.drop_duplicates(["user_id", "item_id"], keep="first")
    counts["duplicates_dropped"] = counts["rows_in"] - counts.get("retention_dropped", 0) - len(frame)
    has_rating = frame["rating"].notna()
    if cfg.implicit_threshold is None:
        positive = np.ones(len(frame), dtype=bool)
    else:
        # A row without a rating (implicit feedback) is a positive by itself.
        positive = (~has_rating | (frame["rating"] >= cfg.implicit_threshold)).to_numpy()
    frame = frame.assign(positive=positive)
    pos = frame[frame["positive"]]
    if cfg.kcore > 0:
        pos = kcore(pos, cfg.kcore)
    counts["positives"] = len(pos)
    counts["below_threshold"] = int((~positive).sum())

    item_ids = np.sort(items["item_id"].unique())
    if cfg.kcore > 0:
        item_ids = np.sort(pos["item_id"].unique())
    user_ids = np.sort(users["user_id"].unique())
    item_table = _index(items, "item_id", item_ids, "item")
    user_table = _index(users, "user_id", user_ids, "user")

    def mapped(df: pd.DataFrame) -> pd.DataFrame:
        df = df[df["item_id"].isin(item_ids) & df["user_id"].isin(user_ids)]
        return pd.DataFrame(
            {
                "user": np.searchsorted(user_ids, df["user_id"].to_numpy()).astype(np.int64),
                "item": np.searchsorted(item_ids, df["item_id"].to_numpy()).astype(np.int64),
                "rating": df["rating"].to_numpy(np.float32),
                "timestamp": df["timestamp"].to_numpy(np.int64),
                **({"positive": df["positive"].to_numpy()} if "positive" in df else {}),
            }
        )

    positives = mapped(pos.drop(columns="positive"))
    counts["users"], counts["items"] = len(user_ids), len(item_ids)
    return Dataset(positives, item_table, user_table), mapped(frame), counts


def kcore(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively keep users and items with at least ``k`` interactions."""
    while True:
        users = frame["user_id"].map(frame["user_id"].value_counts())
        items = frame["item_id"].map(frame["item_id"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            return frame
        frame = frame[keep]


def _index(table: pd.DataFrame, id_col: str, ids: np.ndarray, index_col: str) -> pd.DataFrame:
    table = table.drop_duplicates(id_col).set_index(id_col).reindex(ids).reset_index()
    table.insert(0, index_col, np.arange(len(ids), dtype=np.int64))
    return table


def clean(params: Params) -> str:
    layout = Layout(params.outputs_dir)

    def read(name: str) -> pd.DataFrame:
        return pd.read_parquet(layout.validated / f"{name}.parquet")

    dataset, ratings, counts = build_dataset(
        read("interactions"), read("items"), read("users"), params.clean, params.privacy.retention_days
    )
    dataset.save(layout.clean)
    ratings.to_parquet(layout.clean / RATINGS_FILE, index=False)
    write_json(layout.clean / "summary.json", counts)
    return str(layout.clean)
