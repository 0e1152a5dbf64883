"""userknn at ML-10M size: the sparse scoring path against the dense module it replaces there.

Usage: python benchmarks/userknn_scale.py

Generates 10^7 synthetic interactions shaped like ML-10M (69,878 users x 10,677 items), keeps the positives
(rating >= 4), fits userknn (k=50), then times ``score`` on 1,024 histories through the sparse path (the
default at this size) and on 64 histories through the dense module (the exported graph's arithmetic,
forced with ``dense_max_cells``), and checks the two agree on those 64. Prints what it saw.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import pandas as pd

from fuserec.config import SyntheticConfig
from fuserec.data.dataset import Dataset
from fuserec.data.synthetic import generate
from fuserec.plugins.userknn import UserKNN


def main() -> None:
    start = time.perf_counter()
    raw = generate(SyntheticConfig(n_interactions=10_000_000, n_users=69_878, n_items=10_677))
    positives = raw.interactions[raw.interactions["rating"] >= 4]
    users = positives["user_id"].astype("category").cat.codes.to_numpy(np.int32)
    items = positives["item_id"].astype("category").cat.codes.to_numpy(np.int32)
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    frame = pd.DataFrame(
        {
            "user": users,
            "item": items,
            "rating": np.float32(5),
            "timestamp": positives["timestamp"].to_numpy(),
        }
    )
    data = Dataset(
        frame,
        pd.DataFrame({"item": np.arange(n_items), "item_id": np.arange(n_items)}),
        pd.DataFrame({"user": np.arange(n_users), "user_id": np.arange(n_users)}),
    )
    seconds = time.perf_counter() - start
    print(f"data: {len(frame):,} positives, {n_users:,} users x {n_items:,} items, {seconds:.1f} s")

    start = time.perf_counter()
    sparse = UserKNN({"k": 50}).fit(data)
    print(f"fit: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    scores = sparse.score(data.histories().select(np.arange(1024)))
    print(f"sparse path, 1,024 histories: {time.perf_counter() - start:.2f} s")

    dense = UserKNN({"k": 50, "dense_max_cells": 1 << 40}).fit(data)
    start = time.perf_counter()
    dense_scores = dense.score(data.histories().select(np.arange(64)))
    print(f"dense module, 64 histories (dense X built first): {time.perf_counter() - start:.2f} s")
    np.testing.assert_allclose(scores[:64], dense_scores, rtol=1e-5, atol=1e-6)
    print("the 64 histories scored both ways agree (rtol 1e-5)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
