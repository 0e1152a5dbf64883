"""Fuse: learn every fuser on the validation carve, never on test; score every candidate for export there.

The train stage also fits every fused component on train' (``inner_models/``, same plugins and settings);
each fuser learns from their scores of validation users, and only the combination is saved. At evaluation and
export a fuser is bound to the models the train stage fitted on full train, so test is scored once
through the same arithmetic that was learned.

The stage also writes ``selection.json``: each fitted fuser's and each train' model's ``tune.metric`` on
validation users it was not fitted on (:mod:`fuserec.selection`), and the best of them, which
``export.algorithm: auto`` serves.
"""

from __future__ import annotations

import logging
import shutil
import time
from functools import partial
from typing import Any

import pandas as pd

from fuserec.api import Algorithm
from fuserec.artifacts import load_algorithm, trained_models
from fuserec.config import Params
from fuserec.data.dataset import Dataset
from fuserec.fusion import Fuser, FuserConfig
from fuserec.layout import Layout
from fuserec.manifest import file_sha256, read_json, write_json, write_manifest
from fuserec.memory import release_freed_memory
from fuserec.registry import FUSERS_GROUP, get_fuser, plugin_info, resolve_names
from fuserec.selection import FittedFuser, parse_metric, select
from fuserec.stages.train import fused_components

log = logging.getLogger(__name__)


def component_names(params: Params, layout: Layout) -> list[str]:
    """The algorithms to fuse: ``fuse.components``, each of which the train stage must have fitted."""
    return fused_components(params, [p.name for p in trained_models(layout)])


def load_inner_models(names: list[str], layout: Layout, data_sha256: str) -> dict[str, Algorithm]:
    """The train stage's fits on train' of ``names``; refuses missing ones and fits of other data."""
    fitted: dict[str, Algorithm] = {}
    for name in names:
        folder = layout.inner_model(name)
        if not (folder / "manifest.json").exists():
            raise FileNotFoundError(
                f"{folder}: no fit of {name!r} on train', which the fuse stage learns from. To fix: run "
                "the train stage first (`fuserec stage train`, `dvc repro train` or `fuserec run`)"
            )
        manifest: dict[str, Any] = read_json(folder / "manifest.json")
        if manifest["data_sha256"] != data_sha256:
            raise ValueError(
                f"{folder} was fitted on another train' than outputs/split has now (data_sha256 differs). "
                "To fix: run the train stage again after the split stage"
            )
        fitted[name] = load_algorithm(folder)
    return fitted


def fusion_inputs(layout: Layout, names: list[str]) -> tuple[Dataset, pd.DataFrame, dict[str, Algorithm]]:
    """What a fuser learns from: train' (a ``Dataset``), the validation truth, train' fits of ``names``."""
    inner_file = layout.split_file("train_inner")
    inner = Dataset.load(layout.clean, interactions=inner_file)
    valid = pd.read_parquet(layout.split_file("valid"))
    return inner, valid, load_inner_models(names, layout, file_sha256(inner_file))


def fuse(params: Params) -> str:
    if params.task == "rating":  # the rating task's fuse: same folders, its own content
        from fuserec.stages.rating.fuse import fuse as rating_fuse

        return rating_fuse(params)
    layout = Layout(params.outputs_dir)
    names = resolve_names(params.fuse.fusers, FUSERS_GROUP)
    parse_metric(params.tune.metric)  # a bad metric fails before the fits, not after them
    if layout.fusers.exists():
        shutil.rmtree(layout.fusers)  # fusers of a previous run must not outlive their components
    layout.fusers.mkdir(parents=True)
    layout.selection.unlink(missing_ok=True)  # nor a choice among them
    clash = sorted(set(names) & {p.name for p in trained_models(layout)})
    if clash:
        raise ValueError(f"fusers and algorithms share the names {clash}; metrics would mix them up")
    components = component_names(params, layout)
    trained = [p.name for p in trained_models(layout)]
    left_out = {
        name: "no fit on train' (not in fuse.components), so no validation score"
        for name in trained
        if name not in components
    }
    if not components:
        write_json(layout.selection, select(params.tune.metric, *_no_inputs(layout), {}, [], left_out, 0))
        return str(layout.fusers)
    inner, valid, fitted = fusion_inputs(layout, components)
    candidates: list[FittedFuser] = []
    inner_sha256 = file_sha256(layout.split_file("train_inner"))
    train = Dataset.load(layout.clean, interactions=layout.split_file("train"))
    components_s = sum(read_json(layout.inner_model(n) / "manifest.json")["fit_seconds"] for n in components)
    for name in names:
        cls = get_fuser(name)
        config = cls.Config.model_validate({"seed": params.train.seed, **params.fuser_config(name)})
        start = time.perf_counter()
        fuser = cls(config).fit(fitted, inner, valid)
        fuser.observe(train)  # test-time item statistics come from the data the bound models saw
        seconds = time.perf_counter() - start
        folder = fuser.save(layout.fuser(name))
        kept = fuser._check_fitted_names()
        info = plugin_info(name, FUSERS_GROUP)
        write_manifest(
            folder,
            kind="fuser",
            name=name,
            entry_point=info.target,
            distribution=info.distribution,
            version=info.version,
            api_version=info.api_version,
            config=config.model_dump(mode="json"),
            components=kept,
            served_alone=fuser.served_alone,  # the component served instead, when the fuser fell back
            dropped_components=[n for n in components if n not in kept],  # e.g. pruned by stacking
            data_sha256=inner_sha256,
            components_fit_seconds=round(components_s, 3),
            fit_seconds=round(seconds, 3),
        )
        if fuser.served_alone is not None:
            log.warning(
                "fuser %s did not beat %s on held-out validation users; it serves %s alone (set "
                "fusers.%s.fallback: false to serve the combination anyway)",
                name,
                fuser.served_alone,
                fuser.served_alone,
                name,
            )
        refit = partial(_refit, cls, config, fitted, inner)
        candidates.append(FittedFuser(name, fuser.held_out_, fuser.served_alone, refit))
        del fuser
        release_freed_memory()  # the last fuser's freed arrays must not sit under the next one's peak
    start = time.perf_counter()
    record = select(params.tune.metric, inner, valid, fitted, candidates, left_out, params.train.seed)
    write_json(layout.selection, record | {"seconds": round(time.perf_counter() - start, 3)})
    log.info("on validation %s, the best candidate for export is %s", params.tune.metric, record["chosen"])
    return str(layout.fusers)


def _refit(
    cls: type[Fuser], config: FuserConfig, fitted: dict[str, Algorithm], inner: Dataset, truth: pd.DataFrame
) -> Fuser:
    """A fresh fit of the same fuser and settings on ``truth`` (some of the validation users)."""
    return cls(config).fit(fitted, inner, truth)


def _no_inputs(layout: Layout) -> tuple[Dataset, pd.DataFrame]:
    """train' and the validation truth, for a choice with no fused component (no candidate)."""
    inner = Dataset.load(layout.clean, interactions=layout.split_file("train_inner"))
    return inner, pd.read_parquet(layout.split_file("valid"))
