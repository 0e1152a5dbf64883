"""Train: fit every algorithm that ``train.algorithms`` names (found through the registry) on train.

``train`` fits them one after another (``fuserec stage train``, so ``dvc repro``); the Prefect flow runs
one :func:`train_plugin` task per plugin instead, concurrently and each with its own cache key
(:mod:`fuserec.flows.stages`). Both write the same files: each plugin is seeded from its own config, so the
order and concurrency of the fits do not change what is learned.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task

from fuserec.api import Algorithm
from fuserec.config import Params, TrainConfig
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


def prepare_training(params: Params) -> list[str]:
    """The plugins to fit; removes models and curves of plugins no longer requested."""
    layout = Layout(params.outputs_dir)
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
    return names


@task(name="train")
def train(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    train_file = layout.split / SPLIT_FILES["train"]
    names = prepare_training(params)
    data = Dataset.load(layout.clean, interactions=train_file)
    data_hash = file_sha256(train_file)
    for name in names:
        fit_algorithm(name, params, data, layout.model(name), data_hash)
    return str(layout.models)


@task(name="train-plugin", task_run_name="train[{name}]")
def train_plugin(name: str, params: Params, threads: int | None = None) -> str:
    """Fit one plugin (one task per plugin, so each has its own cache key and they can run concurrently).

    Takes a name and the params, not a dataset, so that a Dask worker process can run it: it reads the
    split from ``params.outputs``, which must therefore be visible to every worker.
    """
    layout = Layout(params.outputs_dir)
    train_file = layout.split / SPLIT_FILES["train"]
    with limited_threads(threads):
        data = Dataset.load(layout.clean, interactions=train_file)
        fit_algorithm(name, params, data, layout.model(name), file_sha256(train_file))
    return str(layout.model(name))


def threads_per_fit(cfg: TrainConfig) -> int:
    """torch/BLAS threads for each of ``cfg.workers`` concurrent fits: never more threads than cores."""
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers)


_limits_lock = threading.Lock()
_limits: dict[str, Any] = {"depth": 0}


@contextmanager
def limited_threads(n: int | None) -> Iterator[None]:
    """Cap torch and BLAS/OpenMP threads at ``n`` while any fit of this process holds the limit.

    Both are process-wide, so concurrent fits share one limit: the first to enter sets it, the last to
    leave restores what was there (later stages get all cores back). ``None`` leaves threads alone.
    """
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with _limits_lock:
        if _limits["depth"] == 0:
            _limits["torch"] = torch.get_num_threads()
            _limits["pools"] = threadpool_limits(limits=n)
            torch.set_num_threads(n)
        _limits["depth"] += 1
    try:
        yield
    finally:
        with _limits_lock:
            _limits["depth"] -= 1
            if _limits["depth"] == 0:
                torch.set_num_threads(_limits.pop("torch"))
                _limits.pop("pools").restore_original_limits()
