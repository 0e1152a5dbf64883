import os
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import BaseModel, ValidationError

import fuserec
from fuserec.config import (
    DATASET_SETTINGS_DIR,
    MissingDatasetSettingsWarning,
    Params,
    PluginSettingsError,
    apply_overrides,
    check_plugin_settings,
    load_params,
    parse_override,
)
from fuserec.registry import ALGORITHMS_GROUP, FUSERS_GROUP, available

from .conftest import REPO, write_params
from .plugin_fixtures import install_broken_plugins, on_path


def test_repo_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.evaluate.ks == [5, 10, 20]


def test_override_parses_yaml_values() -> None:
    assert parse_override("evaluate.ks=[1, 2]") == (["evaluate", "ks"], [1, 2])
    assert parse_override("data.path=../x") == (["data", "path"], "../x")
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=true", "d.e=3"])
    assert raw == {"a": {"b": 1, "c": True}, "d": {"e": 3}}


def test_override_without_equals_says_how() -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("data.source")


def test_dataset_settings_layer_over_params_and_overrides_win(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    ml = load_params(path, ["data.source=movielens-100k", "data.path=/x"])
    ml_settings = yaml.safe_load((DATASET_SETTINGS_DIR / "movielens-100k.yaml").read_text())
    assert ml.algorithms["itemknn"]["k"] == ml_settings["algorithms"]["itemknn"]["k"]
    forced = load_params(path, ["data.source=movielens-100k", "algorithms.itemknn.k=7"])
    assert forced.algorithms["itemknn"]["k"] == 7
    assert load_params(path).algorithms["itemknn"]["k"] != ml_settings["algorithms"]["itemknn"]["k"]


def test_unknown_keys_and_bad_values_are_rejected(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    with pytest.raises(ValidationError, match="extra"):
        load_params(path, ["split.methd=x"])
    with pytest.raises(ValidationError, match="ks"):
        load_params(path, ["evaluate.ks=[0]"])


def test_rerank_shape_lives_in_export_only(tmp_path: Path) -> None:
    """The curve re-ranks as the served model does; the old evaluate keys say where they went."""
    from fuserec.rerank import DiversityCurve
    from fuserec.stages.evaluate import rerank_curve
    from fuserec.testing import planted_dataset

    path = write_params(tmp_path)
    for key in ("rerank_keep=3", "rerank_order=greedy"):
        with pytest.raises(ValidationError, match=r"moved to export\.rerank_"):
            load_params(path, [f"evaluate.{key}"])
    shape = ["export.rerank_keep=2", "export.rerank_depth=30", "export.rerank_order=greedy"]
    params = load_params(path, shape)
    data = planted_dataset()
    curve = rerank_curve(params, data, np.eye(data.n_items, dtype=np.float32))
    assert isinstance(curve, DiversityCurve) and curve.settings
    assert {(s.keep, s.depth, s.order) for s in curve.settings} == {(2, 30, "greedy")}


# -- plugin settings fail fast ---------------------------------------------------------------------------


def test_cli_run_fails_fast_on_an_unknown_plugin_key(tmp_path: Path) -> None:
    """The real CLI, as a user runs it: the typo is reported before any stage (or Prefect) starts."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    exe = Path(sys.executable).parent / "fuserec"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "fuserec.cli"]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "run", "--set", "algorithms.ease.l22=3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    expected = ("'l22'", "'ease'", "plugins.ease:EASE", "l2, max_items", "--set algorithms.ease.l22=3")
    for text in expected:
        assert text in output, output
    assert not (tmp_path / "outputs").exists()  # no stage ran
    assert seconds < 5.0, f"fuserec run took {seconds:.1f} s to reject a bad key"


def test_unknown_plugin_key_names_key_plugin_valid_keys_and_fix(tmp_path: Path) -> None:
    path = write_params(tmp_path, algorithms={"ease": {"l22": 3}})
    with pytest.raises(PluginSettingsError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith("algorithms.ease: unknown key 'l22' for algorithm plugin 'ease'")
    assert "fuserec.plugins.ease:EASE, distribution fuserec" in message
    assert "did you mean 'l2'?" in message and "seed, l2, max_items" in message
    assert message.endswith(f"rename or remove algorithms.ease.l22 in {path}")  # the file that set it
    assert isinstance(caught.value, ValueError)


def test_bad_plugin_value_gives_pydantics_message_and_the_plugin(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    number = r"algorithms\.ease\.l2: Input should be a valid number"
    with pytest.raises(PluginSettingsError, match=number) as e:
        load_params(path, ["algorithms.ease.l2=abc"])
    assert "'abc'" in str(e.value) and "algorithm plugin 'ease'" in str(e.value)
    # the layer whose value won is the one to fix: here the --set, not params.yaml's k: 200
    with pytest.raises(PluginSettingsError) as e:
        load_params(path, ["algorithms.itemknn.k=-1"])
    assert str(e.value).endswith("fix algorithms.itemknn.k in --set algorithms.itemknn.k=-1")


def test_unknown_plugin_name_lists_the_registered_ones(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    with pytest.raises(PluginSettingsError) as caught:
        load_params(path, ["algorithms.eas.l2=3"])
    message = str(caught.value)
    assert "no algorithm plugin named 'eas'" in message and "did you mean 'ease'?" in message
    assert "Registered: " in message and "itemknn" in message and "popularity" in message
    with pytest.raises(PluginSettingsError, match="no fuser plugin named 'stack'"):
        load_params(path, ["fusers.stack={}"])


def test_fuser_keys_are_checked_as_the_fuse_stage_builds_them(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    with pytest.raises(PluginSettingsError) as caught:
        load_params(path, ["fusers.rrf.kk=3", "fusers.stacking.num_leaves=many"])
    message = str(caught.value)
    assert message.startswith("2 problems in plugin settings:")
    assert "fusers.rrf: unknown key 'kk' for fuser plugin 'rrf'" in message and "seed, k." in message
    assert "fusers.stacking.num_leaves: Input should be a valid integer" in message
    # the seed comes from train.seed, as in the stage; a plugin may still set its own
    assert load_params(path, ["train.seed=3", "fusers.rrf.seed=5"]).fusers["rrf"]["seed"] == 5
    with pytest.raises(PluginSettingsError, match=r"fusers\.rrf\.seed"):
        load_params(path, ["train.seed=3", "fusers.rrf.seed=x"])


def test_every_plugins_defaults_pass_and_checking_can_be_skipped(tmp_path: Path) -> None:
    entries = {
        "algorithms": {name: {} for name in available(ALGORITHMS_GROUP)},
        "fusers": {name: {} for name in available(FUSERS_GROUP)},
    }
    check_plugin_settings(Params.model_validate(entries))
    path = write_params(tmp_path)
    assert load_params(path, ["algorithms.ease.l22=3"], check_plugins=False).algorithms["ease"] == {"l22": 3}


@pytest.mark.parametrize("settings", sorted(DATASET_SETTINGS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_repo_params_with_every_dataset_settings_file_validate(settings: Path) -> None:
    params = load_params(REPO / "params.yaml", [f"data.source={settings.stem}", "data.path=/x"])
    assert params.data.settings_file == settings
    tuned = yaml.safe_load(settings.read_text())
    for name, entry in tuned.get("algorithms", {}).items():
        assert params.algorithms[name].items() >= entry.items()


def test_a_plugin_that_cannot_load_is_warned_about_not_failed(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    unchecked = r"algorithms\.broken is not checked.*a_module_that_does_not_exist"
    with on_path(install_broken_plugins(tmp_path / "site")), pytest.warns(UserWarning, match=unchecked):
        load_params(path, ["algorithms.broken.x=1"])


def test_only_the_named_plugins_are_imported(tmp_path: Path) -> None:
    """Checking stays cheap: the registry loads the entry points of the names in params, no others."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"algorithms": {"popularity": {}}, "fusers": {"rrf": {"k": 10}}}))
    code = (
        "import sys; from fuserec.config import load_params\n"
        f"load_params({str(path)!r})\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fuserec.plugins.'))\n"
        "assert 'prefect' not in sys.modules, 'prefect imported'\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(eval(done.stdout.strip().splitlines()[-1]))
    assert {"fuserec.plugins.popularity", "fuserec.plugins.fusers.voting"} <= loaded
    assert not loaded & {"fuserec.plugins.sasrec", "fuserec.plugins.ease", "fuserec.plugins.fusers.stacking"}


# -- per-dataset settings: data.settings_dir ---------------------------------------------------------------


def test_settings_dir_selects_the_dataset_file(tmp_path: Path) -> None:
    folder = tmp_path / "settings"
    folder.mkdir()
    (folder / "movielens-1m.yaml").write_text("algorithms:\n  itemknn:\n    k: 11\n")
    path = write_params(tmp_path, data={"settings_dir": str(folder)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingDatasetSettingsWarning)
        params = load_params(path, ["data.source=movielens-1m", "data.path=/x"])
    assert params.algorithms["itemknn"]["k"] == 11
    assert params.data.settings_file == folder / "movielens-1m.yaml"


def test_a_real_dataset_without_settings_warns_and_uses_params(tmp_path: Path) -> None:
    path = write_params(tmp_path)
    with pytest.warns(MissingDatasetSettingsWarning, match=r"movielens-1m\.yaml does not exist") as caught:
        params = load_params(path, ["data.source=movielens-1m", f"data.settings_dir={tmp_path / 'nowhere'}"])
    assert str(tmp_path / "nowhere" / "movielens-1m.yaml") in str(caught[0].message)
    assert params.algorithms["itemknn"]["k"] == 200  # params.yaml's value
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingDatasetSettingsWarning)
        load_params(path)  # synthetic needs no settings file


def test_dataset_settings_ship_inside_the_package() -> None:
    """A wheel install finds the tuned settings as a checkout does: they are package data."""
    assert Path(fuserec.__file__).resolve().parent / "dataset_settings" == DATASET_SETTINGS_DIR
    assert (DATASET_SETTINGS_DIR / "movielens-100k.yaml").is_file()
    assert Params().data.settings_path == DATASET_SETTINGS_DIR
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "dataset_settings/*.yaml" in package_data["fuserec"]
    assert not (REPO / "configs" / "datasets").exists()


def test_every_params_field_is_described() -> None:
    """The docs' params reference is generated from these descriptions."""

    def undescribed(model: type[BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            key = f"{prefix}{info.alias or name}"
            if not (info.description or "").strip():
                missing.append(key)
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                missing += undescribed(kind, f"{key}.")
        return missing

    assert undescribed(Params, "") == []
