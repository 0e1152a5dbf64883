"""The stages as the Prefect flow runs them: cached across runs, and the train stage fanned out.

What each stage reads (files, params) and writes comes from the stage table (:mod:`fuserec.stages.table`);
the key is built by :mod:`fuserec.caching`. Results go to ``cache.dir`` (default ``<outputs>/.cache``),
never to the Prefect home, so a cache lives and travels with the outputs it vouches for. Only
``fuserec run`` uses this module: ``fuserec stage`` (and so DVC) calls the plain stage functions.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prefect import Task, flow
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem
from prefect.futures import wait
from prefect.logging import get_run_logger
from prefect.results import ResultStore
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fuserec.caching import StageSpec, cache_key, outputs_intact, write_record
from fuserec.config import Params, TrainConfig
from fuserec.data.dataset import ITEMS_FILE, USERS_FILE
from fuserec.flows.retries import with_io_retries
from fuserec.layout import Layout
from fuserec.manifest import read_json
from fuserec.registry import (
    ALGORITHMS_GROUP,
    FUSERS_GROUP,
    RATERS_GROUP,
    RATING_FUSERS_GROUP,
    plugin_info,
    resolve_names,
)
from fuserec.stages.table import Stage, param_value
from fuserec.stages.table import stage as table_stage
from fuserec.stages.train import CARVES, limited_threads, threads_per_fit, training_jobs
from fuserec.tasks.train import train_plugin

logger = logging.getLogger(__name__)
JOURNAL_FILE = "journal.jsonl"
IO_STAGES = ("validate",)  # reads the data source (a network mount, an export being rewritten)

# --------------------------------------------------------------------------------------------------
# What each stage reads and writes: the stage table, per plugin for train


def _dump(section: Any) -> Any:
    return section.model_dump(mode="json", by_alias=True)


def _code(
    algorithms: Sequence[str] = (),
    fusers: Sequence[str] = (),
    raters: Sequence[str] = (),
    rating_fusers: Sequence[str] = (),
) -> dict[str, str]:
    """``distribution==version`` of fuserec (the stage's own code) and of every plugin the stage runs."""
    try:
        own = f"fuserec=={version('fuserec')}"
    except PackageNotFoundError:  # a source tree that was never installed
        own = "fuserec==unknown"
    code = {"fuserec": own}
    groups = (
        ("algorithms", ALGORITHMS_GROUP, algorithms),
        ("fusers", FUSERS_GROUP, fusers),
        ("raters", RATERS_GROUP, raters),
        ("rating_fusers", RATING_FUSERS_GROUP, rating_fusers),
    )
    for label, group, names in groups:
        for name in names:
            info = plugin_info(name, group)
            code[f"{label}.{name}"] = f"{info.distribution}=={info.version}"
    return code


def _rating_code(params: Params) -> dict[str, str]:
    """The rating task's stages after split run its raters and rating fusers (``rating`` section)."""
    return _code(
        raters=resolve_names(params.rating.raters, RATERS_GROUP),
        rating_fusers=resolve_names(params.rating.fusers, RATING_FUSERS_GROUP),
    )


def _manifest_names(folder: Path) -> list[str]:
    """Names in the manifests of a models/ or fusers/ folder (what evaluate and export will load)."""
    if not folder.is_dir():
        return []
    return sorted(
        read_json(p / "manifest.json")["name"] for p in folder.iterdir() if (p / "manifest.json").exists()
    )


def _declared(decl: Stage, params: Params, root: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """A stage's declared inputs (label -> path) and params (dotted key -> value) under ``params``."""
    raw = params.model_dump(mode="json", by_alias=True)
    inputs = {label: root / label for label in decl.inputs}
    return inputs, {key: param_value(raw, key) for key in decl.params}


def stage_spec(stage: str, params: Params, plugin: str | None = None, carve: str = "train") -> StageSpec:
    """What ``stage`` (``train-plugin`` with ``plugin`` and ``carve``) reads and writes under ``params``.

    Everything comes from the stage table (:mod:`fuserec.stages.table`), which dvc.yaml is generated from.
    Refinements that only a cache per run can make: the validate stage also hashes the raw files
    ``data.source`` names and keys on its privacy plan (the pseudonym key's fingerprint, the user
    attributes kept), and the train stage is keyed per plugin and carve (one plugin's config change
    refits that plugin only); the codes are those of the plugins the stage runs.
    """
    root = Layout(params.outputs_dir).root
    if stage == "train-plugin":
        if plugin is None:
            raise ValueError("stage_spec('train-plugin') needs the plugin's name")
        if carve not in CARVES:
            raise ValueError(f"carve must be one of {CARVES}, not {carve!r}")
        # the train stage's declaration narrowed to one fit: its data, seed and config
        inputs = {
            f"clean/{ITEMS_FILE}": root / "clean" / ITEMS_FILE,
            f"clean/{USERS_FILE}": root / "clean" / USERS_FILE,
            f"split/{carve}": Layout(root).split_file(carve),
        }
        read = {"train.seed": params.train.seed, f"algorithms.{plugin}": params.algorithm_config(plugin)}
        outputs: tuple[str, ...] = (f"inner_models/{plugin}",)
        if carve == "train":
            outputs = (f"models/{plugin}", f"curves/{plugin}.csv")
        return StageSpec(f"{carve}[{plugin}]", inputs, read, _code([plugin]), outputs, root)
    decl = table_stage(stage)
    inputs, read = _declared(decl, params, root)
    code = _code()
    if stage == "validate":
        from fuserec.privacy.plan import PrivacyPlan

        # the key's fingerprint and the attributes the plugins declare decide the outputs too
        read |= PrivacyPlan.from_params(params).cache_fields()
    if stage == "validate" and params.data.source != "synthetic":
        from fuserec.data.sources import source_path

        inputs["data"] = source_path(params.data)
    elif params.task == "rating" and stage in ("train", "fuse", "evaluate", "export", "report"):
        code = _rating_code(params)
    elif stage == "fuse":
        fusers = resolve_names(params.fuse.fusers, FUSERS_GROUP)
        code = _code(_manifest_names(root / "inner_models"), fusers)
    elif stage in ("evaluate", "export", "report"):
        code = _code(_manifest_names(root / "models"), _manifest_names(root / "fusers"))
    return StageSpec(stage, inputs, read, code, decl.output_paths, root)


# --------------------------------------------------------------------------------------------------
# Prefect glue: key function, result storage, record + journal hook


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The task run's Prefect logger (shown with the run), or this module's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


_pending: dict[Any, tuple[str, StageSpec, Path]] = {}  # task run id -> (key, spec, cache dir)
_journal_lock = threading.Lock()


def result_storage(cache_dir: Path) -> Path:
    """Where Prefect keeps stage results: a path (Prefect makes it a LocalFileSystem), no saved block."""
    return (cache_dir / "results").resolve()


def stage_cache_key(ctx: TaskRunContext, inputs: dict[str, Any], *, stage: str) -> str | None:
    """The stage's key when its recorded outputs are intact; ``None`` (run, do not reuse) when a result
    is stored under the key but the files it stands for were changed or deleted since."""
    params: Params = inputs["params"]
    spec = stage_spec(stage, params, inputs.get("name"), inputs.get("carve", "train"))
    key = cache_key(spec)
    cache_dir = params.cache_dir
    _pending[ctx.task_run.id] = (key, spec, cache_dir)
    if outputs_intact(cache_dir, key, spec.root):
        return key
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(result_storage(cache_dir))))
    if store.exists(key):
        _run_logger().warning(
            "%s: outputs changed or deleted since they were cached; recomputing", spec.stage
        )
        return None
    return key


