"""A tiny dataset with planted structure, built in memory, for fast plugin tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fuserec.data.dataset import Dataset


def planted_dataset(n_users: int = 60, n_items: int = 40, per_user: int = 8, seed: int = 0) -> Dataset:
    """Two taste groups: even users like the first half of the items, odd users the second half."""
    rng = np.random.default_rng(seed)
    rows = []
    half = n_items // 2
    for u in range(n_users):
        pool = np.arange(half) if u % 2 == 0 else np.arange(half, n_items)
        items = rng.choice(pool, size=per_user, replace=False)
        for t, i in enumerate(items):
            rows.append((u, int(i), 5.0, 1_000_000 + 100 * u + t))
    inter = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype(np.float32)
    items = pd.DataFrame(
        {
            "item": np.arange(n_items),
            "item_id": np.arange(n_items) + 100,
            "title": [f"item {i}" for i in range(n_items)],
        }
    )
    users = pd.DataFrame({"user": np.arange(n_users), "user_id": np.arange(n_users) + 1})
    return Dataset(inter, items, users)
