"""Evaluate: RMSE and MAE of every rater, every fuser and the served graph, overall and per segment.

``temporal``: the raters and fusers of this run predict each held-out rating from the user's training
ratings, and the exported graph does the same under onnxruntime for every test user (the ``served`` row,
with its largest difference from Python). ``kfold``: the whole fit (raters, validation folds, fusers,
choice) is repeated on each of the ``rating.folds`` folds, with the very function the fuse stage and
``benchmarks/rating.py`` call; each fold's numbers are kept and the mean is reported, as Surprise's
benchmark does. The served graph is fitted on every rating then, so its row is the cross-validated
estimate of the same procedure plus the export's parity check.

Then the best fuser is compared with the best single rater, paired per rating and per user.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from fuserec.config import Params
from fuserec.histories import Histories
from fuserec.layout import MODEL_FILE, Layout
from fuserec.manifest import read_json, write_json
from fuserec.rating_ensemble import RatingEnsemble
from fuserec.rating_fusion import fit_rating_ensemble
from fuserec.rating_metrics import errors, paired_errors, rating_report, segment_masks
from fuserec.rating_onnx import RatingSession
from fuserec.stages.rating.data import FOLDS_FILE, Catalogue, catalogue, histories_of, rater_names
from fuserec.stages.rating.export import padded
from fuserec.stages.rating.fuse import fuser_names, load_fusion

log = logging.getLogger(__name__)
SERVED_BATCH = 256  # test users per onnxruntime run


def grouped(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, group, position)``: the distinct rows, and each pair's group and place within it."""
    order = np.argsort(rows, kind="stable")
    users, start, counts = np.unique(rows[order], return_index=True, return_counts=True)
    group = np.empty(len(rows), dtype=np.int64)
    position = np.empty(len(rows), dtype=np.int64)
    group[order] = np.repeat(np.arange(len(users)), counts)
    position[order] = np.arange(len(rows)) - np.repeat(start, counts)
    return users, group, position


def served_predictions(
    session: RatingSession,
    histories: Histories,
    rows: np.ndarray,
    items: np.ndarray,
    max_history: int,
    features: Callable[[np.ndarray], np.ndarray | None] = lambda users: None,
) -> np.ndarray:
    """``float32 [n]``: the graph's rating of ``items[n]`` for history ``rows[n]``, users batched;
    ``features(users)`` gives those users' attribute rows when the graph reads them."""
    users, group, position = grouped(rows)
    width = int(position.max()) + 1 if len(rows) else 1
    grid = np.zeros((len(users), width), dtype=np.int64)
    grid[group, position] = items
    out = np.zeros((len(users), width), dtype=np.float32)
    for start in range(0, len(users), SERVED_BATCH):
        part = slice(start, start + SERVED_BATCH)
        history, ratings = padded(histories, users[part], max_history)
        out[part] = session.run_padded(history, ratings, grid[part], features(users[part]))["ratings"]
    return out[group, position]


def significance(
    metrics: dict[str, Any], preds: dict[str, np.ndarray], actual: np.ndarray, users: np.ndarray, n_users: int
) -> dict[str, Any]:
    """The best fuser against the best single rater (lowest RMSE each), paired by rating and by user."""
    best_single = min(metrics["models"], key=lambda n: metrics["models"][n]["rmse"], default=None)
    best_fused = min(metrics["fusers"], key=lambda n: metrics["fusers"][n]["rmse"], default=None)
    if best_single is None or best_fused is None:
        return {"summary": "not computed: it needs at least one rater and one fuser"}
    sq_f = (preds[best_fused] - actual) ** 2
    sq_s = (preds[best_single] - actual) ** 2
    test = paired_errors(sq_f, sq_s, users, n_users)
    per_user_p = test["per_user"].get("p_value", float("nan"))
    summary = (
        f"{best_fused} RMSE {metrics['fusers'][best_fused]['rmse']:.4f} against {best_single} "
        f"{metrics['models'][best_single]['rmse']:.4f} over {test['n_ratings']} ratings: per-rating paired "
        f"t-test p={test['per_rating_ttest_p']:.3g}; per user p={per_user_p:.3g}"
    )
    return {"best_single": best_single, "best_fused": best_fused, **test, "summary": summary}


