"""Evaluation segments: where a model is good, not just on average.

User segments keep all of a user's test items; item segments keep only the test interactions whose item
falls in the segment (a user counts when at least one remains). Every segment is defined from training
data only, so it is the same for every model. The thresholds: cold users have at
most 5 training positives; long-tail items are the bottom 80% by training popularity; rare items have
fewer than 5 training positives; new items have none.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from fuserec.histories import Histories

COLD_USER_MAX = 5
RARE_ITEM_BELOW = 5
HEAD_SHARE = 0.2
#: Warm users scored from their latest 1-5 training items only (see :func:`simulated_cold`).
SIMULATED_COLD = "cold_simulated"

#: name -> (kind, rule); rules read per-user training counts or per-item training popularity.
SEGMENTS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "cold_users": ("user", lambda n: n <= COLD_USER_MAX),
    "warm_users": ("user", lambda n: n > COLD_USER_MAX),
    "long_tail_items": ("item", lambda pop: ~head_items(pop)),
    "rare_items": ("item", lambda pop: pop < RARE_ITEM_BELOW),
    "new_items": ("item", lambda pop: pop == 0),
}


def head_items(popularity: np.ndarray, share: float = HEAD_SHARE) -> np.ndarray:
    """Boolean mask of the top ``ceil(share * n)`` items by popularity (ties: the lower index is ahead)."""
    pop = np.asarray(popularity)
    order = np.lexsort((np.arange(len(pop)), -pop))
    mask = np.zeros(len(pop), dtype=bool)
    mask[order[: int(np.ceil(share * len(pop)))]] = True
    return mask


def segment_truths(
    truth: sp.csr_matrix, user_counts: np.ndarray, popularity: np.ndarray
) -> dict[str, tuple[np.ndarray, sp.csr_matrix]]:
    """Per segment: (rows of ``truth`` kept, truth restricted to the segment), rows with >= 1 truth item."""
    truth = sp.csr_matrix(truth)
    out: dict[str, tuple[np.ndarray, sp.csr_matrix]] = {}
    for name, (kind, rule) in SEGMENTS.items():
        if kind == "user":
            part = truth.multiply(rule(np.asarray(user_counts))[:, None].astype(np.float32)).tocsr()
        else:
            part = truth.multiply(rule(np.asarray(popularity))[None, :].astype(np.float32)).tocsr()
        part.eliminate_zeros()
        out[name] = (np.flatnonzero(np.diff(part.indptr) > 0), part)
    return out


def simulated_cold(
    histories: Histories, users: np.ndarray, max_users: int, seed: int
) -> tuple[Histories, np.ndarray] | None:
    """Warm ``users`` (more than :data:`COLD_USER_MAX` items) seen as cold: ``(cut, chosen users)``.

    Real cold users are few in the usual splits (6 of 938 test users on ML-100k), so their NDCG moves by
    0.05 with one hit. Every model scores from a history, so cutting a warm user's history to its latest
    ``k`` items (``k`` uniform in 1..5, seeded) shows what a model makes of a new user, on many users.
    ``cut`` holds every row of ``histories`` (the chosen ones cut), so ``cut.select(rows)`` takes dataset
    rows; at most ``max_users`` warm users are chosen (None when 0 or there are none).
    """
    users = np.asarray(users, dtype=np.int64)
    warm = users[histories.lengths[users] > COLD_USER_MAX]
    if max_users <= 0 or len(warm) == 0:
        return None
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(warm, min(max_users, len(warm)), replace=False))
    keep = histories.lengths.copy()
    keep[chosen] = rng.integers(1, COLD_USER_MAX + 1, len(chosen))
    return histories.latest(keep), chosen
