"""The training pipeline: validate -> clean -> split -> train -> fuse -> evaluate -> export -> report."""

from __future__ import annotations

from prefect import flow

import fuserec._env  # noqa: F401
from fuserec.config import Params, load_params
from fuserec.tasks.clean import clean
from fuserec.tasks.evaluate import evaluate
from fuserec.tasks.export import export
from fuserec.tasks.fuse import fuse
from fuserec.tasks.report import report
from fuserec.tasks.split import split
from fuserec.tasks.train import train
from fuserec.tasks.validate import validate


@flow(name="train-pipeline", log_prints=True)
def train_pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, str]:
    """Run every stage in order on the params (with ``--set``-style overrides); returns their outputs."""
    params: Params = load_params(params_file, overrides)
    return {
        "validate": validate(params),
        "clean": clean(params),
        "split": split(params),
        "train": train(params),
        "fuse": fuse(params),
        "evaluate": evaluate(params),
        "export": export(params),
        "report": report(params),
    }
