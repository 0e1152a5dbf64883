"""Evaluate: full-ranking metrics of every trained model on the test split.

Each model scores the training histories of users with test items; their training items are excluded;
ranking is over the whole catalog. Writes ``metrics.json`` (a DVC metrics file) and one CSV per model
with every metric by k (DVC plots).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from prefect import task

from fuserec.config import Params
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.layout import Layout
from fuserec.manifest import write_json
from fuserec.metrics import evaluate_scores
from fuserec.tasks.split import SPLIT_FILES
from fuserec.tasks.train import load_algorithm, trained_models

PLOT_METRICS = ("ndcg", "recall", "precision", "hr", "map", "mrr")


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


def evaluate_model(
    algo: Any, data: Dataset, test: pd.DataFrame, ks: list[int], batch_size: int
) -> dict[str, float]:
    train_hist = data.histories()
    train_mat = data.matrix()
    truth = interactions_matrix(test, data.n_users, data.n_items)
    users = np.unique(test["user"].to_numpy())
    metrics, _ = evaluate_scores(
        lambda rows: algo.score(train_hist.select(rows)),
        users,
        train_mat,
        truth,
        ks,
        data.item_popularity(),
        batch_size,
    )
    return metrics


def metrics_by_k(metrics: dict[str, float], ks: list[int]) -> pd.DataFrame:
    rows = [{"k": k, **{m: metrics.get(f"{m}@{k}") for m in PLOT_METRICS}} for k in ks]
    return pd.DataFrame(rows)


@task(name="evaluate")
def evaluate(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    data = Dataset.load(layout.clean, interactions=layout.split / SPLIT_FILES["train"])
    test = pd.read_parquet(layout.split / SPLIT_FILES["test"])
    models: dict[str, dict[str, float]] = {}
    layout.plots.mkdir(parents=True, exist_ok=True)
    for folder in trained_models(layout):
        algo = load_algorithm(folder)
        scores = evaluate_model(algo, data, test, params.evaluate.ks, params.evaluate.batch_size)
        models[folder.name] = {k: v if isinstance(v, int) else round(float(v), 6) for k, v in scores.items()}
        metrics_by_k(scores, params.evaluate.ks).to_csv(layout.plots / f"{folder.name}.csv", index=False)
    payload = {"protocol": protocol_summary(params, data.interactions, test, data.n_items), "models": models}
    write_json(layout.metrics, payload)
    return str(layout.metrics)