def _after_run(task: Task[..., Any], task_run: Any, state: Any) -> None:
    """On completion: note a fresh run's outputs under its key, and journal hit or miss."""
    key, spec, cache_dir = _pending.pop(task_run.id, (None, None, None))
    if key is None or spec is None or cache_dir is None:
        return
    if state.name != "Cached":
        write_record(cache_dir, key, spec)
    now = time.time()
    started = getattr(task_run, "start_time", None)  # when the task entered Running
    ran = state.name != "Cached" and started is not None
    entry = {
        "time": round(now, 3),
        "seconds": round(now - started.timestamp(), 3) if ran and started else None,  # None for a cache hit
        "flow_run": str(task_run.flow_run_id),
        "task": spec.stage,
        "state": state.name,
        "key": key,
        "pid": os.getpid(),  # which process ran it: a Dask worker's differs from the flow's
    }
    with _journal_lock, open(cache_dir / JOURNAL_FILE, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def _forget(task: Task[..., Any], task_run: Any, state: Any) -> None:
    """On failure: nothing to record (the next run recomputes); drop the pending key."""
    _pending.pop(task_run.id, None)


def read_journal(cache_dir: Path, flow_run: str | None = None) -> list[dict[str, Any]]:
    """Journal rows (``task``; ``state`` is ``Cached`` for a hit, else ``Completed``), of one run if given."""
    path = cache_dir / JOURNAL_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if flow_run is None or r["flow_run"] == flow_run]


