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
