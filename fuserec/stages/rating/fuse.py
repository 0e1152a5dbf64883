"""Fuse: learn the rating fusers from out-of-fold predictions of the training ratings, choose what to serve.

:func:`fuserec.rating_fusion.fit_rating_ensemble` does the work (the benchmark calls the same function):
every rater is refitted ``rating.validation_folds`` times on the other folds of train and predicts the
held-out fold from each user's history there; the fusers learn on all of those rows; each candidate
(fuser or single rater) is scored on users the fusers were not fitted on, and the lowest RMSE is served
unless ``rating.export`` names one. The raters fitted by the train stage are the ensemble's components.

Writes ``fusers/<name>/`` (each fuser's config and arrays), ``fusers/ensemble.json`` and
``fusers/item_stats.npz`` (what assembles the ensemble again), ``fusers/out_of_fold.parquet`` (the rows
the fusers learned from, for analysts) and ``selection.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuserec.config import Params
from fuserec.layout import Layout
from fuserec.manifest import write_json
from fuserec.rating import RatingAlgorithm
from fuserec.rating_ensemble import RatingEnsemble
from fuserec.rating_fusion import fit_rating_ensemble
from fuserec.rating_meta import META_FEATURES, ItemStats
from fuserec.registry import RATING_FUSERS_GROUP, get_rater, get_rating_fuser, resolve_names
from fuserec.stages.rating.data import catalogue, rater_names

log = logging.getLogger(__name__)
ENSEMBLE_FILE = "ensemble.json"
STATS_FILE = "item_stats.npz"
OOF_FILE = "out_of_fold.parquet"


def fuser_names(params: Params) -> list[str]:
    return resolve_names(params.rating.fusers, RATING_FUSERS_GROUP)


def load_raters(layout: Layout, names: list[str]) -> dict[str, RatingAlgorithm]:
    """The train stage's raters (fitted on the whole training split), by name."""
    missing = [n for n in names if not (layout.model(n) / "manifest.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"raters {missing} have no fitted model under {layout.models}: run the train stage first "
            "(`fuserec stage train`)"
        )
    return {n: get_rater(n).load(layout.model(n)) for n in names}


def fuse(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    train = pd.read_parquet(layout.split_file("train"))
    cat = catalogue(layout)
    names = rater_names(params)
    fusers = fuser_names(params)
    raters = load_raters(layout, names)
    ensemble, report, oof = fit_rating_ensemble(
        train,
        cat.n_users,
        cat.n_items,
        {n: {"seed": params.train.seed, **params.rater_config(n)} for n in names},
        {n: {"seed": params.train.seed, **params.rating_fuser_config(n)} for n in fusers},
        folds=params.rating.validation_folds,
        seed=params.rating.seed,
        side=cat.side,
        choose=params.rating.export,
        fitted=raters,
        log=log.info,
    )
    if layout.fusers.exists():
        shutil.rmtree(layout.fusers)
    save_fusion(ensemble, layout.fusers)
    oof.to_parquet(layout.fusers / OOF_FILE, index=False)
    write_json(layout.selection, selection_record(report))
    return str(layout.fusers)


def selection_record(report: dict[str, Any]) -> dict[str, Any]:
    """``selection.json``: every candidate's validation RMSE, what was chosen and why."""
    ranking = report["selection"]["ranking"]
    return {
        "task": "rating",
        "metric": "rmse (lower is better)",
        "chosen": report["chosen"],
        "reason": report["reason"],
        "candidates": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in ranking},
        "validation": report["validation"],
        "learned": report["learned"],
        "seconds": report["seconds"],
    }


def save_fusion(ensemble: RatingEnsemble, folder: Path) -> None:
    """The ensemble minus its components (those are the train stage's ``models/``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, fuser in ensemble.fusers.items():
        fuser.save(folder / name)
    np.savez(folder / STATS_FILE, **ensemble.stats.state())  # type: ignore[arg-type]
    record = {
        "components": ensemble.names,
        "fusers": list(ensemble.fusers),
        "chosen": ensemble.chosen,
        "rating_range": list(ensemble.rating_range),
        "meta_features": list(META_FEATURES),
    }
    (folder / ENSEMBLE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_fusion(layout: Layout) -> RatingEnsemble:
    """The fitted ensemble: the train stage's raters, the fuse stage's fusers and item statistics."""
    path = layout.fusers / ENSEMBLE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the fuse stage first (`fuserec stage fuse`)")
    record = json.loads(path.read_text())
    if list(record["meta_features"]) != list(META_FEATURES):
        raise ValueError(f"{path} was written with meta-features {record['meta_features']}: run fuse again")
    components = load_raters(layout, list(record["components"]))
    fusers = {n: get_rating_fuser(n).load(layout.fuser(n)) for n in record["fusers"]}
    with np.load(layout.fusers / STATS_FILE, allow_pickle=False) as npz:
        stats = ItemStats.from_state({k: npz[k] for k in npz.files})
    low, high = record["rating_range"]
    return RatingEnsemble(components, stats, fusers, record["chosen"], (float(low), float(high)))
