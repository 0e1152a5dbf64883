"""Explicit ratings with planted biases and factors, for tests of rating-prediction plugins.

A rater that learns anything should beat the global mean on held-out ratings of this data, and one that
models biases and factors should get close to the noise floor, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class PlantedRatings:
    """``frame`` (``user, item, rating, timestamp``) and the noise-free ``truth [n_users, n_items]``."""

    frame: pd.DataFrame
    truth: np.ndarray
    n_users: int
    n_items: int
    noise: float


def planted_ratings(
    n_users: int = 150,
    n_items: int = 90,
    factors: int = 3,
    density: float = 0.3,
    noise: float = 0.3,
    seed: int = 0,
) -> PlantedRatings:
    """Ratings ``clip(3.5 + b_u + b_i + p_uᵀq_i + ε, 1, 5)`` of a random ``density`` share of the pairs.

    Every user and item gets at least a few ratings (their first pairs are forced), so all of them are
    learnable; timestamps increase along each user's ratings.
    """
    rng = np.random.default_rng(seed)
    user_bias = rng.normal(0.0, 0.4, n_users)
    item_bias = rng.normal(0.0, 0.5, n_items)
    p = rng.normal(0.0, 0.45, (n_users, factors))
    q = rng.normal(0.0, 0.45, (n_items, factors))
    truth = 3.5 + user_bias[:, None] + item_bias[None, :] + p @ q.T
    observed = rng.random((n_users, n_items)) < density
    observed[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    observed[rng.integers(0, n_users, n_items), np.arange(n_items)] = True
    users, items = np.nonzero(observed)
    ratings = np.clip(truth[users, items] + rng.normal(0.0, noise, len(users)), 1.0, 5.0)
    order = rng.permutation(len(users))
    frame = pd.DataFrame(
        {
            "user": users[order].astype(np.int64),
            "item": items[order].astype(np.int64),
            "rating": ratings[order].astype(np.float32),
            "timestamp": (1_600_000_000 + np.arange(len(users))).astype(np.int64),
        }
    )
    return PlantedRatings(frame, np.clip(truth, 1.0, 5.0), n_users, n_items, noise)


__all__ = ["PlantedRatings", "planted_ratings"]
