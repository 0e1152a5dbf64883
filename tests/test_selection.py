"""export.algorithm: auto serves the best candidate on validation; metrics.json scores the served graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fuserec.config import Params
from fuserec.layout import Layout
from fuserec.manifest import read_json, write_json

from .conftest import SMALL, write_params

COMPONENTS = ["popularity", "itemknn", "ease", "content"]
SECTIONS = {
    **SMALL,
    "train": {"algorithms": [*COMPONENTS, "als"]},  # als is trained but not fused: no validation score
    "fuse": {"fusers": ["stacking", "weighted", "borda"], "components": COMPONENTS},
    "fusers": {
        "stacking": {"n_estimators": 40, "folds": 3, "min_child_samples": 10},
        "weighted": {"n_trials": 10},
    },
    "export": {"algorithm": "auto"},
}
SERVED_TOLERANCE = 1e-3  # served and Python rows differ by float noise between onnxruntime and torch only


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """A small run with export.algorithm: auto, the fuse stage run without the test split on disk."""
    from fuserec.config import load_params
    from fuserec.tasks.clean import clean
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export
    from fuserec.tasks.fuse import fuse
    from fuserec.tasks.report import report
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    params = load_params(write_params(tmp_path_factory.mktemp("auto"), **SECTIONS))
    for stage in (validate, clean, split, train):
        stage.fn(params)
    test = Layout(params.outputs_dir).split_file("test")
    aside = test.with_name("test.parquet.aside")
    shutil.move(test, aside)  # the choice must not read test: without it on disk, fuse still runs
    try:
        fuse.fn(params)
    finally:
        shutil.move(aside, test)
    for stage in (export, evaluate, report):
        stage.fn(params)
    return params


def python_row(metrics: dict, name: str) -> dict:
    return metrics["models"].get(name) or metrics["fusers"][name]


def test_auto_exports_the_best_candidate_on_validation(auto_run: Params) -> None:
    layout = Layout(auto_run.outputs_dir)
    selection = read_json(layout.selection)
    metric, candidates = selection["metric"], selection["candidates"]
    assert metric == auto_run.tune.metric == "ndcg@10"
    chosen = selection["chosen"]
    assert chosen == max(candidates, key=lambda n: candidates[n][metric])
    fusers = ["stacking", "weighted", "borda"]
    fell_back = {n for n in fusers if read_json(layout.fuser(n) / "manifest.json")["served_alone"]}
    assert set(candidates) | set(selection["left_out"]) == {*COMPONENTS, *fusers, "als"}
    assert set(selection["left_out"]) == {"als", *fell_back}
    for name in COMPONENTS:  # fitted on train': every validation user is held out
        assert candidates[name]["kind"] == "model" and "train'" in candidates[name]["method"]
    if "stacking" in candidates:  # the ranker's own folds, nothing fitted again
        assert "out of fold" in candidates["stacking"]["method"]
    for name in {"weighted", "borda"} - fell_back:  # no held-out users of their own: cross-fitted
        assert "cross-fitted" in candidates[name]["method"]
    # Paired: every candidate is scored on the same users, all of which each of them held out.
    assert len({c["n_users"] for c in candidates.values()}) == 1
    assert all(c["n_users"] <= c["held_out_users"] and 0.0 <= c[metric] <= 1.0 for c in candidates.values())
    # The manifest says what was chosen and why, with every candidate's validation score.
    manifest = read_json(layout.export / "manifest.json")
    assert manifest["algorithm"]["name"] == chosen == manifest["selection"]["chosen"]
    assert manifest["selection"]["reason"] == "best ndcg@10 on validation"
    assert manifest["selection"]["candidates"] == {n: c[metric] for n, c in candidates.items()}
    page = layout.report.read_text()
    assert "What is served, and why" in page and f"{chosen} (served)" in page


def test_the_served_row_is_the_graph_under_onnxruntime_and_equals_python(auto_run: Params) -> None:
    metrics = read_json(Layout(auto_run.outputs_dir).metrics)
    served = metrics["served"]
    chosen = read_json(Layout(auto_run.outputs_dir).selection)["chosen"]
    assert served["algorithm"] == chosen and served["export_algorithm"] == "auto"
    assert served["providers"] == ["CPUExecutionProvider"] and served["graph"] == "model/model.onnx"
    assert served["n_users"] == metrics["protocol"]["test_users"]
    python = python_row(metrics, chosen)
    compared = [k for k, v in python.items() if isinstance(v, float) and k in served]
    assert {"ndcg@10", "recall@10", "hr@10", "coverage@10", "ndcg@5"} <= set(compared)
    for key in compared:
        assert served[key] == pytest.approx(python[key], abs=SERVED_TOLERANCE), key
    assert served["largest_difference_from_python"] <= SERVED_TOLERANCE
    assert metrics["rerank"]["scorer"] == chosen  # the curve re-ranks what is served


def test_a_named_algorithm_is_exported_and_served_as_before(auto_run: Params, tmp_path: Path) -> None:
    from fuserec.artifacts import chosen_algorithm
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export

    outputs = tmp_path / "outputs"
    shutil.copytree(auto_run.outputs_dir, outputs, ignore=shutil.ignore_patterns(".cache"))
    raw = auto_run.model_dump(by_alias=True)
    named = Params.model_validate(
        {**raw, "outputs": str(outputs), "export": {**raw["export"], "algorithm": "itemknn"}}
    )
    assert chosen_algorithm(named, Layout(outputs)) == "itemknn"
    with pytest.raises(ValueError, match="run the export stage again"):
        evaluate.fn(named)  # model/ still holds the auto choice: a stale graph is refused, not scored
    export.fn(named)
    manifest = read_json(Layout(outputs).export / "manifest.json")
    assert manifest["algorithm"]["name"] == "itemknn"
    assert manifest["selection"]["reason"] == "named in export.algorithm"
    evaluate.fn(named)
    metrics = read_json(Layout(outputs).metrics)
    assert metrics["served"]["algorithm"] == "itemknn" and metrics["served"]["export_algorithm"] == "itemknn"
    assert metrics["served"]["ndcg@10"] == pytest.approx(metrics["models"]["itemknn"]["ndcg@10"], abs=1e-3)


def test_auto_without_a_choice_says_what_to_do(tmp_path: Path) -> None:
    from fuserec.artifacts import chosen_algorithm

    params = Params.model_validate({"outputs": str(tmp_path)})
    assert params.export.algorithm == "auto"
    with pytest.raises(FileNotFoundError, match="run the fuse stage"):
        chosen_algorithm(params, Layout(tmp_path))
    write_json(Layout(tmp_path).selection, {"metric": "ndcg@10", "chosen": None, "left_out": {"als": "why"}})
    with pytest.raises(ValueError, match=r"fuse\.components"):
        chosen_algorithm(params, Layout(tmp_path))


def test_the_metric_must_be_one_the_evaluation_computes() -> None:
    from fuserec.selection import parse_metric

    assert parse_metric("ndcg@10") == ("ndcg", 10) and parse_metric("recall@20") == ("recall", 20)
    for bad in ("ndcg", "auc@10", "ndcg@0", "ndcg@1000"):
        with pytest.raises(ValueError, match=r"tune\.metric"):
            parse_metric(bad)


def test_held_out_lists_leave_out_simulated_cold_copies() -> None:
    from fuserec.fusion import ValidationScores

    val = ValidationScores.__new__(ValidationScores)  # only the bookkeeping held_out reads
    val.n_real, val.users = 3, np.array([10, 11, 12, 10])  # row 3 copies user 10
    held = val.held_out([(np.array([0, 3]), np.array([[1], [2]])), (np.array([2]), np.array([[3]]))], "m")
    assert held is not None and held.users.tolist() == [10, 12] and held.top.tolist() == [[1], [3]]
    assert val.held_out([(np.array([], np.int64), np.zeros((0, 1), np.int64))], "m") is None
