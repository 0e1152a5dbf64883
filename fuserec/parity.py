"""Does the exported graph score as the Python model does? The check export and the test kit share.

What is served must be what was measured: the export stage refuses a graph whose scores, top-k or
per-component contributions under onnxruntime differ from the model's own ``score()``.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from fuserec.api import Algorithm
from fuserec.data.dataset import Dataset
from fuserec.fusion import Fuser
from fuserec.histories import Histories
from fuserec.metrics import top_k
from fuserec.onnx_model import OnnxRecommender, Reranker, uses_time

PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-5
CONTRIBUTION_ATOL = 1e-4  # shares are float32 sums of per-leaf attributions: looser than the scores


def parity_check(
    algo: Algorithm | Fuser,
    session: OnnxRecommender,
    histories: Histories,
    k: int,
    reranker: Reranker | None = None,
    features: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare onnxruntime with ``algo.score`` on ``histories``: scores and top-k (ties may reorder ids).

    With a ``reranker`` the reference lists are the re-ranked ones, computed in Python. ``features``: the
    graph's ``user_features`` rows of ``histories.users`` (None: unknown users, zeros), so a model that
    reads attributes is checked as it is measured.
    """
    padded = histories.to_padded()
    if isinstance(algo, Fuser):
        expected, expected_parts = algo.score_with_contributions(histories)
    else:
        expected = algo.score(histories)
        expected_parts = expected[None]
    timed = cast(Fuser, algo)  # only fusers read time (uses_time)
    last_time = timed.history_time(histories) if uses_time(algo) else None
    scores, items, top, parts = session.run_with_contributions(padded, last_time, features)
    diff = np.abs(scores - expected)
    tol = PARITY_ATOL + PARITY_RTOL * np.abs(expected)
    if reranker is None:
        ref_items = top_k(expected, k, exclude=histories.to_csr())
    else:
        seen = torch.from_numpy(histories.to_csr().toarray() > 0)
        with torch.no_grad():
            ref_items = reranker(torch.from_numpy(expected), seen, min(k, expected.shape[1])).numpy()
    ref_top = np.take_along_axis(expected, np.maximum(ref_items, 0), axis=1)
    valid = ref_items >= 0
    # Same top-k up to ties: the scores at each rank agree, and ids agree wherever scores are not tied.
    top_scores_match = bool(
        np.allclose(np.where(valid, top, 0), np.where(valid, ref_top, 0), atol=PARITY_ATOL, rtol=PARITY_RTOL)
    )
    ids_match = (items == ref_items) | ~valid
    untied = np.ones_like(valid)
    untied[:, 1:] &= ~np.isclose(ref_top[:, 1:], ref_top[:, :-1], atol=PARITY_ATOL, rtol=PARITY_RTOL)
    untied[:, :-1] &= ~np.isclose(ref_top[:, :-1], ref_top[:, 1:], atol=PARITY_ATOL, rtol=PARITY_RTOL)
    # each component's share of the served top-k, as /recommend and /explain report it
    at = np.maximum(items, 0)[None].repeat(parts.shape[0], axis=0)
    served, reference = np.take_along_axis(parts, at, 2), np.take_along_axis(expected_parts, at, 2)
    shares_close = np.isclose(served, reference, atol=CONTRIBUTION_ATOL, rtol=CONTRIBUTION_ATOL)
    # Rank-based fusers (exact_scores False) may serve another score where float noise between runtimes
    # swaps a component's near-tied items; there the shares move with the score but must still add up to it.
    same_score = np.isclose(
        top, np.take_along_axis(expected, np.maximum(items, 0), 1), atol=PARITY_ATOL, rtol=PARITY_RTOL
    )
    adds_up = np.isclose(served.sum(axis=0), top, atol=CONTRIBUTION_ATOL, rtol=CONTRIBUTION_ATOL)
    return {
        "users": len(histories),
        "contributions_match_at_top": bool((shares_close | ~valid[None]).all()),
        "contributions_match_where_scores_match": bool((shares_close | ~(valid & same_score)[None]).all()),
        "contributions_add_up": bool((adds_up | ~valid).all()),
        "empty_histories": int((histories.lengths == 0).sum()),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "max_rel_diff": float((diff / np.maximum(1.0, np.abs(expected))).max()) if diff.size else 0.0,
        "max_abs_score": float(np.abs(expected).max()) if expected.size else 0.0,
        "scores_match": bool((diff <= tol).all()),
        "top_scores_match": top_scores_match,
        "top_items_match_up_to_ties": bool((ids_match | ~untied).all()),
        "atol": PARITY_ATOL,
        "rtol": PARITY_RTOL,
    }


def contributions_agree(report: dict[str, Any], exact: bool) -> bool:
    """Each model's share of the served top-k agrees with Python's, as far as the scores do.

    ``exact``: everywhere. Otherwise (rank-based fusers): wherever the served score equals Python's, and
    the shares add up to the served score everywhere.
    """
    if exact:
        return bool(report["contributions_match_at_top"])
    return bool(report["contributions_match_where_scores_match"] and report["contributions_add_up"])


def parity_batch(data: Dataset, test: pd.DataFrame, n: int = 64) -> Histories:
    """Training histories of up to ``n`` test users (with their users-table rows, so attributes are
    read), plus one unknown user with an empty history."""
    users = np.unique(test["user"].to_numpy())[:n]
    hist = data.histories().select(users)
    indptr = np.concatenate([hist.indptr, hist.indptr[-1:]])
    rows = np.concatenate([np.asarray(users, dtype=np.int64), [-1]])
    return Histories(indptr, hist.items, hist.n_items, hist.timestamps, hist.ratings, rows)
