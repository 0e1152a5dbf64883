"""Terminal views of a run: the metrics table and one user's recommendations from the ONNX model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from fuserec.config import AUTO
from fuserec.data.dataset import Dataset
from fuserec.layout import CATALOG_FILE, MODEL_FILE, Layout
from fuserec.manifest import read_json
from fuserec.onnx_model import OnnxRecommender

SHOWN = ("ndcg@10", "recall@10", "hr@10", "coverage@10", "novelty@10")


def metrics_table(outputs: Path) -> Table:
    """Test metrics of every model, and last the served graph's, with why it was chosen in the caption."""
    layout = Layout(outputs)
    metrics = read_json(layout.metrics)
    table = Table(title=f"test metrics ({metrics['protocol']['test_users']} users)")
    table.add_column("model", no_wrap=True)
    for metric in SHOWN:
        table.add_column(metric, justify="right", no_wrap=True)
    for name, values in sorted(metrics["models"].items(), key=lambda kv: -kv[1].get("ndcg@10", 0)):
        table.add_row(name, *(f"{values[m]:.4f}" if m in values else "-" for m in SHOWN))
    served = metrics.get("served")
    if served:
        label = f"served: {served['algorithm']} (onnxruntime)"
        table.add_row(label, *(f"{served[m]:.4f}" if m in served else "-" for m in SHOWN))
        table.caption = served_caption(layout, served)
    return table


def served_caption(layout: Layout, served: dict[str, Any]) -> str:
    """Why the served scorer is served: named, or best on validation with the runner-up's score."""
    if served.get("export_algorithm") != AUTO or not layout.selection.exists():
        return f"{served['algorithm']} is served: named in export.algorithm"
    selection = read_json(layout.selection)
    metric = selection["metric"]
    scores = [f"{n} {c[metric]:.4f}" for n, c in list(selection["candidates"].items())[:3]]
    return f"{served['algorithm']} is served: best validation {metric} ({', '.join(scores)}, ...)"


def top_items_for_user(outputs: Path, user_id: str | None) -> Table:
    """Top-k for a user (default: the first test user) scored from their training history via ONNX."""
    layout = Layout(outputs)
    manifest = read_json(layout.export / "manifest.json")
    data = Dataset.load(layout.clean, interactions=layout.split_file("train"))
    if user_id is None:
        user = int(pd.read_parquet(layout.split_file("test"))["user"].min())
    else:
        ids = data.users["user_id"].astype(str).to_numpy()
        matches = np.flatnonzero(ids == str(user_id))
        if not len(matches):
            raise SystemExit(
                f"user {user_id!r} is not in the catalog's users; pick one from {ids[:5].tolist()}"
            )
        user = int(matches[0])
    history = data.histories().select([user])
    session = OnnxRecommender(
        layout.export / MODEL_FILE, manifest["providers"], prepack=manifest.get("prepack", False)
    )
    times = data.interactions.loc[data.interactions["user"] == user, "timestamp"]
    last = np.asarray([int(times.max()) if len(times) else int(time.time())], dtype=np.int64)
    _, items, scores = session.run(history.to_padded(manifest["max_history"]), last)
    catalog = pd.read_parquet(layout.export / CATALOG_FILE)
    raw_user = data.users["user_id"].iloc[user]
    algo = manifest["algorithm"]["name"]
    table = Table(
        "rank",
        "item_id",
        "title",
        "genres",
        "score",
        title=f"top-{len(items[0])} for user {raw_user} ({len(history.user(0))} items in history) "
        f"from {algo}, onnxruntime {session.providers[0]}",
    )
    for rank, (item, score) in enumerate(zip(items[0], scores[0], strict=True), 1):
        row = catalog.iloc[int(item)]
        table.add_row(
            str(rank),
            str(row["item_id"]),
            str(row.get("title", "")),
            str(row.get("genres", "")),
            f"{score:.4f}",
        )
    return table


def rating_metrics_table(outputs: Path) -> Table:
    """The rating task's test RMSE / MAE of every rater and fuser, and last the served graph's."""
    metrics = read_json(Layout(outputs).metrics)
    protocol = metrics["protocol"]
    how = (
        f"{protocol['folds']}-fold cross-validation" if protocol["protocol"] == "kfold" else "temporal split"
    )
    table = Table(title=f"rating test metrics ({protocol['test_ratings']} ratings, {how}; lower is better)")
    for column in ("model", "kind", "RMSE", "MAE"):
        table.add_column(column, justify="left" if column in ("model", "kind") else "right", no_wrap=True)
    rows = [(n, k[:-1], v) for k in ("models", "fusers") for n, v in metrics[k].items()]
    for name, kind, values in sorted(rows, key=lambda r: r[2]["rmse"]):
        table.add_row(name, kind, f"{values['rmse']:.4f}", f"{values['mae']:.4f}")
    served = metrics["served"]
    table.add_row(f"served: {served['name']}", "graph", f"{served['rmse']:.4f}", f"{served['mae']:.4f}")
    selection = read_json(Layout(outputs).selection) if Layout(outputs).selection.exists() else {}
    table.caption = str(selection.get("reason", ""))
    return table


def rating_predictions_for_user(outputs: Path, user_id: str | None, n: int = 10) -> Table:
    """A user's held-out ratings beside what the exported graph predicts from their training ratings
    (default: the first user with held-out ratings; without them, the first ``n`` unrated items)."""
    from fuserec.rating_onnx import RatingSession

    layout = Layout(outputs)
    manifest = read_json(layout.export / "manifest.json")
    users = pd.read_parquet(layout.clean / "users.parquet")
    train, test = pd.read_parquet(layout.split_file("train")), pd.read_parquet(layout.split_file("test"))
    if user_id is None:
        user = int(test["user"].min()) if len(test) else int(train["user"].min())
    else:
        matches = np.flatnonzero(users["user_id"].astype(str).to_numpy() == str(user_id))
        if not len(matches):
            raise SystemExit(
                f"user {user_id!r} is not in the users table; pick one of {users['user_id'][:5].tolist()}"
            )
        user = int(users["user"].iloc[matches[0]])
    mine = train[train["user"] == user].sort_values(["timestamp", "item"], kind="stable")
    held = test[test["user"] == user].head(n)
    targets = (
        held["item"].to_numpy()
        if len(held)
        else np.setdiff1d(np.arange(manifest["n_items"]), mine["item"])[:n]
    )
    session = RatingSession(layout.export / MODEL_FILE, manifest["providers"])
    history = mine["item"].to_numpy()[-manifest["max_history"] :]
    ratings = mine["rating"].to_numpy()[-manifest["max_history"] :]
    predicted = session.run([history.tolist()], [ratings.tolist()], [targets.tolist()])["ratings"][0]
    catalog = pd.read_parquet(layout.export / CATALOG_FILE)
    actual = dict(zip(held["item"], held["rating"], strict=True))
    table = Table(
        "item_id",
        "title",
        "predicted",
        "actual",
        title=f"predicted ratings for user {users['user_id'].iloc[user]} ({len(mine)} training ratings) from "
        f"{manifest['algorithm']['name']}, onnxruntime {session.providers[0]}",
    )
    for item, value in zip(targets, predicted, strict=False):
        row = catalog.iloc[int(item)]
        truth = actual.get(item)
        table.add_row(
            str(row["item_id"]),
            str(row.get("title", "")),
            f"{value:.2f}",
            "-" if truth is None else f"{truth:g}",
        )
    return table