def stage_task(stage: str, params: Params) -> Task[..., str]:
    """The stage's task for this run: cached under ``cache.dir`` unless ``cache.enabled`` is false."""
    base: Task[..., str] = (
        train_plugin
        if stage == "train-plugin"
        else getattr(importlib.import_module(f"fuserec.tasks.{stage}"), stage)
    )
    if stage in IO_STAGES:
        base = with_io_retries(base, params.retries)
    if not params.cache.enabled:
        return base.with_options(cache_policy=NO_CACHE, persist_result=False)
    cache_dir = params.cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    return base.with_options(
        cache_policy=CacheKeyFnPolicy(cache_key_fn=partial(stage_cache_key, stage=stage)),
        persist_result=True,
        result_storage=result_storage(cache_dir),
        result_serializer="json",
        refresh_cache=params.cache.refresh,
        on_completion=[_after_run],
        on_failure=[_forget],
    )


# --------------------------------------------------------------------------------------------------
# The train stage, one task per plugin through a task runner


def make_task_runner(cfg: TrainConfig) -> TaskRunner[Any]:
    """Threads by default; Dask (a LocalCluster of ``workers`` processes, or ``dask_address``) on request."""
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError as exc:
        raise RuntimeError(
            "train.task_runner is dask but prefect-dask is not installed; run "
            "`pip install 'fuserec[dask]'` or set train.task_runner: threads"
        ) from exc
    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,  # no web server (and no bokeh needed)
        }
    )


@flow(name="train")
def train_plugins(params: Params) -> str:
    """Fit every requested plugin on train (and the fused ones on train') as its own task,
    ``train.workers`` at a time; fails if any fit fails."""
    jobs = training_jobs(params)
    threads = threads_per_fit(params.train)
    task = stage_task("train-plugin", params)
    # Threads share this process: cap its torch/BLAS threads here. Dask workers cap their own.
    local = params.train.task_runner == "threads"
    with limited_threads(threads if local else None):
        futures = [task.submit(name, params, None if local else threads, carve) for carve, name in jobs]
        wait(futures)
        for future in futures:
            future.result()  # raises the first failure, naming its plugin in the task run name
    return str(Layout(params.outputs_dir).models)


def run_train(params: Params) -> str:
    """The train stage of the flow: :func:`train_plugins` as a subflow on the configured task runner."""
    return train_plugins.with_options(task_runner=make_task_runner(params.train))(params)


def run_stage(stage: str, params: Params) -> str:
    fan_out = stage == "train" and params.task == "ranking"  # the rating task fits its raters in one task
    runner: Callable[[Params], str] = run_train if fan_out else stage_task(stage, params)
    return runner(params)