def _all_predictions(
    ensemble: RatingEnsemble, histories: Histories, test: pd.DataFrame
) -> dict[str, np.ndarray]:
    """Every component's and every fuser's clipped prediction of each held-out rating."""
    rows, items = test["user"].to_numpy(np.int64), test["item"].to_numpy(np.int64)
    preds, meta = ensemble.pair_inputs(histories, rows, items)
    out = {name: preds[:, j] for j, name in enumerate(ensemble.names)}
    for name in ensemble.fusers:
        out[name] = ensemble.combine(preds, meta, name)[0]
    return out


def temporal(params: Params, layout: Layout, cat: Catalogue) -> dict[str, Any]:
    train = pd.read_parquet(layout.split_file("train"))
    test = pd.read_parquet(layout.split_file("test"))
    if test.empty:
        raise ValueError(
            f"{layout.split_file('test')} holds no ratings: no user has split.min_user_positives ratings; "
            "lower it, or use rating.protocol: kfold"
        )
    histories = histories_of(train, cat.n_users, cat.n_items)
    ensemble = load_fusion(layout)
    masks = segment_masks(train, test, cat.n_users, cat.n_items, params.rating.cold_user_max)
    preds = _all_predictions(ensemble, histories, test)
    metrics: dict[str, Any] = {
        "models": {n: rating_report(preds[n], test, masks) for n in ensemble.names},
        "fusers": {n: rating_report(preds[n], test, masks) for n in ensemble.fusers},
    }
    session = RatingSession(layout.export / MODEL_FILE, params.export.providers)
    manifest = read_json(layout.export / "manifest.json")
    name = manifest["algorithm"]["name"]
    rows, items = test["user"].to_numpy(np.int64), test["item"].to_numpy(np.int64)
    spec = manifest.get("features_input")
    columns = tuple(spec["columns"]) if spec else ()

    def features(users: np.ndarray) -> np.ndarray | None:
        return cat.attribute_rows(users, columns) if columns else None

    graph = served_predictions(session, histories, rows, items, int(manifest["max_history"]), features)
    python = preds[name]
    metrics["served"] = {
        "name": name,
        **rating_report(graph, test, masks),
        "max_abs_diff_python": float(np.max(np.abs(graph - python))),
        "over_1e-4": int((np.abs(graph - python) > 1e-4).sum()),
        "what": "the exported graph under onnxruntime, every held-out rating",
    }
    actual = test["rating"].to_numpy(np.float64)
    metrics["significance"] = significance(metrics, preds, actual, rows, cat.n_users)
    metrics["protocol"] = {
        "protocol": "temporal",
        "test_fraction": params.split.test_fraction,
        "train_ratings": len(train),
        "test_ratings": len(test),
        "test_users": int(test["user"].nunique()),
        "n_items": cat.n_items,
        "cold_user_max": params.rating.cold_user_max,
    }
    return metrics


