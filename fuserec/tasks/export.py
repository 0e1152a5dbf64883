"""Export: the chosen model's scoring -> one ONNX file + catalog + id maps, checked under onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task

from fuserec.api import Algorithm
from fuserec.config import Params
from fuserec.data.dataset import Dataset
from fuserec.features import item_content_vectors
from fuserec.fusion import Fuser
from fuserec.histories import Histories
from fuserec.layout import Layout
from fuserec.manifest import file_sha256, read_json, write_manifest
from fuserec.metrics import top_k
from fuserec.onnx_model import (
    CONTRIBUTIONS,
    INPUT_NAME,
    OUTPUT_NAMES,
    TIME_INPUT,
    OnnxRecommender,
    Reranker,
    export_onnx,
    uses_time,
)
from fuserec.rerank import Rerank, novelty_bonus
from fuserec.tasks.fuse import fitted_fusers, load_fuser
from fuserec.tasks.split import SPLIT_FILES
from fuserec.tasks.train import load_algorithm, trained_models

MODEL_FILE = "model.onnx"
CATALOG_FILE = "catalog.parquet"
USERS_FILE = "users.parquet"
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-5
CONTRIBUTION_ATOL = 1e-4  # shares are float32 sums of per-leaf attributions: looser than the scores


def parity_check(
    algo: Algorithm, session: OnnxRecommender, histories: Histories, k: int, reranker: Reranker | None = None
) -> dict[str, Any]:
    """Compare onnxruntime with ``algo.score`` on ``histories``: scores and top-k (ties may reorder ids).

    With a ``reranker`` the reference lists are the re-ranked ones, computed in Python.
    """
    padded = histories.to_padded()
    if isinstance(algo, Fuser):
        expected, expected_parts = algo.score_with_contributions(histories)
    else:
        expected = algo.score(histories)
        expected_parts = expected[None]
    last_time = algo.history_time(histories) if uses_time(algo) else None  # type: ignore[attr-defined]
    scores, items, top, parts = session.run_with_contributions(padded, last_time)
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
    """Training histories of up to ``n`` test users, plus one user with an empty history."""
    hist = data.histories().select(np.unique(test["user"].to_numpy())[:n])
    indptr = np.concatenate([hist.indptr, hist.indptr[-1:]])
    return Histories(indptr, hist.items, hist.n_items, hist.timestamps, hist.ratings)


def scorer_folder(layout: Layout, name: str) -> Path:
    """The folder of a trained model or of a fitted fuser called ``name``."""
    for folder in (layout.model(name), layout.fuser(name)):
        if (folder / "manifest.json").exists():
            return folder
    known = [p.name for p in trained_models(layout)] + [p.name for p in fitted_fusers(layout)]
    raise FileNotFoundError(
        f"export.algorithm is {name!r} but neither {layout.model(name)} nor {layout.fuser(name)} holds a "
        f"fitted model; add it to train.algorithms or fuse.fusers, or choose one of {sorted(known)}"
    )


def load_scorer(layout: Layout, folder: Path) -> Algorithm | Fuser:
    """A trained model, or a fitted fuser bound to the trained models."""
    if read_json(folder / "manifest.json").get("kind") == "fuser":
        return load_fuser(folder, layout)
    return load_algorithm(folder)


@task(name="export")
def export(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    cfg = params.export
    folder = scorer_folder(layout, cfg.algorithm)
    algo = load_scorer(layout, folder)
    out = layout.export
    data = Dataset.load(layout.clean, interactions=layout.split / SPLIT_FILES["train"])
    test = pd.read_parquet(layout.split / SPLIT_FILES["test"])
    rerank = Rerank(cfg.rerank_diversity, cfg.rerank_novelty, **cfg.rerank_shape)
    reranker = None
    if rerank.active:
        with_history = int((data.histories().lengths > 0).sum())
        bonus = novelty_bonus(data.item_popularity(), with_history)
        reranker = Reranker(rerank, item_content_vectors(data.items), bonus)
    for stale in (out / MODEL_FILE, out / f"{MODEL_FILE}.data"):  # a previous export's weights file
        stale.unlink(missing_ok=True)
    onnx_path = export_onnx(algo, out / MODEL_FILE, cfg.k, cfg.opset, reranker)
    weights = out / f"{MODEL_FILE}.data"
    session = OnnxRecommender(onnx_path, cfg.providers, prepack=cfg.prepack)
    parity = parity_check(algo, session, parity_batch(data, test), cfg.k, reranker)
    # a lone one-item history: the length-1 shape that once broke ALS's fold-in (a served user's first event)
    single = parity_check(algo, session, Histories.from_lists([[0]], data.n_items), cfg.k, reranker)
    parity["one_item_history_top_items_match"] = single["top_items_match_up_to_ties"]
    exact = getattr(algo, "exact_scores", True)  # rank-based fusers: only the ranking must agree
    scores_ok = parity["scores_match"] and parity["top_scores_match"] if exact else True
    ranking_ok = parity["top_items_match_up_to_ties"] and single["top_items_match_up_to_ties"]
    if not (scores_ok and ranking_ok and contributions_agree(parity, exact)):
        raise RuntimeError(f"exported ONNX model disagrees with {cfg.algorithm}.score: {parity}")
    data.items.to_parquet(out / CATALOG_FILE, index=False)
    data.users[["user", "user_id"]].to_parquet(out / USERS_FILE, index=False)
    write_manifest(
        out,
        kind="exported-model",
        algorithm=read_json(folder / "manifest.json"),
        file=MODEL_FILE,
        sha256=file_sha256(onnx_path),
        external_data=weights.name if weights.exists() else None,  # over 1 GiB of weights: kept beside
        input={
            "name": INPUT_NAME,
            "dtype": "int64",
            "shape": ["batch", "history_len"],
            "padding": -1,
            "meaning": "item indices (see catalog.parquet), oldest first, -1 = padding",
        },
        time_input=(
            {
                "name": TIME_INPUT,
                "dtype": "int64",
                "shape": ["batch"],
                "meaning": "unix seconds of each "
                "user's latest event (the request time for a user with no history)",
            }
            if uses_time(algo)
            else None
        ),
        outputs=[*OUTPUT_NAMES, CONTRIBUTIONS],
        components=algo._check_fitted_names() if isinstance(algo, Fuser) else [cfg.algorithm],
        k=cfg.k,
        rerank={
            "diversity": rerank.diversity,
            "novelty": rerank.novelty,
            "depth": rerank.depth,
            "keep": rerank.keep,
            "order": rerank.order,
        },
        max_history=cfg.max_history,
        implicit_threshold=params.clean.implicit_threshold,  # what the service counts as a positive event
        n_items=data.n_items,
        providers=session.providers,
        prepack=cfg.prepack,
        opset=cfg.opset,
        parity=parity,
    )
    return str(out)
