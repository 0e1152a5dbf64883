"""Cache keys: what invalidates a stage's cache, and what must not; output records catch edited outputs."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fuserec.caching import (
    MISSING,
    StageSpec,
    cache_key,
    key_payload,
    outputs_intact,
    tree_hashes,
    write_record,
)
from fuserec.config import Params
from fuserec.layout import Layout
from fuserec.registry import PluginInfo


def _spec(folder: Path, **changes: object) -> StageSpec:
    base = StageSpec(
        "train[x]",
        inputs={"data": folder / "data"},
        params={"train.seed": 1, "algorithms.x": {"k": 5}},
        code={"algorithms.x": "dist==1.0"},
        outputs=("models/x", "curves/x.csv"),
        root=folder / "outputs",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.csv").write_text("1,2\n")
    (tmp_path / "data" / "sub" / "b.csv").write_text("3,4\n")
    return tmp_path


def test_key_follows_content_params_and_versions(project: Path) -> None:
    key = cache_key(_spec(project))
    assert len(key) == 64 and key == cache_key(_spec(project))
    # the same bytes elsewhere: same key (content, not location)
    shutil.copytree(project / "data", project / "copy")
    assert cache_key(_spec(project, inputs={"data": project / "copy"})) == key
    # each of the three ingredients changes the key
    assert cache_key(_spec(project, params={"train.seed": 1, "algorithms.x": {"k": 6}})) != key
    assert cache_key(_spec(project, code={"algorithms.x": "dist==1.1"})) != key
    (project / "data" / "sub" / "b.csv").write_text("3,5\n")
    assert cache_key(_spec(project)) != key
    # params order does not matter; outputs and root are not part of the key
    reordered = _spec(project, params={"algorithms.x": {"k": 5}, "train.seed": 1})
    assert cache_key(reordered) == cache_key(_spec(project))
    assert cache_key(_spec(project, root=project / "elsewhere", outputs=())) == cache_key(_spec(project))


def test_missing_input_is_part_of_the_key(project: Path) -> None:
    spec = _spec(project, inputs={"data": project / "nope"})
    assert key_payload(spec)["inputs"]["data"] == MISSING
    assert cache_key(spec) != cache_key(_spec(project))
    assert tree_hashes(project / "data" / "a.csv") == {"a.csv": tree_hashes(project / "data")["a.csv"]}


def test_unhashable_params_say_what_to_pass(project: Path) -> None:
    with pytest.raises(TypeError, match="plain JSON values"):
        cache_key(_spec(project, params={"x": object()}))


def test_record_catches_changed_deleted_and_unrecorded_outputs(project: Path) -> None:
    spec = _spec(project)
    model = spec.root / "models" / "x"
    model.mkdir(parents=True)
    (model / "state.npz").write_bytes(b"weights")
    key = cache_key(spec)
    assert not outputs_intact(project / "cache", key, spec.root)  # never recorded
    write_record(project / "cache", key, spec)  # curves/x.csv absent: only what exists is recorded
    assert outputs_intact(project / "cache", key, spec.root)
    (model / "state.npz").write_bytes(b"other!!")
    assert not outputs_intact(project / "cache", key, spec.root)
    (model / "state.npz").write_bytes(b"weights")
    assert outputs_intact(project / "cache", key, spec.root)
    (model / "state.npz").unlink()
    assert not outputs_intact(project / "cache", key, spec.root)


def test_an_empty_output_folder_is_recorded(project: Path) -> None:
    spec = _spec(project, outputs=("fusers",))
    (spec.root / "fusers").mkdir(parents=True)
    write_record(project / "cache", "k", spec)
    assert outputs_intact(project / "cache", "k", spec.root)
    (spec.root / "fusers").rmdir()
    assert not outputs_intact(project / "cache", "k", spec.root)


def _outputs_with_split(tmp_path: Path) -> Params:
    params = Params.model_validate({"outputs": str(tmp_path / "outputs")})
    layout = Layout(params.outputs_dir)
    for path in (
        layout.clean / "items.parquet",
        layout.clean / "users.parquet",
        layout.split / "train.parquet",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(path.name.encode())
    return params


def _with(params: Params, **sections: object) -> Params:
    from fuserec.config import _deep_merge

    return Params.model_validate(_deep_merge(params.model_dump(by_alias=True), sections))


def test_a_plugins_key_reads_only_its_own_config(tmp_path: Path) -> None:
    from fuserec.flows.stages import stage_spec

    params = _outputs_with_split(tmp_path)
    key = lambda p, name="itemknn": cache_key(stage_spec("train-plugin", p, name))  # noqa: E731
    base = key(params)
    # scheduling and other plugins' settings do not re-key itemknn
    same = _with(
        params,
        train={"task_runner": "dask", "workers": 1, "algorithms": ["itemknn"]},
        algorithms={"ease": {"l2": 1.0}},
        evaluate={"ks": [3]},
    )
    assert key(same) == base
    # its own config and the shared seed do
    assert key(_with(params, algorithms={"itemknn": {"k": 7}})) != base
    assert key(_with(params, train={"seed": 1})) != base
    assert key(params, "ease") != base
    inner = cache_key(stage_spec("train-plugin", params, "itemknn", "train_inner"))
    assert inner != base  # the fit on train' is its own task, keyed on train_inner.parquet
    # so does the training data
    (Layout(params.outputs_dir).split / "train.parquet").write_bytes(b"changed")
    assert key(params) != base


def test_a_new_plugin_version_re_keys_its_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fuserec.flows.stages as stages

    params = _outputs_with_split(tmp_path)
    before = cache_key(stages.stage_spec("train-plugin", params, "itemknn"))
    real = stages.plugin_info

    def bumped(name: str, group: str = "fuserec.algorithms") -> PluginInfo:
        info = real(name, group)
        return replace(info, version="99.0") if name == "itemknn" else info

    monkeypatch.setattr(stages, "plugin_info", bumped)
    assert cache_key(stages.stage_spec("train-plugin", params, "itemknn")) != before
    assert stages.stage_spec("train-plugin", params, "itemknn").code["algorithms.itemknn"].endswith("==99.0")


def test_dask_address_needs_the_dask_runner() -> None:
    with pytest.raises(ValueError, match="task_runner: dask"):
        Params.model_validate({"train": {"dask_address": "tcp://127.0.0.1:8786"}})
