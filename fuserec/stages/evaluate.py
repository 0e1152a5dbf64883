"""Evaluate: full-ranking metrics of every trained model, every fitted fuser and the served graph on test.

Each model scores the training histories of users with test items; their training items are excluded;
ranking is over the whole catalog. Writes ``metrics.json`` (a DVC metrics file) and one CSV per model
with every metric by k (DVC plots).

The stage runs after export: ``served`` in ``metrics.json`` is the exported ONNX graph under onnxruntime,
fed each test user's training history as the service feeds it (the latest ``max_history`` items and the
latest event's time), ranked from its ``scores`` output as the service ranks, and measured by the same code
as the Python rows. So the number reported is the number served, and a graph that drifted from its model
shows as a gap between ``served`` and that model's row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fuserec.artifacts import chosen_algorithm, load_algorithm, trained_models
from fuserec.cold_items import ColdItems, merged_scorer
from fuserec.config import Params
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.evaluation import metrics_by_k, ranking_metrics, rounded, segment_comparison, significance
from fuserec.features import AttributeEncoder, item_content_vectors, table_rows
from fuserec.fusion import SharedScores
from fuserec.histories import Histories
from fuserec.layout import MODEL_FILE, Layout
from fuserec.manifest import read_json, write_json
from fuserec.metrics import PER_USER_METRICS, evaluate_rankings, ndcg_at_k, rank_together
from fuserec.onnx_model import OnnxRecommender
from fuserec.rerank import DiversityCurve, Rerank
from fuserec.segments import SIMULATED_COLD, simulated_cold


def protocol_summary(params: Params, train: pd.DataFrame, test: pd.DataFrame, n_items: int) -> dict[str, Any]:
    return {
        "split": params.split.method,
        "test_fraction": params.split.test_fraction,
        "min_user_positives": params.split.min_user_positives,
        "implicit_threshold": params.clean.implicit_threshold,
        "ranking": "full catalog, training items excluded, ties by lower item index",
        "ks": params.evaluate.ks,
        "n_items": n_items,
        "train_interactions": len(train),
        "test_interactions": len(test),
        "test_users": int(test["user"].nunique()),
    }


def simulated_cold_metrics(
    params: Params,
    scorers: dict[str, tuple[str, Any]],
    data: Dataset,
    test: pd.DataFrame,
    hist: Histories,
    train_mat: sp.csr_matrix,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]] | None:
    """Every scorer again on warm test users cut to their latest 1-5 items (:func:`simulated_cold`).

    Returns ``(metrics by scorer, per-user NDCG@10 by kind and scorer)``, or None when the segment is off
    or empty. The user's whole training set stays excluded from the ranking, as for real users.
    """
    users = np.unique(test["user"].to_numpy())
    cold = simulated_cold(hist, users, params.evaluate.simulated_cold_users, params.train.seed)
    if cold is None:
        return None
    cut, cold_users = cold
    topks = rank_together(
        {name: scorer.score for name, (_, scorer) in scorers.items()},
        cut.select,
        cold_users,
        train_mat,
        10,
        params.evaluate.batch_size,
    )
    truth = interactions_matrix(test, data.n_users, data.n_items)[cold_users]
    popularity = data.item_popularity()
    metrics: dict[str, dict[str, float]] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {"models": {}, "fusers": {}}
    for name, (kind, _) in scorers.items():
        values = evaluate_rankings(topks[name], truth, [10], popularity)
        keep = {key: values[key] for key in ("ndcg@10", "recall@10", "hr@10", "n_users")}
        metrics[name] = rounded(keep | {"n_interactions": int(truth.nnz)})
        per_user[kind][name] = ndcg_at_k(topks[name], truth, 10)
    return metrics, per_user


def rerank_curve(
    params: Params, data: Dataset, vectors: np.ndarray, train_mat: sp.csr_matrix | None = None
) -> DiversityCurve:
    """The exported scorer's accuracy/diversity curve as the MMR and novelty weights move.

    Filled during the evaluation pass, from the scores the exported scorer keeps of each batch.
    ``train_mat``: ``data.matrix()`` when the caller has it already (at 10^7 it is 10M entries to rebuild).
    """
    cfg, shape = params.evaluate, params.export.rerank_shape  # the served graph's: one curve
    settings = [Rerank(diversity=d, **shape) for d in cfg.rerank_diversity]
    settings += [Rerank(novelty=v, **shape) for v in cfg.rerank_novelty]
    train_mat = data.matrix() if train_mat is None else train_mat
    n_with_history = int((np.diff(train_mat.indptr) > 0).sum())
    return DiversityCurve(vectors, data.item_popularity(), n_with_history, settings)


def curve_summary(
    params: Params,
    layout: Layout,
    curve: DiversityCurve | None,
    test: pd.DataFrame,
    data: Dataset,
    scorer: str,
) -> dict[str, Any]:
    """The curve's points for metrics.json, and ``rerank_curve.csv`` (a DVC plot)."""
    if curve is None:
        return {}
    users = np.unique(test["user"].to_numpy())
    points = curve.result(interactions_matrix(test, data.n_users, data.n_items)[users])
    pd.DataFrame(points).to_csv(layout.root / "rerank_curve.csv", index=False)
    return {
        "scorer": scorer,
        "shape": params.export.rerank_shape,
        "curve": [rounded(point) for point in points],
    }


