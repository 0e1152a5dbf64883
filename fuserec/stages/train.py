"""Train: fit every algorithm that ``train.algorithms`` names (found through the registry).

Each plugin is fitted on train (``models/``, what evaluate and export serve) and, when fusion uses it
(``fuse.components``), once more on train' (``inner_models/``, what fusers learn from on validation: the
fuse stage only loads them). ``train`` runs the fits one after another (``fuserec stage train``, so
``dvc repro``); the Prefect flow runs one :func:`train_plugin` task per plugin and carve instead,
concurrently and each with its own cache key (:mod:`fuserec.flows.stages`). Both write the same files: each
plugin is seeded from its own config, so the order and concurrency of the fits do not change what is
learned.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fuserec.api import Algorithm
from fuserec.artifacts import model_folder, seed_everything, trained_models
from fuserec.config import Params, TrainConfig
from fuserec.data.dataset import Dataset
from fuserec.layout import Layout
from fuserec.manifest import file_sha256, write_manifest
from fuserec.registry import get_algorithm, plugin_info, resolve_names

CARVES = ("train", "train_inner")  # what a plugin is fitted on: the full train split, or train'


def make_algorithm(name: str, params: Params) -> Algorithm:
    """An unfitted plugin with its params.yaml config (train.seed unless the plugin sets its own); seeded."""
    cls = get_algorithm(name)
    config = cls.Config.model_validate({"seed": params.train.seed, **params.algorithm_config(name)})
    seed_everything(config.seed)
    return cls(config)


def fit_algorithm(
    name: str, params: Params, data: Dataset, out_dir: Path, data_hash: str, curve: Path | None = None
) -> Path:
    """Fit one plugin with its params.yaml config and save it with a manifest (and its curve, if given)."""
    algo = make_algorithm(name, params)
    config = algo.config
    start = time.perf_counter()
    algo.fit(data)
    seconds = time.perf_counter() - start
    algo.save(out_dir)
    if curve is not None:
        write_training_log(algo, curve)
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


def fused_components(params: Params, trained: list[str]) -> list[str]:
    """The algorithms to fuse: ``fuse.components``, each of which the train stage must fit."""
    if params.fuse.components == "all":
        return list(trained)
    missing = [n for n in params.fuse.components if n not in trained]
    if missing:
        raise ValueError(
            f"fuse.components names {missing}, which the train stage does not fit (trained: {trained}). "
            "To fix: add them to train.algorithms, or remove them from fuse.components in params.yaml"
        )
    return list(params.fuse.components)


def training_jobs(params: Params) -> list[tuple[str, str]]:
    """``(carve, plugin)`` fits of the train stage: every plugin on train, the fused ones on train' too."""
    names = prepare_training(params)
    return [("train", n) for n in names] + [("train_inner", n) for n in fused_components(params, names)]


def prepare_training(params: Params) -> list[str]:
    """The plugins to fit; removes models and curves of plugins no longer requested."""
    layout = Layout(params.outputs_dir)
    names = resolve_names(params.train.algorithms)
    if not names:
        raise RuntimeError(
            "no algorithm plugin is installed; run `fuserec plugins` to see what failed to load"
        )
    inner = fused_components(params, names)
    # Models of plugins no longer requested must not linger into evaluation or fusion.
    for carve, wanted in (("train", names), ("train_inner", inner)):
        for stale in trained_models(layout, carve):
            if stale.name not in wanted:
                shutil.rmtree(stale)
    layout.curves.mkdir(parents=True, exist_ok=True)  # a DVC plots output: present even when empty
    layout.inner_models.mkdir(parents=True, exist_ok=True)  # a DVC output too, empty with no components
    for curve in layout.curves.glob("*.csv"):
        if curve.stem not in names:
            curve.unlink()
    return names


def fit_plugin(name: str, params: Params, carve: str, data: Dataset | None = None) -> Path:
    """Fit ``name`` on ``carve`` (loaded unless given) into its models/ or inner_models/ folder."""
    if carve not in CARVES:
        raise ValueError(f"carve must be one of {CARVES}, not {carve!r}")
    layout = Layout(params.outputs_dir)
    split_file = layout.split_file(carve)
    if data is None:
        data = Dataset.load(layout.clean, interactions=split_file)
    curve = layout.curves / f"{name}.csv" if carve == "train" else None  # DVC plots: the served fit's
    folder = model_folder(layout, name, carve)
    return fit_algorithm(name, params, data, folder, file_sha256(split_file), curve)


def train(params: Params) -> str:
    if params.task == "rating":  # the rating task's train: same folders, its own content
        from fuserec.stages.rating.train import train as rating_train

        return rating_train(params)
    layout = Layout(params.outputs_dir)
    jobs = training_jobs(params)
    for carve in CARVES:
        names = [name for c, name in jobs if c == carve]
        data = Dataset.load(layout.clean, interactions=layout.split_file(carve)) if names else None
        for name in names:
            fit_plugin(name, params, carve, data)
    return str(layout.models)


def train_plugin(name: str, params: Params, threads: int | None = None, carve: str = "train") -> str:
    """Fit one plugin on one carve (the flow runs a task each: its own cache key, run concurrently).

    Takes a name and the params, not a dataset, so that a Dask worker process can run it: it reads the
    split from ``params.outputs``, which must therefore be visible to every worker.
    """
    with limited_threads(threads):
        return str(fit_plugin(name, params, carve))


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
