"""Score an algorithm on a carve of a split: validation (fit on train', score validation) or test.

``fuserec tune`` and the benchmarks use this, so every choice is made on validation and test is
scored once, through the same code as the evaluate stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from fuserec.api import Algorithm
from fuserec.data.dataset import Dataset
from fuserec.layout import Layout
from fuserec.tasks.evaluate import evaluate_model
from fuserec.tasks.split import SPLIT_FILES
from fuserec.tasks.train import seed_everything

Carve = Literal["validation", "test"]


@dataclass(frozen=True)
class CarveData:
    """What a model fits on and what it is scored against."""

    fit: Dataset
    truth: pd.DataFrame


def load_carve(outputs: str | Path, carve: Carve) -> CarveData:
    """``validation``: fit on train', truth = validation; ``test``: fit on train, truth = test."""
    layout = Layout(Path(outputs))
    fit_file, truth_file = ("train_inner", "valid") if carve == "validation" else ("train", "test")
    data = Dataset.load(layout.clean, interactions=layout.split / SPLIT_FILES[fit_file])
    return CarveData(data, pd.read_parquet(layout.split / SPLIT_FILES[truth_file]))


def score_config(
    cls: type[Algorithm],
    config: dict[str, Any],
    carve: CarveData,
    ks: list[int] | None = None,
    batch_size: int = 1024,
) -> tuple[dict[str, float], Algorithm]:
    """Fit ``cls(config)`` on the carve and return (metrics, fitted model)."""
    cfg = cls.Config.model_validate(config)
    seed_everything(cfg.seed)
    algo = cls(cfg).fit(carve.fit)
    return evaluate_model(algo, carve.fit, carve.truth, ks or [10], batch_size, segments=False), algo