def exported_manifest(layout: Layout, name: str) -> dict[str, Any]:
    """The export stage's manifest; refuses a missing export, or one of another scorer than ``name``."""
    manifest_file = layout.export / "manifest.json"
    if not manifest_file.exists():
        raise FileNotFoundError(
            f"{manifest_file} is missing: evaluate also scores the exported graph. To fix: run the export "
            "stage first (`fuserec stage export`, `dvc repro export` or `fuserec run`)"
        )
    manifest = read_json(manifest_file)
    if manifest["algorithm"]["name"] != name:
        raise ValueError(
            f"{layout.export} holds {manifest['algorithm']['name']!r} but the export is now {name!r} "
            "(export.algorithm, or the fuse stage's choice for auto). To fix: run the export stage again"
        )
    return manifest


def latest_times(histories: Histories) -> np.ndarray:
    """``int64 [B]``: each history's latest event time (0 for an empty one), what the service sends."""
    last = np.zeros(len(histories), dtype=np.int64)
    has = histories.lengths > 0
    if histories.timestamps is not None and has.any():
        last[has] = np.maximum.reduceat(histories.timestamps, histories.indptr[:-1][has])
    return last


def graph_attributes(
    manifest: dict[str, Any], session: OnnxRecommender, users: pd.DataFrame
) -> np.ndarray | None:
    """The ``user_features`` table (users-table rows x graph columns) of a graph that reads attributes."""
    spec = manifest.get("features_input")
    if not session.feature_names or not spec:
        return None
    return AttributeEncoder.from_json(spec["encoder"]).table(users, session.feature_names)


