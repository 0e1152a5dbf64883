"""Shared fixtures. PREFECT_HOME points at a temp dir before Prefect is imported anywhere."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="fuserec-prefect-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Real sources pseudonymise user ids by default: every test (and its subprocesses) gets one fixed key,
# never a developer's own. Tests of the missing-key error unset it.
os.environ["FUSEREC_PSEUDONYM_KEY"] = "fuserec-test-pseudonym-key-0123456789abcdef"

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_ML100K = REPO.parent / "shared" / "data" / "ml-100k"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One ephemeral Prefect backend for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # 2 busy cores can need more than 30 s
        yield


@pytest.fixture(scope="session")
def ml100k() -> Path:
    if not (SHARED_ML100K / "u.data").exists():
        pytest.skip(f"MovieLens-100k not found at {SHARED_ML100K} (../shared is absent; CI always has it)")
    return SHARED_ML100K


def write_params(folder: Path, **sections: dict) -> Path:
    """A params.yaml in ``folder``: the repo's, with ``sections`` merged in and outputs under ``folder``."""
    from fuserec.config import _deep_merge

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = _deep_merge(raw, {"outputs": str(folder / "outputs"), **sections})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# Trainable plugins get a couple of epochs: these runs check the plumbing, not quality.
FEW_EPOCHS = {name: {"max_epochs": 2} for name in ("multvae", "sasrec", "twotower", "kg")} | {
    "bpr": {"epochs": 3}
}
SMALL = {
    "data": {"synthetic": {"n_interactions": 4000, "seed": 7}},
    "evaluate": {"ks": [5, 10]},
    "algorithms": FEW_EPOCHS,
    "fusers": {"weighted": {"n_trials": 20}},
}


@pytest.fixture
def small_params(tmp_path: Path):
    """Params for a small synthetic run, outputs in tmp_path."""
    from fuserec.config import load_params

    return load_params(write_params(tmp_path, **SMALL))


@pytest.fixture(scope="session")
def serving_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (synthetic data) whose exported model is a stacking fuser: it reads last_time."""
    from fuserec.tasks.clean import clean
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export
    from fuserec.tasks.fuse import fuse
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    root = tmp_path_factory.mktemp("serving")
    sections = {
        **SMALL,
        "train": {"algorithms": ["popularity", "itemknn", "content", "als"]},
        "fuse": {"fusers": ["stacking"], "components": ["popularity", "itemknn", "content", "als"]},
        "fusers": {"stacking": {"n_estimators": 40, "folds": 3, "min_child_samples": 10}},
        "export": {"algorithm": "stacking"},
    }
    from fuserec.config import load_params

    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train, fuse, export, evaluate):
        stage.fn(params)
    return params.outputs_dir


# A small run of the rating task (task: rating): every built-in rater, neural small, a blend served.
RATING_RATERS = ["baseline", "svd", "knn_baseline", "neural"]
RATING = {
    "task": "rating",
    "data": {"synthetic": {"n_interactions": 5000, "seed": 3}},
    "rating": {"raters": RATING_RATERS, "validation_folds": 3, "export": "blend"},
    "raters": {"svd": {"factors": 8, "epochs": 8}, "neural": {"dim": 8, "hidden": 8, "max_epochs": 3}},
}


@pytest.fixture(scope="session")
def rating_run(tmp_path_factory: pytest.TempPathFactory):
    """Params of a finished rating-task run (stage functions, as dvc repro calls them)."""
    import importlib

    from fuserec.config import load_params

    params = load_params(write_params(tmp_path_factory.mktemp("rating-run"), **RATING))
    for name in ("validate", "clean", "split", "train", "fuse", "export", "evaluate", "report"):
        getattr(importlib.import_module(f"fuserec.stages.{name}"), name)(params)
    return params
