"""Full-ranking evaluation of a scorer on a carve of a split, under the evaluation protocol.

The evaluate stage, ``fuserec tune`` and the benchmarks all score through these functions, so every
choice is made on validation and test is scored once, by the same code as the reported metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fuserec.api import Algorithm
from fuserec.artifacts import seed_everything
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.layout import Layout
from fuserec.metrics import evaluate_rankings, ndcg_at_k, rank_users
from fuserec.rerank import beyond_accuracy
from fuserec.segments import COLD_USER_MAX, segment_truths
from fuserec.significance import best_by, paired_comparison
from fuserec.splitting import Carve

CarveName = Literal["validation", "test"]


def load_carve(outputs: str | Path, carve: CarveName) -> Carve:
    """``validation``: fit on train', truth = validation; ``test``: fit on train, truth = test."""
    layout = Layout(Path(outputs))
    fit_file, truth_file = ("train_inner", "valid") if carve == "validation" else ("train", "test")
    data = Dataset.load(layout.clean, interactions=layout.split_file(fit_file))
    return Carve(data, pd.read_parquet(layout.split_file(truth_file)))


def score_config(
    cls: type[Algorithm],
    config: dict[str, Any],
    carve: Carve,
    ks: list[int] | None = None,
    batch_size: int = 1024,
) -> tuple[dict[str, float], Algorithm]:
    """Fit ``cls(config)`` on the carve and return (metrics, fitted model)."""
    cfg = cls.Config.model_validate(config)
    seed_everything(cfg.seed)
    algo = cls(cfg).fit(carve.fit)
    return evaluate_model(algo, carve.fit, carve.truth, ks or [10], batch_size, segments=False), algo


PLOT_METRICS = ("ndcg", "recall", "precision", "hr", "map", "mrr")


def evaluate_model(
    algo: Any,
    data: Dataset,
    test: pd.DataFrame,
    ks: list[int],
    batch_size: int,
    segments: bool = True,
    per_user: bool = False,
    vectors: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric at every k over users with test items, plus ``segments`` (see :mod:`fuserec.segments`).

    ``per_user`` adds each user's NDCG@10 and cold flag (arrays, for paired significance tests);
    ``vectors`` (item content) adds intra-list diversity, Gini of exposure and self-information @10.
    """
    users = np.unique(test["user"].to_numpy())
    train_hist = data.histories()
    topk = rank_users(
        lambda rows: algo.score(train_hist.select(rows)),
        users,
        data.matrix(),
        np.ones(len(users), dtype=bool),
        max(ks),
        batch_size,
    )
    return ranking_metrics(topk, users, data, test, ks, segments, per_user, vectors)


def ranking_metrics(
    topk: np.ndarray,
    users: np.ndarray,
    data: Dataset,
    test: pd.DataFrame,
    ks: list[int],
    segments: bool = True,
    per_user: bool = False,
    vectors: np.ndarray | None = None,
) -> dict[str, Any]:
    """What :func:`evaluate_model` reports, from the top-k lists of ``users`` (rows of ``data``)."""
    train_mat = data.matrix()
    truth = interactions_matrix(test, data.n_users, data.n_items)
    popularity = data.item_popularity()
    truth_u = truth[users]
    metrics: dict[str, Any] = evaluate_rankings(topk, truth_u, ks, popularity)
    if vectors is not None:
        n_with_history = int((np.diff(sp.csr_matrix(train_mat).indptr) > 0).sum())
        metrics |= beyond_accuracy(topk[:, : min(10, topk.shape[1])], vectors, popularity, n_with_history)
    if per_user:
        metrics["per_user"] = {
            "users": users,
            "ndcg@10": ndcg_at_k(topk, truth_u, min(10, topk.shape[1])),
            "cold": np.diff(sp.csr_matrix(train_mat).indptr)[users] <= COLD_USER_MAX,
        }
    if segments:
        user_counts = np.diff(sp.csr_matrix(train_mat).indptr)[users]
        seg_ks = [k for k in ks if k == 10] or [min(ks)]
        metrics["segments"] = {
            name: _segment_summary(topk[rows], part[rows], seg_ks, popularity)
            for name, (rows, part) in segment_truths(truth_u, user_counts, popularity).items()
        }
    return metrics


def _segment_summary(
    topk: np.ndarray, truth: sp.csr_matrix, ks: list[int], popularity: np.ndarray
) -> dict[str, float]:
    if truth.shape[0] == 0:
        return {"n_users": 0}
    full = evaluate_rankings(topk, truth, ks, popularity)
    keep = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "hr")]
    return {**{key: full[key] for key in keep}, "n_users": full["n_users"], "n_interactions": int(truth.nnz)}


def significance(
    results: dict[str, dict[str, dict[str, Any]]], per_user: dict[str, dict[str, dict[str, np.ndarray]]]
) -> dict[str, Any]:
    """The best fuser against the best single model, paired per user on NDCG@10 (all and cold users)."""
    fuser, single = best_by(results["fusers"], "ndcg@10"), best_by(results["models"], "ndcg@10")
    if fuser is None or single is None:
        return {}
    a, b = per_user["fusers"][fuser], per_user["models"][single]
    out: dict[str, Any] = {
        "metric": "ndcg@10",
        "best_fuser": fuser,
        "best_single": single,
        "all_users": paired_comparison(a["ndcg@10"], b["ndcg@10"]),
        "test": "paired t-test and Wilcoxon over users; 95% interval from 10,000 bootstrap resamples",
    }
    cold = a["cold"]
    if cold.any():
        models = {name: values["ndcg@10"][cold] for name, values in per_user["models"].items()}
        out["cold_users"] = segment_comparison(a["ndcg@10"][cold], models)
    return out


def segment_comparison(fused: np.ndarray, models: dict[str, np.ndarray]) -> dict[str, Any]:
    """The best fuser against the best single model *on this segment* (per-user NDCG@10 arrays)."""
    best = max(models, key=lambda name: float(np.nanmean(models[name])))
    return {"best_single_on_segment": best, **paired_comparison(fused, models[best])}


def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics for JSON: floats to 6 places, counts as ints, nested segments likewise."""
    return {
        k: rounded(v) if isinstance(v, dict) else v if isinstance(v, int) else round(float(v), 6)
        for k, v in metrics.items()
    }


def metrics_by_k(metrics: dict[str, float], ks: list[int]) -> pd.DataFrame:
    rows = [{"k": k, **{m: metrics.get(f"{m}@{k}") for m in PLOT_METRICS}} for k in ks]
    return pd.DataFrame(rows)
