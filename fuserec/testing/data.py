"""A small dataset with planted structure, built in memory, so conformance checks run in seconds.

Users belong to taste clusters; items belong to clusters and carry the cluster's genre and words in
their title, so collaborative, content and attribute-based models all have a signal to find. One item
has no interactions at all (a cold item) and some users have very short histories.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fuserec.data.dataset import Dataset

CLUSTER_GENRES = ("Comedy", "Drama", "Horror", "Sci-Fi")
CLUSTER_WORDS = ("laugh party", "tears family", "blood night", "space robot")
OCCUPATIONS = ("artist", "writer", "doctor", "engineer")


def planted_dataset(
    n_users: int = 160, n_items: int = 80, n_clusters: int = 4, per_user: int = 15, seed: int = 0
) -> Dataset:
    """Clustered users x items; 90% of a user's positives fall in their cluster, by within-cluster popularity.

    The last item index is a cold item (in the catalog, never interacted with). Timestamps increase
    along each user's history. Users carry ``age``, ``gender`` and ``occupation`` tied to their cluster.
    """
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(n_items) % n_clusters
    user_cluster = np.arange(n_users) % n_clusters
    pop = rng.zipf(1.6, size=n_items).clip(max=50).astype(float)
    pop[-1] = 0.0  # the cold item
    rows = []
    for u in range(n_users):
        own = item_cluster == user_cluster[u]
        length = per_user if u % 7 else 3  # some short histories
        p = np.where(own, 9.0, 1.0 / max(n_clusters - 1, 1)) * pop
        items = rng.choice(n_items, size=min(length, int((p > 0).sum())), replace=False, p=p / p.sum())
        for t, i in enumerate(items):
            rows.append((u, int(i), float(rng.integers(4, 6)), 1_600_000_000 + 86_400 * t + u))
    inter = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype(np.float32)
    items = pd.DataFrame(
        {
            "item": np.arange(n_items),
            "item_id": np.arange(n_items) + 1,
            "title": [f"{CLUSTER_WORDS[c % 4]} {i}" for i, c in enumerate(item_cluster)],
            "genres": [CLUSTER_GENRES[c % 4] for c in item_cluster],
            "tags": ["" for _ in item_cluster],
            "text": [CLUSTER_WORDS[c % 4] for c in item_cluster],
            "year": 2000 + item_cluster,
        }
    )
    users = pd.DataFrame(
        {
            "user": np.arange(n_users),
            "user_id": np.arange(n_users) + 1,
            "age": 20 + 10 * (user_cluster % 4) + rng.integers(0, 5, n_users),
            "gender": np.where(user_cluster % 2 == 0, "F", "M"),
            "occupation": [OCCUPATIONS[c % 4] for c in user_cluster],
        }
    )
    return Dataset(inter, items, users)
