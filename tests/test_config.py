from pathlib import Path

import numpy as np
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


def test_rerank_shape_lives_in_export_only(tmp_path: Path) -> None:
    """The curve re-ranks as the served model does; the old evaluate keys say where they went."""
    from fuserec.rerank import DiversityCurve
    from fuserec.tasks.evaluate import rerank_curve
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
