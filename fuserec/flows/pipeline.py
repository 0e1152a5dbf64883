"""The training pipeline: validate -> clean -> split -> train -> fuse -> export -> evaluate -> report.

Export comes before evaluate, which also scores the exported graph (``served`` in metrics.json).

Every stage is cached across runs (``cache`` in params.yaml, ``docs/how-to/scale-with-dask.md``) and the
train stage fits its plugins concurrently (``train.task_runner``); see :mod:`fuserec.flows.stages`.
"""

from __future__ import annotations

from prefect import flow

import fuserec.flows.environment  # noqa: F401
from fuserec.config import Params, load_params
from fuserec.flows.stages import run_stage

PIPELINE = ("validate", "clean", "split", "train", "fuse", "export", "evaluate", "report")


@flow(name="train-pipeline", log_prints=True)
def train_pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, str]:
    """Run every stage in order on the params (with ``--set``-style overrides); returns their outputs."""
    params: Params = load_params(params_file, overrides)
    return {stage: run_stage(stage, params) for stage in PIPELINE}
