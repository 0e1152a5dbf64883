"""Export: the chosen model's scoring -> one ONNX file + catalog + id maps, checked under onnxruntime.

The chosen model is the one ``export.algorithm`` names, or with ``auto`` the fuse stage's best candidate
on validation (:func:`fuserec.artifacts.chosen_algorithm`); the manifest's ``selection`` says which and why.

Everything is written to a staging folder beside ``model/`` and checked there (the parity check loads the
graph from it); only a complete, checked export replaces ``model/``, in one atomic step
(:func:`fuserec.atomic.replace_dir`). A failed export leaves the previous ``model/`` as it was and no
staging folder behind, so ``model/`` never mixes one export's manifest with another's graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuserec.api import USER_FEATURES, Algorithm
from fuserec.artifacts import chosen_algorithm, load_scorer, scorer_folder
from fuserec.atomic import remove, remove_stale_staging, replace_dir, staging_path
from fuserec.cold_items import export_cold_items
from fuserec.config import AUTO, Params
from fuserec.data.dataset import Dataset
from fuserec.explain_states import write_explain_states
from fuserec.features import AttributeEncoder, item_content_vectors, table_rows
from fuserec.fusion import Fuser
from fuserec.histories import Histories
from fuserec.layout import CATALOG_FILE, MODEL_FILE, USERS_FILE, Layout
from fuserec.manifest import file_sha256, read_json, write_manifest
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
from fuserec.parity import contributions_agree, parity_batch, parity_check
from fuserec.rerank import Rerank, novelty_bonus


def export(params: Params) -> str:
    """Export the chosen scorer (``export.algorithm``, ``auto`` resolved) to ``<outputs>/model``; returns
    that folder's path."""
    if params.task == "rating":  # the rating task's export: same folders, its own content
        from fuserec.stages.rating.export import export as rating_export

        return rating_export(params)
    layout = Layout(params.outputs_dir)
    out = layout.export
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)  # left by an export that was killed
    staging = staging_path(out)
    remove(staging)
    try:
        _export_into(params, layout, staging)
        replace_dir(staging, out)
    except BaseException:
        remove(staging)
        raise
    return str(out)


def _export_into(params: Params, layout: Layout, out: Path) -> None:
    """Write and check the export in ``out`` (a fresh staging folder); raises if the graph disagrees."""
    cfg = params.export
    name = chosen_algorithm(params, layout)
    folder = scorer_folder(layout, name)
    algo = load_scorer(layout, folder)
    data = Dataset.load(layout.clean, interactions=layout.split_file("train"))
    test = pd.read_parquet(layout.split_file("test"))
    rerank = Rerank(cfg.rerank_diversity, cfg.rerank_novelty, **cfg.rerank_shape)
    reranker = None
    if rerank.active:
        with_history = int((data.histories().lengths > 0).sum())
        bonus = novelty_bonus(data.item_popularity(), with_history)
        reranker = Reranker(rerank, item_content_vectors(data.items), bonus)
    onnx_path = export_onnx(algo, out / MODEL_FILE, cfg.k, cfg.opset, reranker)
    # over 1 GiB of weights: kept beside the graph, which names it relative to itself (it moves with it)
    weights = out / f"{MODEL_FILE}.data"
    session = OnnxRecommender(onnx_path, cfg.providers, prepack=cfg.prepack)
    encoder = AttributeEncoder.fit(data.users)  # how the plugins' fits encoded attributes (DEFAULTS)
    attributes = encoder.table(data.users, session.feature_names) if session.feature_names else None
    parity = _checked_parity(algo, session, data, test, cfg.k, name, reranker, attributes)
    feature_names = list(session.feature_names)
    providers = session.providers
    del session  # the graph (and a mapped weights file) is released before the folder moves
    data.items.to_parquet(out / CATALOG_FILE, index=False)
    data.users[["user", "user_id"]].to_parquet(out / USERS_FILE, index=False)
    write_manifest(
        out,
        kind="exported-model",
        algorithm=read_json(folder / "manifest.json"),
        selection=selection_summary(params, layout, name),
        file=MODEL_FILE,
        sha256=file_sha256(onnx_path),
        external_data=weights.name if weights.exists() else None,
        external_data_sha256=file_sha256(weights) if weights.exists() else None,
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
        features_input=(
            {
                "name": USER_FEATURES,
                "dtype": "float32",
                "shape": ["batch", len(feature_names)],
                "columns": feature_names,
                "meaning": "one-hot user attributes (column:value); a zero row = attributes unknown",
                "encoder": encoder.to_json(),
            }
            if feature_names
            else None
        ),
        outputs=[*OUTPUT_NAMES, CONTRIBUTIONS],
        components=algo._check_fitted_names() if isinstance(algo, Fuser) else [name],
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
        rating_range=[params.validate_.rating_min, params.validate_.rating_max],  # what events may carry
        n_items=data.n_items,
        providers=providers,
        prepack=cfg.prepack,
        opset=cfg.opset,
        parity=parity,
        explain_states=write_explain_states(algo, name, out),  # components that explain when served
        cold_items=export_cold_items(params, layout, algo, name, data, test, out),  # fuserec.cold_items
    )


def _checked_parity(
    algo: Algorithm | Fuser,
    session: OnnxRecommender,
    data: Dataset,
    test: pd.DataFrame,
    k: int,
    name: str,
    reranker: Reranker | None,
    attributes: np.ndarray | None = None,
) -> dict[str, Any]:
    """The parity report of the exported graph against ``algo.score``; raises if they disagree.

    ``attributes``: the graph's ``user_features`` table over the users table, when it reads attributes.
    """
    batch = parity_batch(data, test)
    features = None if attributes is None else table_rows(attributes, batch.users)
    parity = parity_check(algo, session, batch, k, reranker, features)
    # a lone one-item history: the length-1 shape that once broke ALS's fold-in (a served user's first event)
    single = parity_check(algo, session, Histories.from_lists([[0]], data.n_items), k, reranker)
    parity["one_item_history_top_items_match"] = single["top_items_match_up_to_ties"]
    exact = getattr(algo, "exact_scores", True)  # rank-based fusers: only the ranking must agree
    scores_ok = parity["scores_match"] and parity["top_scores_match"] if exact else True
    ranking_ok = parity["top_items_match_up_to_ties"] and single["top_items_match_up_to_ties"]
    if not (scores_ok and ranking_ok and contributions_agree(parity, exact)):
        raise RuntimeError(f"exported ONNX model disagrees with {name}.score: {parity}")
    return parity


def selection_summary(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    """Why ``name`` is served: named in ``export.algorithm``, or best on validation among the candidates.

    Each candidate's validation score is copied from ``selection.json`` (when the fuse stage wrote one), so
    the served folder says what it beat without the run folder beside it.
    """
    record = read_json(layout.selection) if layout.selection.exists() else {}
    auto = params.export.algorithm == AUTO
    return {
        "export_algorithm": params.export.algorithm,
        "chosen": name,
        "reason": f"best {record.get('metric')} on validation" if auto else "named in export.algorithm",
        "metric": record.get("metric"),
        "candidates": {n: c.get(record.get("metric", "")) for n, c in record.get("candidates", {}).items()},
        "left_out": record.get("left_out", {}),
    }
