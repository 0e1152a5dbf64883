from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fuserec.config import apply_overrides, load_params, parse_override

from .conftest import REPO, write_params


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
    ml_settings = yaml.safe_load((REPO / "configs/datasets/movielens-100k.yaml").read_text())
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
