"""Fuse: learn every fuser on the validation carve, never on test.

The components are refitted on train' (the same plugins and settings as the train stage), each fuser
learns from their scores of validation users, and only the combination is saved. At evaluation and
export a fuser is bound to the models the train stage fitted on full train, so test is scored once
through the same arithmetic that was learned.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
from prefect import task

from fuserec.api import Algorithm
from fuserec.config import Params
from fuserec.data.dataset import Dataset
from fuserec.fusion import Fuser
from fuserec.layout import Layout
from fuserec.manifest import file_sha256, read_json, write_manifest
from fuserec.registry import FUSERS_GROUP, get_fuser, plugin_info, resolve_names
from fuserec.tasks.split import SPLIT_FILES
from fuserec.tasks.train import load_algorithm, make_algorithm, trained_models


def component_names(params: Params, layout: Layout) -> list[str]:
    """The algorithms to fuse: ``fuse.components``, each of which the train stage must have fitted."""
    trained = [p.name for p in trained_models(layout)]
    if params.fuse.components == "all":
        return trained
    missing = [n for n in params.fuse.components if n not in trained]
    if missing:
        raise ValueError(
            f"fuse.components names {missing}, which the train stage did not fit (trained: {trained}). "
            "To fix: add them to train.algorithms, or remove them from fuse.components in params.yaml"
        )
    return list(params.fuse.components)


def fitted_fusers(layout: Layout) -> list[Path]:
    """Fuser folders the fuse stage wrote (those with a manifest), sorted by name."""
    if not layout.fusers.exists():
        return []
    return sorted(p for p in layout.fusers.iterdir() if (p / "manifest.json").exists())


def load_fuser(folder: Path, layout: Layout) -> Fuser:
    """A saved fuser bound to the train stage's models (fitted on full train)."""
    manifest = read_json(folder / "manifest.json")
    models = {name: load_algorithm(layout.model(name)) for name in manifest["components"]}
    return get_fuser(manifest["name"]).load(folder, models)


@task(name="fuse")
def fuse(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    names = resolve_names(params.fuse.fusers, FUSERS_GROUP)
    if layout.fusers.exists():
        shutil.rmtree(layout.fusers)  # fusers of a previous run must not outlive their components
    layout.fusers.mkdir(parents=True)
    clash = sorted(set(names) & {p.name for p in trained_models(layout)})
    if clash:
        raise ValueError(f"fusers and algorithms share the names {clash}; metrics would mix them up")
    components = component_names(params, layout)
    if not names or not components:
        return str(layout.fusers)
    inner_file = layout.split / SPLIT_FILES["train_inner"]
    inner = Dataset.load(layout.clean, interactions=inner_file)
    valid = pd.read_parquet(layout.split / SPLIT_FILES["valid"])
    train = Dataset.load(layout.clean, interactions=layout.split / SPLIT_FILES["train"])
    start = time.perf_counter()
    fitted: dict[str, Algorithm] = {name: make_algorithm(name, params).fit(inner) for name in components}
    components_s = time.perf_counter() - start
    for name in names:
        cls = get_fuser(name)
        config = cls.Config.model_validate({"seed": params.train.seed, **params.fuser_config(name)})
        start = time.perf_counter()
        fuser = cls(config).fit(fitted, inner, valid)
        fuser.observe(train)  # test-time item statistics come from the data the bound models saw
        seconds = time.perf_counter() - start
        folder = fuser.save(layout.fuser(name))
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
            components=fuser.names_,
            dropped_components=[n for n in components if n not in fuser.names_],  # e.g. pruned by stacking
            data_sha256=file_sha256(inner_file),
            components_fit_seconds=round(components_s, 3),
            fit_seconds=round(seconds, 3),
        )
    return str(layout.fusers)
