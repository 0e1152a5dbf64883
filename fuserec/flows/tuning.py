"""``fuserec tune`` as a Prefect flow: each trial is a task, ``train.workers`` at a time.

The trials of a plugin run on the train stage's task runner (``train.task_runner``: threads by default, a
Dask cluster when configured), in batches that optuna proposes together (:mod:`fuserec.tuning`). A trial
task takes the outputs path, not the data, so a Dask worker loads the validation carve itself (once per
process); the outputs folder must therefore be visible to every worker, as for the train stage.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.futures import wait

from fuserec.config import Params
from fuserec.evaluation import load_carve
from fuserec.flows.stages import make_task_runner
from fuserec.layout import Layout
from fuserec.registry import get_algorithm
from fuserec.splitting import Carve
from fuserec.stages.train import limited_threads, threads_per_fit
from fuserec.tuning import TrialRunner, run_trial, tune

_carves: dict[tuple[str, float], Carve] = {}
_carves_lock = threading.Lock()


def cached_validation_carve(outputs: str) -> Carve:
    """The validation carve of ``outputs``, loaded once per process (and again if the split changes)."""
    stamp = Layout(Path(outputs)).split_file("train_inner").stat().st_mtime
    with _carves_lock:
        key = (outputs, stamp)
        if key not in _carves:
            _carves.clear()
            _carves[key] = load_carve(outputs, "validation")
        return _carves[key]


@task(name="tune-trial", task_run_name="trial[{name}]")
def tune_trial(
    name: str, config: dict[str, Any], outputs: str, metric: str, threads: int | None = None
) -> tuple[float, float]:
    """Fit one setting of ``name`` on train' and score the validation carve."""
    with limited_threads(threads):
        return run_trial(get_algorithm(name), config, cached_validation_carve(outputs), metric)


def _runner(name: str, params: Params, threads: int | None) -> TrialRunner:
    def run(configs: list[dict[str, Any]]) -> list[tuple[float, float]]:
        outputs = str(params.outputs_dir)
        futures = [tune_trial.submit(name, c, outputs, params.tune.metric, threads) for c in configs]
        wait(futures)
        return [f.result() for f in futures]

    return run


@flow(name="tune")
def tune_trials(params: Params, settings_dir: str) -> dict[str, dict[str, Any]]:
    """Tune every plugin of ``tune.algorithms``, its trials ``train.workers`` at a time."""
    threads = threads_per_fit(params.train)
    local = params.train.task_runner == "threads"
    with limited_threads(threads if local else None):
        return tune(
            params,
            Path(settings_dir),
            runner_for=lambda name: _runner(name, params, None if local else threads),
            batch=params.train.workers,
        )


def run_tune(params: Params, settings_dir: Path) -> dict[str, dict[str, Any]]:
    """The tune flow on the configured task runner."""
    return tune_trials.with_options(task_runner=make_task_runner(params.train))(params, str(settings_dir))
