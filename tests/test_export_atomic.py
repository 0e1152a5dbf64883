"""Atomic folder replacement: a failed export leaves the previous model as it was; a good one replaces it.

``fuserec.atomic.replace_dir`` on its own (no target yet, a target replaced, the old content gone, the
two-rename fallback and its undo), then the export stage on a tiny synthetic run (popularity only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fuserec import atomic
from fuserec.atomic import exchange, point_symlink, remove_stale_staging, replace_dir, staging_path
from fuserec.config import Params, load_params
from fuserec.manifest import file_sha256, read_json

from .conftest import SMALL, write_params


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def dead_pid() -> int:
    """The id of a process that has just ended (so no process has it for now)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- replace_dir ----------------------------------------------------------------------------------------


def test_replace_dir_with_no_target_renames(tmp_path: Path) -> None:
    staging = make(tmp_path / ".model-staging", {"a.txt": "new", "sub/b.txt": "new b"})
    replace_dir(staging, tmp_path / "model")
    assert snapshot(tmp_path / "model") == {"a.txt": b"new", "sub/b.txt": b"new b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_dir_replaces_the_whole_target_and_deletes_the_old_content(tmp_path: Path) -> None:
    make(tmp_path / "model", {"a.txt": "old", "only_old.txt": "old", "sub/b.txt": "old b"})
    staging = make(tmp_path / ".model-staging", {"a.txt": "new", "sub/c.txt": "new c"})
    replace_dir(staging, tmp_path / "model")
    # not merged: a file only the old version had is gone too
    assert snapshot(tmp_path / "model") == {"a.txt": b"new", "sub/c.txt": b"new c"}
    # the old content went away with the staging name: nothing else is left beside the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(atomic._RENAMEAT2 is None, reason="no renameat2 here (not Linux/glibc)")
def test_replace_dir_exchanges_in_one_step_where_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With renameat2 the target is never renamed away (no moment without it)."""
    make(tmp_path / "a", {"x": "a"})
    make(tmp_path / "b", {"x": "b"})
    assert exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"
    make(tmp_path / "model", {"x": "old"})
    staging = make(tmp_path / "staging", {"x": "new"})
    renames: list[tuple[str, str]] = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((str(a), str(b))), real_rename(a, b)))
    replace_dir(staging, tmp_path / "model")
    assert renames == [] and (tmp_path / "model" / "x").read_text() == "new"


def test_replace_dir_falls_back_to_two_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    make(tmp_path / "model", {"x": "old"})
    replace_dir(make(tmp_path / "staging", {"x": "new"}), tmp_path / "model")
    assert snapshot(tmp_path / "model") == {"x": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_fallback_puts_the_old_folder_back_when_the_second_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    make(tmp_path / "model", {"x": "old"})
    staging = make(tmp_path / "staging", {"x": "new"})
    real_rename = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(a) == staging:
            raise OSError("disk gone")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        replace_dir(staging, tmp_path / "model")
    assert snapshot(tmp_path / "model") == {"x": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "staging"]


def test_replace_dir_refuses_a_missing_staging_folder(tmp_path: Path) -> None:
    make(tmp_path / "model", {"x": "old"})
    with pytest.raises(NotADirectoryError):
        replace_dir(tmp_path / "nothing", tmp_path / "model")
    assert snapshot(tmp_path / "model") == {"x": b"old"}


def test_a_link_replaces_a_real_folder_and_point_symlink_moves_it(tmp_path: Path) -> None:
    make(tmp_path / "releases" / "one", {"x": "one"})
    make(tmp_path / "releases" / "two", {"x": "two"})
    make(tmp_path / "current", {"x": "legacy"})
    os.symlink("releases/one", tmp_path / ".link")
    replace_dir(tmp_path / ".link", tmp_path / "current")
    assert os.readlink(tmp_path / "current") == "releases/one"
    assert (tmp_path / "current" / "x").read_text() == "one"
    point_symlink(tmp_path / "current", "releases/two")
    assert os.readlink(tmp_path / "current") == "releases/two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "releases"]
    with pytest.raises(IsADirectoryError):
        point_symlink(tmp_path / "releases" / "one", "two")


def test_stale_staging_of_dead_processes_only_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "model"
    mine = make(staging_path(target), {"x": "mine"})
    stale = make(tmp_path / f".model-staging-{dead_pid()}", {"x": "stale"})
    assert remove_stale_staging(target) == [stale]
    assert mine.exists() and not stale.exists()


# -- the export stage -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """A tiny synthetic run trained up to export (popularity only), exported once."""
    from fuserec.tasks.clean import clean
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    root = tmp_path_factory.mktemp("export-atomic")
    sections = {
        **SMALL,
        "data": {"synthetic": {"n_interactions": 2000, "seed": 7}},
        "train": {"algorithms": ["popularity"]},
        "fuse": {"fusers": []},
        "export": {"algorithm": "popularity"},
    }
    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train):
        stage.fn(params)
    from fuserec.stages.export import export

    export(params)
    return params


def leftovers(params: Params) -> list[str]:
    return [p.name for p in params.outputs_dir.iterdir() if p.name.startswith(".model")]


def test_a_failed_parity_check_leaves_the_previous_model_untouched(
    run: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fuserec.stages import export as stage

    model = run.outputs_dir / "model"
    before = snapshot(model)
    real = stage.parity_check

    def disagreeing(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {**real(*args, **kwargs), "scores_match": False}

    monkeypatch.setattr(stage, "parity_check", disagreeing)
    with pytest.raises(RuntimeError, match="disagrees"):
        stage.export(run)
    assert snapshot(model) == before, "a failed export must leave the previous model byte-identical"
    assert leftovers(run) == []


def test_a_failed_onnx_export_leaves_the_previous_model_untouched(
    run: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fuserec.stages import export as stage

    model = run.outputs_dir / "model"
    before = snapshot(model)
    real = stage.export_onnx

    def half_written(algo: Any, path: Path, *args: Any, **kwargs: Any) -> Path:
        real(algo, path, *args, **kwargs)  # the graph is written, then something breaks
        raise OSError("disk full")

    monkeypatch.setattr(stage, "export_onnx", half_written)
    with pytest.raises(OSError, match="disk full"):
        stage.export(run)
    assert snapshot(model) == before
    assert leftovers(run) == []


def test_a_good_export_replaces_the_whole_folder(run: Params) -> None:
    from fuserec.stages.export import export

    model = run.outputs_dir / "model"
    (model / "stale.txt").write_text("from an older export")
    stale = make(run.outputs_dir / f".model-staging-{dead_pid()}", {"model.onnx": "killed half-way"})
    assert export(run) == str(model)
    assert not (model / "stale.txt").exists(), "the folder is replaced, not merged"
    assert not stale.exists() and leftovers(run) == []
    manifest = read_json(model / "manifest.json")
    assert manifest["sha256"] == file_sha256(model / "model.onnx")
    assert manifest["external_data"] is None and manifest["external_data_sha256"] is None
    assert {"model.onnx", "catalog.parquet", "users.parquet", "manifest.json"} <= set(snapshot(model))


def test_external_weights_end_up_beside_the_graph_and_load_from_there(
    run: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights stored outside the graph are named relative to it, so they survive the move into place."""
    import onnx

    from fuserec import onnx_model
    from fuserec.onnx_model import OnnxRecommender
    from fuserec.stages.export import export

    monkeypatch.setattr(onnx_model, "EXTERNAL_DATA_BYTES", 0)  # every export keeps its weights beside
    model = run.outputs_dir / "model"
    export(run)
    weights = model / "model.onnx.data"
    assert weights.exists() and leftovers(run) == []
    manifest = read_json(model / "manifest.json")
    assert manifest["external_data"] == "model.onnx.data"
    assert manifest["external_data_sha256"] == file_sha256(weights)
    graph = onnx.load(str(model / "model.onnx"), load_external_data=False)
    locations = {
        entry.value
        for tensor in graph.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}, "the weights file must be named relative to the graph"
    scores, items, _ = OnnxRecommender(model / "model.onnx").run(np.array([[0, 1, -1]], dtype=np.int64))
    assert scores.shape[0] == 1 and items.shape == (1, manifest["k"])
    monkeypatch.undo()
    export(run)  # back to one file: the previous export's weights file goes with the old folder
    assert not weights.exists() and read_json(model / "manifest.json")["external_data"] is None