def cross_validate(params: Params, layout: Layout, cat: Catalogue) -> dict[str, Any]:
    frame = pd.read_parquet(layout.split / FOLDS_FILE)
    names, fusers = rater_names(params), fuser_names(params)
    components = {n: {"seed": params.train.seed, **params.rater_config(n)} for n in names}
    fuser_configs = {n: {"seed": params.train.seed, **params.rating_fuser_config(n)} for n in fusers}
    predicted: dict[str, np.ndarray] = {}
    per_fold: dict[str, list[dict[str, Any]]] = {}
    chosen_per_fold: list[str] = []
    segments: dict[str, np.ndarray] = {}
    fold = frame["fold"].to_numpy()
    for k in np.unique(fold):
        train, test = frame[fold != k], frame[fold == k]
        ensemble, _, _ = fit_rating_ensemble(
            train.drop(columns="fold"),
            cat.n_users,
            cat.n_items,
            components,
            fuser_configs,
            folds=params.rating.validation_folds,
            seed=params.rating.seed,
            side=cat.side,
            choose=params.rating.export,
            log=log.info,
        )
        histories = histories_of(train, cat.n_users, cat.n_items)
        preds = _all_predictions(ensemble, histories, test)
        preds["chosen"] = preds[ensemble.chosen]
        chosen_per_fold.append(ensemble.chosen)
        held = np.flatnonzero(fold == k)
        for name, values in preds.items():
            predicted.setdefault(name, np.full(len(frame), np.nan))[held] = values
            per_fold.setdefault(name, []).append(
                {"fold": int(k), **errors(values, test["rating"].to_numpy())}
            )
        for seg, mask in segment_masks(
            train, test, cat.n_users, cat.n_items, params.rating.cold_user_max
        ).items():
            segments.setdefault(seg, np.zeros(len(frame), dtype=bool))[held] = mask

    def row(name: str) -> dict[str, Any]:
        folds = per_fold[name]
        pooled = rating_report(predicted[name], frame, segments)
        return {
            "rmse": float(np.mean([f["rmse"] for f in folds])),
            "mae": float(np.mean([f["mae"] for f in folds])),
            "n": len(frame),
            "folds": folds,
            "pooled_rmse": pooled["rmse"],
            "segments": pooled["segments"],
        }

    metrics: dict[str, Any] = {
        "models": {n: row(n) for n in names},
        "fusers": {n: row(n) for n in fusers},
    }
    manifest = read_json(layout.export / "manifest.json")
    metrics["served"] = {
        "name": manifest["algorithm"]["name"],
        **row("chosen"),
        "chosen_per_fold": chosen_per_fold,
        "max_abs_diff_python": manifest["parity"]["max_abs_diff"],
        "what": "cross-validated estimate of the whole procedure (fit, fuse, choose); the exported graph, "
        "fitted on every rating, matches Python within max_abs_diff_python",
    }
    actual = frame["rating"].to_numpy(np.float64)
    metrics["significance"] = significance(
        metrics, predicted, actual, frame["user"].to_numpy(np.int64), cat.n_users
    )
    metrics["protocol"] = {
        "protocol": "kfold",
        "folds": params.rating.folds,
        "seed": params.rating.seed,
        "test_ratings": len(frame),
        "test_users": int(frame["user"].nunique()),
        "n_items": cat.n_items,
        "cold_user_max": params.rating.cold_user_max,
    }
    return metrics


def evaluate(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    cat = catalogue(layout)
    if params.rating.protocol == "kfold":
        metrics = cross_validate(params, layout, cat)
    else:
        metrics = temporal(params, layout, cat)
    served = metrics["served"]
    metrics = {"task": "rating", "rmse": served["rmse"], "mae": served["mae"], **metrics}
    write_json(layout.metrics, metrics)
    write_plots(layout, metrics)
    return str(layout.metrics)


def write_plots(layout: Layout, metrics: dict[str, Any]) -> None:
    """The declared plot outputs: RMSE per segment per model (``plots/segments.csv``); no re-ranking curve
    in this task (``rerank_curve.csv`` holds its header only)."""
    layout.plots.mkdir(parents=True, exist_ok=True)
    rows = [
        {"name": name, "kind": group[:-1], "segment": seg, "rmse": values["rmse"], "n": values["n"]}
        for group in ("models", "fusers")
        for name, m in metrics[group].items()
        for seg, values in m["segments"].items()
    ]
    pd.DataFrame(rows, columns=["name", "kind", "segment", "rmse", "n"]).to_csv(
        layout.plots / "segments.csv", index=False
    )
    layout.rerank_curve.write_text("diversity_weight,novelty_weight,ndcg@10,diversity@10\n")
