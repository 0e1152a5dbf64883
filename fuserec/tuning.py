"""``fuserec tune``: search each plugin's declared ``search_space`` on the validation carve only.

Every trial fits on train' and scores the validation carve; test is never read. The best setting is
written into ``configs/datasets/<data.source>.yaml`` so that ``fuserec run`` refits it on full train and
scores test once; every trial is recorded in ``outputs/tuning/<plugin>.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from fuserec.api import Algorithm, Choice, FloatRange, IntRange, SearchDim
from fuserec.config import DATASET_SETTINGS_DIR, Params
from fuserec.evaluation import CarveData, load_carve, score_config
from fuserec.layout import Layout
from fuserec.manifest import write_json
from fuserec.registry import get_algorithm, resolve_names

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


def tune_algorithm(
    cls: type[Algorithm], base: dict[str, Any], carve: CarveData, params: Params
) -> dict[str, Any]:
    """Search ``cls.Config.search_space`` (starting from ``base``); returns the record of the search."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = cls.Config.search_space
    metric = params.tune.metric
    k = int(metric.split("@")[1])
    trials: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        config = {**base, **{name: suggest(trial, name, dim) for name, dim in space.items()}}
        start = time.perf_counter()
        metrics, _ = score_config(cls, config, carve, [k])
        trials.append({"config": config, metric: metrics[metric], "seconds": time.perf_counter() - start})
        return metrics[metric]

    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=params.train.seed)
    )
    current = cls.Config.model_validate(base).model_dump()
    study.enqueue_trial({name: current[name] for name in space})  # the current setting is trial 0
    n_trials = params.tune.n_trials if space else 1
    study.optimize(objective, n_trials=n_trials, timeout=params.tune.timeout_s)
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


def tune(params: Params, settings_dir: Path = DATASET_SETTINGS_DIR) -> dict[str, dict[str, Any]]:
    """Tune every plugin ``tune.algorithms`` names; needs the validate, clean and split outputs."""
    layout = Layout(params.outputs_dir)
    carve = load_carve(layout.root, "validation")
    settings_file = settings_dir / f"{params.data.source}.yaml"
    records = {}
    for name in resolve_names(params.tune.algorithms):
        cls = get_algorithm(name)
        base = {"seed": params.train.seed, **params.algorithm_config(name)}
        record = tune_algorithm(cls, base, carve, params)
        write_json(layout.root / "tuning" / f"{name}.json", record)
        write_settings(settings_file, name, record["best"])
        records[name] = record
    return records
