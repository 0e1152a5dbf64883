"""Train: every rater of ``rating.raters`` fitted on the whole training split, saved with a manifest.

These are the models the served graph is built from. What the fusers learn from (out-of-fold
predictions of refitted raters) is the fuse stage's work.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from fuserec.config import Params
from fuserec.layout import Layout
from fuserec.manifest import file_sha256, write_manifest
from fuserec.rating import RatingAlgorithm, RatingSide
from fuserec.registry import RATERS_GROUP, get_rater, plugin_info
from fuserec.stages.rating.data import catalogue, rater_names


def make_rater(name: str, params: Params) -> RatingAlgorithm:
    """An unfitted rater with its ``raters.<name>`` config (``train.seed`` unless it sets its own)."""
    cls = get_rater(name)
    return cls(cls.Config.model_validate({"seed": params.train.seed, **params.rater_config(name)}))


def fit_rater(
    name: str,
    params: Params,
    train: pd.DataFrame,
    n_users: int,
    n_items: int,
    side: RatingSide,
    out: Path,
    data_sha256: str = "",
) -> RatingAlgorithm:
    """Fit ``name`` on ``train``; save it (``config.json``, ``state.npz``, ``manifest.json``) in ``out``."""
    rater = make_rater(name, params)
    start = time.perf_counter()
    rater.fit(train, n_users, n_items, side)
    seconds = time.perf_counter() - start
    if out.exists():
        shutil.rmtree(out)
    rater.save(out)
    info = plugin_info(name, RATERS_GROUP)
    write_manifest(
        out,
        kind="rater",
        task="rating",
        name=name,
        entry_point=info.target,
        distribution=info.distribution,
        version=info.version,
        api_version=info.api_version,
        config=rater.config.model_dump(mode="json"),
        data_sha256=data_sha256,
        fit_seconds=round(seconds, 3),
    )
    return rater


def train(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    path = layout.split_file("train")
    frame = pd.read_parquet(path)
    cat = catalogue(layout)
    if layout.models.exists():
        shutil.rmtree(layout.models)
    for name in rater_names(params):
        out = layout.model(name)
        fit_rater(name, params, frame, cat.n_users, cat.n_items, cat.side, out, file_sha256(path))
    if layout.inner_models.exists():  # the ranking task's train' fits: none in this task
        shutil.rmtree(layout.inner_models)
    layout.inner_models.mkdir(parents=True)
    return str(layout.models)