def served_metrics(
    params: Params,
    layout: Layout,
    name: str,
    data: Dataset,
    test: pd.DataFrame,
    hist: Histories,
    train_mat: sp.csr_matrix,
    vectors: np.ndarray,
) -> dict[str, Any]:
    """The exported graph on every test user, measured as the Python rows are (``served`` in metrics.json).

    Histories go in as the service sends them (latest ``max_history`` items, oldest first, and the latest
    event time for graphs that read it); the ``scores`` output, merged with the side scorer's items without
    training interactions as the service merges them (:func:`served_scorers`), is ranked with the user's
    training items excluded and ties to the lower index, as the service and the Python rows rank.
    """
    manifest = exported_manifest(layout, name)
    session = OnnxRecommender(
        layout.export / MODEL_FILE, manifest["providers"], prepack=manifest.get("prepack", False)
    )
    max_history = int(manifest["max_history"])
    # a graph that reads attributes gets each user's, encoded as the export recorded (as the service does)
    attributes = graph_attributes(manifest, session, data.users)

    def score(batch: Histories) -> np.ndarray:
        last = latest_times(batch) if session.uses_time else None
        features = None if attributes is None else table_rows(attributes, batch.users)
        return session.run(batch.to_padded(max_history), last, features)[0]

    users = np.unique(test["user"].to_numpy())
    ks = params.evaluate.ks
    scorers = served_scorers(layout, manifest, name, score, max_history)
    topk = rank_together(scorers, hist.select, users, train_mat, max(ks), params.evaluate.batch_size)
    values = ranking_metrics(topk[name], users, data, test, ks, True, False, vectors)
    segments = values.pop("segments")
    return {
        "algorithm": name,
        "export_algorithm": params.export.algorithm,
        "graph": f"{layout.export.name}/{MODEL_FILE}",
        "providers": session.providers,
        "max_history": max_history,
        **rounded(values),
        "segments": rounded(segments),
        **new_items_summary(manifest, topk, name, users, data, test, ks, vectors),
    }


GRAPH_ALONE = "graph alone"  # the served graph's ranking without the side scorer, for the comparison


def served_scorers(
    layout: Layout,
    manifest: dict[str, Any],
    name: str,
    score: Callable[[Histories], np.ndarray],
    max_history: int,
) -> dict[str, Callable[[Histories], np.ndarray]]:
    """What ``/recommend`` serves under ``name``: the graph's scores, then the side scorer's merge of
    items without training interactions (:mod:`fuserec.cold_items`), exactly as the service merges them;
    and under :data:`GRAPH_ALONE` the graph's own scores of the same run (reused, not run twice), so
    metrics.json says what the side scorer changed. Just the graph for an export without a side scorer."""
    entry = manifest.get("cold_items")
    if not entry:
        return {name: score}
    side = ColdItems.load(layout.export, entry)
    kept: dict[str, Any] = {}

    def graph(batch: Histories) -> np.ndarray:
        if kept.get("batch") is not batch:  # the served scorer runs first on each batch, this reuses it
            kept.update(batch=batch, scores=score(batch))
        return np.asarray(kept["scores"])

    return {name: merged_scorer(side, graph, max_history), GRAPH_ALONE: graph}


def new_items_summary(
    manifest: dict[str, Any],
    topk: dict[str, np.ndarray],
    name: str,
    users: np.ndarray,
    data: Dataset,
    test: pd.DataFrame,
    ks: list[int],
    vectors: np.ndarray,
) -> dict[str, Any]:
    """``side_scorer``: its weight (chosen on validation at export), how many lists it added an item
    without training interactions to, and the served row's metrics without it (``graph_alone``)."""
    if GRAPH_ALONE not in topk:
        return {}
    entry = manifest["cold_items"]
    cold = data.item_popularity() == 0
    k = min(10, topk[name].shape[1])
    lists = topk[name][:, :k]
    listed = (lists >= 0) & cold[np.maximum(lists, 0)]
    alone = ranking_metrics(topk[GRAPH_ALONE], users, data, test, ks, True, False, vectors)
    segments = alone.pop("segments")
    return {
        "side_scorer": {
            "what": "fuserec.cold_items: content, calibrated on validation (model/cold_items.npz)",
            "weight": entry.get("weight"),
            "budget": entry.get("budget"),
            f"lists_with_new_items@{k}": round(float(listed.any(axis=1).mean()), 6),
            f"new_items_per_list@{k}": round(float(listed.sum(axis=1).mean()), 6),
            "graph_alone": {**rounded(alone), "segments": rounded(segments)},
        }
    }


