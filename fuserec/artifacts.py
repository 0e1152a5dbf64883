"""Fitted models and fusers on disk: find them, load them through the registry, seed a fit.

Evaluation, export, the report and the service all load what the train and fuse stages wrote; they do it
here, through the manifest's plugin name, so none of them imports a stage to read an artifact.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuserec.api import Algorithm
from fuserec.config import AUTO, Params
from fuserec.fusion import Fuser
from fuserec.layout import Layout
from fuserec.manifest import read_json
from fuserec.registry import get_algorithm, get_fuser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_algorithm(folder: Path) -> Algorithm:
    """Load a trained plugin through the registry entry named in its manifest."""
    manifest = read_json(folder / "manifest.json")
    return get_algorithm(manifest["name"]).load(folder)


def trained_models(layout: Layout, carve: str = "train") -> list[Path]:
    """Model folders the train stage wrote for ``carve`` (those with a manifest), sorted by name."""
    folder = layout.models if carve == "train" else layout.inner_models
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if (p / "manifest.json").exists())


def model_folder(layout: Layout, name: str, carve: str) -> Path:
    return layout.model(name) if carve == "train" else layout.inner_model(name)


def fitted_fusers(layout: Layout) -> list[Path]:
    """Fuser folders the fuse stage wrote (those with a manifest), sorted by name."""
    if not layout.fusers.exists():
        return []
    return sorted(p for p in layout.fusers.iterdir() if (p / "manifest.json").exists())


def load_fuser(folder: Path, layout: Layout, models: Mapping[str, Any] | None = None) -> Fuser:
    """A saved fuser bound to the train stage's models (fitted on full train).

    ``models``: already loaded models to bind (by name), so several fusers can share them.
    """
    manifest = read_json(folder / "manifest.json")
    if models is None:
        models = {name: load_algorithm(layout.model(name)) for name in manifest["components"]}
    return get_fuser(manifest["name"]).load(folder, models)


def chosen_algorithm(params: Params, layout: Layout) -> str:
    """The scorer ``export.algorithm`` names: itself, or for ``auto`` the fuse stage's choice on validation.

    Every reader of ``export.algorithm`` (export, evaluate, promote) resolves it here, so ``auto`` means
    the same everywhere: the best candidate in ``selection.json`` (:mod:`fuserec.selection`).
    """
    name = params.export.algorithm
    if name != AUTO:
        return name
    if not layout.selection.exists():
        raise FileNotFoundError(
            f"export.algorithm is auto, chosen on validation by the fuse stage, but {layout.selection} is "
            "missing. To fix: run the fuse stage (`fuserec stage fuse`, `dvc repro fuse` or `fuserec run`), "
            "or set export.algorithm to a trained algorithm or fitted fuser"
        )
    record = read_json(layout.selection)
    if not record.get("chosen"):
        raise ValueError(
            f"export.algorithm is auto but {layout.selection} has no candidate (left out: "
            f"{record.get('left_out') or 'nothing was fitted'}). To fix: fuse at least one trained algorithm "
            "(fuse.components), or set export.algorithm to a trained algorithm or fitted fuser"
        )
    return str(record["chosen"])


def scorer_folder(layout: Layout, name: str) -> Path:
    """The folder of a trained model or of a fitted fuser called ``name``."""
    for folder in (layout.model(name), layout.fuser(name)):
        if (folder / "manifest.json").exists():
            return folder
    known = [p.name for p in trained_models(layout)] + [p.name for p in fitted_fusers(layout)]
    raise FileNotFoundError(
        f"export.algorithm is {name!r} but neither {layout.model(name)} nor {layout.fuser(name)} holds a "
        f"fitted model; add it to train.algorithms or fuse.fusers, or choose one of {sorted(known)}"
    )


def load_scorer(layout: Layout, folder: Path) -> Algorithm | Fuser:
    """A trained model, or a fitted fuser bound to the trained models."""
    if read_json(folder / "manifest.json").get("kind") == "fuser":
        return load_fuser(folder, layout)
    return load_algorithm(folder)
