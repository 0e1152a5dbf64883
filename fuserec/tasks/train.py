"""Train: fit every algorithm that ``train.algorithms`` names (found through the registry) on train."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task

from fuserec.api import Algorithm
from fuserec.config import Params
from fuserec.data.dataset import Dataset
from fuserec.layout import Layout
from fuserec.manifest import file_sha256, read_json, write_manifest
from fuserec.registry import get_algorithm, plugin_info, resolve_names
from fuserec.tasks.split import SPLIT_FILES


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_algorithm(name: str, params: Params) -> Algorithm:
    """An unfitted plugin with its params.yaml config (train.seed unless the plugin sets its own); seeded."""
    cls = get_algorithm(name)
    config = cls.Config.model_validate({"seed": params.train.seed, **params.algorithm_config(name)})
    seed_everything(config.seed)
    return cls(config)


def fit_algorithm(name: str, params: Params, data: Dataset, out_dir: Path, data_hash: str) -> Path:
    """Fit one plugin with its params.yaml config and save it with a manifest."""
    algo = make_algorithm(name, params)
    config = algo.config
    start = time.perf_counter()
    algo.fit(data)
    seconds = time.perf_counter() - start
    algo.save(out_dir)
    write_training_log(algo, Layout(params.outputs_dir).curves / f"{name}.csv")
    info = plugin_info(name)
    write_manifest(
        out_dir,
        kind="algorithm",
        name=name,
        entry_point=info.target,
        distribution=info.distribution,
        version=info.version,
        api_version=info.api_version,
        config=config.model_dump(mode="json"),
        data_sha256=data_hash,
        fit_seconds=round(seconds, 3),
    )
    return out_dir


def write_training_log(algo: Algorithm, path: Path) -> Path | None:
    """Write a trainable plugin's ``training_log_`` rows (see :mod:`fuserec.training`) as CSV."""
    rows = getattr(algo, "training_log_", None)
    path.unlink(missing_ok=True)
    if not rows:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def load_algorithm(folder: Path) -> Algorithm:
    """Load a trained plugin through the registry entry named in its manifest."""
    manifest = read_json(folder / "manifest.json")
    return get_algorithm(manifest["name"]).load(folder)


def trained_models(layout: Layout) -> list[Path]:
    """Model folders the train stage wrote (those with a manifest), sorted by name."""
    if not layout.models.exists():
        return []
    return sorted(p for p in layout.models.iterdir() if (p / "manifest.json").exists())


@task(name="train")
def train(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    train_file = layout.split / SPLIT_FILES["train"]
    data = Dataset.load(layout.clean, interactions=train_file)
    data_hash = file_sha256(train_file)
    names = resolve_names(params.train.algorithms)
    if not names:
        raise RuntimeError(
            "no algorithm plugin is installed; run `fuserec plugins` to see what failed to load"
        )
    # Models of plugins no longer requested must not linger into evaluation.
    for stale in trained_models(layout):
        if stale.name not in names:
            shutil.rmtree(stale)
    layout.curves.mkdir(parents=True, exist_ok=True)  # a DVC plots output: present even when empty
    for curve in layout.curves.glob("*.csv"):
        if curve.stem not in names:
            curve.unlink()
    for name in names:
        fit_algorithm(name, params, data, layout.model(name), data_hash)
    return str(layout.models)