def evaluate(params: Params) -> str:
    """Test metrics of every trained model, every fitted fuser (bound to those models), the served graph."""
    if params.task == "rating":  # the rating task's evaluate: same folders, its own content
        from fuserec.stages.rating.evaluate import evaluate as rating_evaluate

        return rating_evaluate(params)
    from fuserec.artifacts import fitted_fusers, load_fuser

    layout = Layout(params.outputs_dir)
    exported = chosen_algorithm(params, layout)
    exported_manifest(layout, exported)  # fail before the long pass, not after it
    data = Dataset.load(layout.clean, interactions=layout.split_file("train"))
    test = pd.read_parquet(layout.split_file("test"))
    results: dict[str, dict[str, dict[str, Any]]] = {"models": {}, "fusers": {}}
    by_segment: dict[str, dict[str, dict[str, float]]] = {}  # segment -> model or fuser -> metrics
    layout.plots.mkdir(parents=True, exist_ok=True)
    # Every model scores each batch of test users once; the fusers bound to them reuse those scores, and
    # the re-ranking curve reuses the exported scorer's.
    models = {f.name: SharedScores(load_algorithm(f)) for f in trained_models(layout)}
    scorers: dict[str, tuple[str, Any]] = {name: ("models", algo) for name, algo in models.items()}
    for folder in fitted_fusers(layout):
        scorers[folder.name] = ("fusers", SharedScores(load_fuser(folder, layout, models)))
    users = np.unique(test["user"].to_numpy())
    hist, train_mat = data.histories(), data.matrix()
    vectors = item_content_vectors(data.items)
    # Without the exported scorer among them there is nothing to re-rank.
    curve = rerank_curve(params, data, vectors, train_mat) if exported in scorers else None

    def add_to_curve(batch: Histories, rows: np.ndarray) -> None:
        if curve is not None:
            curve.add(scorers[exported][1].score(batch), train_mat[rows])

    topks = rank_together(
        {name: scorer.score for name, (_, scorer) in scorers.items()},
        hist.select,
        users,
        train_mat,
        max(params.evaluate.ks),
        params.evaluate.batch_size,
        add_to_curve,
    )
    per_user: dict[str, dict[str, dict[str, np.ndarray]]] = {"models": {}, "fusers": {}}
    for name, (kind, _) in scorers.items():
        scores = ranking_metrics(topks[name], users, data, test, params.evaluate.ks, True, True, vectors)
        segments = scores.pop("segments", {})
        per_user[kind][name] = scores.pop("per_user")
        results[kind][name] = rounded(scores)
        for segment, values in segments.items():
            by_segment.setdefault(segment, {})[name] = rounded(values)
        metrics_by_k(scores, params.evaluate.ks).to_csv(layout.plots / f"{name}.csv", index=False)
    sig = significance(results, per_user)
    if sig:  # a best "fuser" that fell back is one model: say which
        sig["best_fuser_served_alone"] = scorers[sig["best_fuser"]][1].served_alone
    cold = simulated_cold_metrics(params, scorers, data, test, hist, train_mat)
    if cold is not None:
        by_segment[SIMULATED_COLD], cold_per_user = cold
        if sig:
            fused = cold_per_user["fusers"][sig["best_fuser"]]
            sig[SIMULATED_COLD] = segment_comparison(fused, cold_per_user["models"])
    served = served_metrics(params, layout, exported, data, test, hist, train_mat, vectors)
    python = results["models"].get(exported) or results["fusers"].get(exported) or {}
    # over the accuracy metrics (novelty is a popularity rank, not comparable on their scale)
    accuracy = [f"{m}@{k}" for m in PER_USER_METRICS for k in params.evaluate.ks]
    graph = served.get("side_scorer", {}).get("graph_alone", served)  # parity: the graph alone
    gaps = [abs(graph[key] - python[key]) for key in accuracy if key in python and key in graph]
    served["largest_difference_from_python"] = round(max(gaps), 6) if gaps else None
    payload = {
        "protocol": protocol_summary(params, data.interactions, test, data.n_items),
        **results,
        "served": served,
        "segments": by_segment,
        "significance": sig,
        "rerank": curve_summary(params, layout, curve, test, data, exported),
    }
    write_json(layout.metrics, payload)
    return str(layout.metrics)
