"""The flow's cache across runs and its per-plugin, concurrent train stage (threads, Dask) on tiny data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fuserec.config import _deep_merge, load_params
from fuserec.layout import Layout
from fuserec.manifest import read_json

from .conftest import write_params

pytestmark = pytest.mark.integration

ALGORITHMS = ["popularity", "itemknn", "ease"]
TINY: dict[str, Any] = {
    "data": {"synthetic": {"n_interactions": 2000, "seed": 7}},
    "evaluate": {"ks": [5, 10], "rerank_diversity": [0.0, 0.5], "rerank_novelty": []},
    "train": {"algorithms": ALGORITHMS, "workers": 2},
    "fuse": {"fusers": ["borda"]},
    "export": {"algorithm": "popularity"},
}
UPSTREAM = ["validate", "clean", "split"]
DOWNSTREAM = ["fuse", "export", "evaluate", "report"]
TRAIN = [f"{carve}[{name}]" for carve in ("train", "train_inner") for name in ALGORITHMS]


def _run(params_file: Path, overrides: list[str] | None = None) -> dict[str, str]:
    """Run the whole flow; task name -> ``Cached`` (hit) or ``Completed`` (ran), read from the journal."""
    from fuserec.flows.pipeline import train_pipeline
    from fuserec.flows.stages import read_journal

    cache_dir = load_params(params_file, overrides).cache_dir
    seen = len(read_journal(cache_dir))
    train_pipeline(str(params_file), overrides)
    rows = read_journal(cache_dir)[seen:]
    for row in rows:  # a task that ran says how long it took (benchmarks/scale.py reads it)
        assert (row["seconds"] is not None and row["seconds"] >= 0) == (row["state"] == "Completed"), row
    states = {row["task"]: row["state"] for row in rows}
    assert len(states) == len(rows), f"a task ran twice in one run: {rows}"
    return states


def test_unchanged_reruns_hit_and_one_plugins_config_retrains_only_it(
    tmp_path: Path, prefect_harness: None
) -> None:
    params_file = write_params(tmp_path, **TINY)
    outputs = load_params(params_file).outputs_dir
    everything = [*UPSTREAM, *TRAIN, *DOWNSTREAM]

    first = _run(params_file)
    assert sorted(first) == sorted(everything) and set(first.values()) == {"Completed"}
    metrics = read_json(outputs / "metrics.json")
    assert (load_params(params_file).cache_dir / "results").is_dir()  # under outputs, not PREFECT_HOME

    assert _run(params_file) == dict.fromkeys(everything, "Cached")
    assert read_json(outputs / "metrics.json") == metrics

    changed = ["algorithms.ease.l2=50"]
    third = _run(params_file, changed)
    others = [t for t in TRAIN if "[ease]" not in t]
    assert third == {
        **dict.fromkeys([*UPSTREAM, *others], "Cached"),
        "train[ease]": "Completed",
        "train_inner[ease]": "Completed",  # fuse learns from the refitted ease; the others are loaded
        **dict.fromkeys(DOWNSTREAM, "Completed"),
    }
    for folder in ("models", "inner_models"):
        assert read_json(outputs / folder / "ease" / "manifest.json")["config"]["l2"] == 50
    assert read_json(outputs / "metrics.json")["models"]["itemknn"] == metrics["models"]["itemknn"]

    # A cached result stands for files: delete one and that plugin (only) is fitted again, then cached.
    (outputs / "models" / "itemknn" / "state.npz").unlink()
    fourth = _run(params_file, changed)
    assert fourth["train[itemknn]"] == "Completed" and (outputs / "models" / "itemknn" / "state.npz").exists()
    assert fourth["train[popularity]"] == fourth["train[ease]"] == "Cached"
    assert _run(params_file, changed) == dict.fromkeys(everything, "Cached")

    # A re-ranking setting is read by evaluate (the curve) and export (the graph): both recompute,
    # the report follows the new metrics, and nothing upstream of them runs.
    reranked = _run(params_file, [*changed, "export.rerank_keep=3"])
    assert reranked == {
        **dict.fromkeys([*UPSTREAM, *TRAIN, "fuse"], "Cached"),
        **dict.fromkeys(["evaluate", "export", "report"], "Completed"),
    }
    assert read_json(outputs / "metrics.json")["rerank"]["shape"]["keep"] == 3


def test_dask_workers_train_the_same_models_as_threads(tmp_path: Path, prefect_harness: None) -> None:
    from fuserec.flows.stages import read_journal, run_train
    from fuserec.tasks.clean import clean
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export
    from fuserec.tasks.split import split
    from fuserec.tasks.validate import validate

    runs = {}
    for runner in ("threads", "dask"):
        (tmp_path / runner).mkdir()
        sections = _deep_merge(TINY, {"train": {"task_runner": runner}})
        runs[runner] = load_params(write_params(tmp_path / runner, **sections))
    for stage in (validate, clean, split):
        stage.fn(runs["threads"])
    shutil.copytree(runs["threads"].outputs_dir, runs["dask"].outputs_dir)

    metrics = {}
    for runner, params in runs.items():
        run_train(params)
        export.fn(params)  # evaluate also scores the exported graph
        evaluate.fn(params)
        metrics[runner] = read_json(params.outputs_dir / "metrics.json")["models"]
        pids = {row["task"]: row["pid"] for row in read_journal(params.cache_dir)}
        assert sorted(pids) == sorted(TRAIN)
        # threads fit in this process; the LocalCluster's worker processes fit the Dask run
        in_here = {pid == os.getpid() for pid in pids.values()}
        assert in_here == ({True} if runner == "threads" else {False}), (runner, pids)

    assert set(metrics["dask"]) == set(ALGORITHMS)
    assert metrics["dask"] == metrics["threads"]
    for name in ALGORITHMS:
        a, b = (np.load(Layout(p.outputs_dir).model(name) / "state.npz") for p in runs.values())
        assert a.files == b.files
        for array in a.files:
            np.testing.assert_array_equal(a[array], b[array])
