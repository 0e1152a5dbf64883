"""``fuserec tune``: search each plugin's declared ``search_space`` on the validation carve only.

Every trial fits on train' and scores the validation carve; test is never read. The best setting is
written into ``<data.settings_dir>/<data.source>.yaml`` so that ``fuserec run`` refits it on full train and
scores test once; every trial is recorded in ``outputs/tuning/<plugin>.json``.

Trials run in batches: optuna asks for ``batch`` settings at once (TPE with a constant liar, so a batch
spreads out), a :data:`TrialRunner` scores them, and the results are told back in order. The plain runner
scores one after another; the ``fuserec tune`` flow (:mod:`fuserec.flows.tuning`) submits each trial as a
Prefect task on the train stage's task runner (threads, or Dask), ``train.workers`` at a time. With the
same batch size, the same trials are asked and told in the same order, so the search is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fuserec.api import Algorithm, Choice, FloatRange, IntRange, SearchDim
from fuserec.config import Params
from fuserec.evaluation import load_carve, score_config
from fuserec.layout import Layout
from fuserec.manifest import write_json
from fuserec.registry import get_algorithm, resolve_names
from fuserec.splitting import Carve

SETTINGS_HEADER = (
    "# Per-dataset settings, layered over params.yaml when data.source selects this file.\n"
    "# `fuserec tune` writes the algorithms section (chosen on the validation carve only).\n"
)


def suggest(trial: Any, name: str, dim: SearchDim) -> Any:
    if isinstance(dim, IntRange):
        return trial.suggest_int(name, dim.low, dim.high, log=dim.log)
    if isinstance(dim, FloatRange):
        return trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    if isinstance(dim, Choice):
        return trial.suggest_categorical(name, list(dim.values))
    raise TypeError(f"search_space entry {name!r} is {dim!r}; use IntRange, FloatRange or Choice")


# settings of one plugin -> (metric value, seconds) of each, in order
TrialRunner = Callable[[list[dict[str, Any]]], list[tuple[float, float]]]


def run_trial(cls: type[Algorithm], config: dict[str, Any], carve: Carve, metric: str) -> tuple[float, float]:
    """Fit ``config`` on train' and return its ``metric`` on the validation carve, and the seconds taken."""
    start = time.perf_counter()
    metrics, _ = score_config(cls, config, carve, [int(metric.split("@")[1])])
    return metrics[metric], time.perf_counter() - start


def tune_algorithm(
    cls: type[Algorithm],
    base: dict[str, Any],
    carve: Carve | None,
    params: Params,
    run_trials: TrialRunner | None = None,
    batch: int = 1,
) -> dict[str, Any]:
    """Search ``cls.Config.search_space`` (starting from ``base``); returns the record of the search.

    ``run_trials`` scores a batch of settings (default: one after another on ``carve``); ``batch`` is how
    many settings optuna proposes before it hears back.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = cls.Config.search_space
    metric = params.tune.metric
    if run_trials is None:
        if carve is None:
            raise ValueError("tune_algorithm needs the carve, or a run_trials that loads it")
        run_trials = lambda configs: [run_trial(cls, c, carve, metric) for c in configs]  # noqa: E731
    trials: list[dict[str, Any]] = []
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=params.train.seed, constant_liar=batch > 1),
    )
    current = cls.Config.model_validate(base).model_dump()
    study.enqueue_trial({name: current[name] for name in space})  # the current setting is trial 0
    n_trials = params.tune.n_trials if space else 1
    timeout = params.tune.timeout_s
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(trials) < n_trials and (deadline is None or time.monotonic() < deadline):
        asked = [study.ask() for _ in range(min(batch, n_trials - len(trials)))]
        configs = [{**base, **{name: suggest(t, name, dim) for name, dim in space.items()}} for t in asked]
        for trial, config, (value, seconds) in zip(asked, configs, run_trials(configs), strict=True):
            study.tell(trial, value)
            trials.append({"config": config, metric: value, "seconds": seconds})
    best = {**base, **study.best_params}
    return {
        "metric": metric,
        "carve": "validation",
        "best": best,
        "best_value": study.best_value,
        "trials": trials,
    }


def write_settings(settings_file: Path, name: str, best: dict[str, Any]) -> None:
    """Record ``best`` (minus the seed, which params.yaml owns) under ``algorithms.<name>``."""
    settings = yaml.safe_load(settings_file.read_text()) if settings_file.exists() else {}
    settings = settings or {}
    settings.setdefault("algorithms", {})[name] = {k: v for k, v in best.items() if k != "seed"}
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(SETTINGS_HEADER + yaml.safe_dump(settings, sort_keys=False))


def tune(
    params: Params,
    settings_dir: Path | None = None,
    runner_for: Callable[[str], TrialRunner] | None = None,
    batch: int = 1,
) -> dict[str, dict[str, Any]]:
    """Tune every plugin ``tune.algorithms`` names; needs the validate, clean and split outputs.

    ``runner_for(name)`` gives the :data:`TrialRunner` of a plugin (default: in this process, in turn).
    The best settings go to ``<settings_dir>/<data.source>.yaml`` (default: ``data.settings_dir``).
    """
    layout = Layout(params.outputs_dir)
    carve = None if runner_for else load_carve(layout.root, "validation")
    settings_file = (settings_dir or params.data.settings_path) / f"{params.data.source}.yaml"
    records = {}
    for name in resolve_names(params.tune.algorithms):
        cls = get_algorithm(name)
        base = {"seed": params.train.seed, **params.algorithm_config(name)}
        runner = runner_for(name) if runner_for else None
        record = tune_algorithm(cls, base, carve, params, runner, batch)
        write_json(layout.root / "tuning" / f"{name}.json", record)
        write_settings(settings_file, name, record["best"])
        records[name] = record
    return records


def experiment_params(records: dict[str, dict[str, Any]]) -> list[str]:
    """``algorithms.<plugin>.<key>=<value>`` for every tuned plugin's best setting (its seed left out)."""
    out = []
    for name, record in sorted(records.items()):
        for key, value in sorted(record["best"].items()):
            if key != "seed":
                text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
                out.append(f"algorithms.{name}.{key}={text}")
    return out


def record_experiment(records: dict[str, dict[str, Any]], name: str, cwd: Path) -> list[str]:
    """Run the DVC pipeline as experiment ``name`` with the best settings set: ``dvc exp run -S ...``.

    Why an experiment: the tuned settings then sit beside the metrics they produce on test, in
    ``dvc exp show``, and ``dvc exp apply`` (or ``dvc exp branch``) keeps the run that is wanted.
    Returns the command it ran; raises with DVC's own message when the run fails.
    """
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    dvc = bin_dir / "dvc"
    cmd = [str(dvc) if dvc.exists() else "dvc", "exp", "run", "--name", name]
    for item in experiment_params(records):
        cmd += ["--set-param", item]
    # dvc.yaml's commands call `fuserec`: the one running now, even from an environment not activated
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed in {cwd}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}\n"
            "To fix: run it from a git + DVC repository whose dvc.yaml is current (`fuserec dvc-yaml`)"
        )
    return cmd
