"""The rating task end to end (``task: rating``): split, train, fuse, export, evaluate, report, /predict.

One small synthetic run is shared by the module (stage functions, as ``dvc repro`` calls them); the
checks read what each stage wrote and query the service over the exported graph.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from fuserec.config import Params, load_params
from fuserec.layout import Layout
from tests.conftest import RATING, RATING_RATERS, write_params

RATERS = RATING_RATERS


def run_stages(params: Params, stages: tuple[str, ...]) -> None:
    import importlib

    for name in stages:
        getattr(importlib.import_module(f"fuserec.stages.{name}"), name)(params)


@pytest.fixture(scope="module")
def run(rating_run: Params) -> Params:
    return rating_run


def _layout(params: Params) -> Layout:
    return Layout(params.outputs_dir)


def test_the_temporal_split_holds_out_each_users_latest_ratings(run: Params) -> None:
    layout = _layout(run)
    train, test = pd.read_parquet(layout.split_file("train")), pd.read_parquet(layout.split_file("test"))
    ratings = pd.read_parquet(layout.clean / "ratings.parquet")
    assert len(train) + len(test) == ratings["rating"].notna().sum()  # every rating, positive or not
    assert (test["rating"] < run.clean.implicit_threshold).any()  # low ratings are kept, not thresholded
    last_train = train.groupby("user")["timestamp"].max()
    first_test = test.groupby("user")["timestamp"].min()
    assert (last_train.reindex(first_test.index) <= first_test).all()
    assert not layout.split_file("valid").exists()  # the ranking carve is not written for this task


def test_a_named_export_is_served_and_every_candidate_is_scored(run: Params) -> None:
    layout = _layout(run)
    selection = json.loads(layout.selection.read_text())
    manifest = json.loads((layout.export / "manifest.json").read_text())
    assert selection["chosen"] == "blend" == manifest["algorithm"]["name"]  # rating.export: blend
    assert set(selection["candidates"]) == {*RATERS, "blend", "stacker", "per_user"}
    assert manifest["task"] == "rating" and manifest["components"] == RATERS  # a fuser reads them all
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    # neural reads user attributes: the graph takes them as an input, encoded as the export recorded
    assert manifest["features_input"]["columns"]


def test_auto_serves_the_lowest_validation_rmse(tmp_path: Path) -> None:
    overrides = {**RATING, "rating": {"raters": ["baseline", "knn_baseline"], "validation_folds": 2}}
    params = load_params(write_params(tmp_path, **overrides))
    run_stages(params, ("validate", "clean", "split", "train", "fuse"))
    selection = json.loads(_layout(params).selection.read_text())
    best = min(selection["candidates"], key=lambda n: selection["candidates"][n]["rmse"])
    assert selection["chosen"] == best and best in selection["reason"]


def test_evaluate_reports_every_model_and_the_served_graph_equals_python(run: Params) -> None:
    metrics = json.loads(_layout(run).metrics.read_text())
    assert metrics["task"] == "rating"
    assert set(metrics["models"]) == set(RATERS)
    assert set(metrics["fusers"]) == {"blend", "stacker", "per_user"}
    served = metrics["served"]
    python = {**metrics["models"], **metrics["fusers"]}[served["name"]]
    assert served["max_abs_diff_python"] <= 1e-4
    assert served["rmse"] == pytest.approx(python["rmse"], abs=1e-4)
    assert served["n"] == metrics["protocol"]["test_ratings"]
    for row in [*metrics["models"].values(), *metrics["fusers"].values()]:
        assert set(row["segments"]) == {"cold_users", "warm_users", "long_tail_items", "new_items"}
        assert 0.0 < row["rmse"] < 2.0 and row["mae"] <= row["rmse"]
    assert "summary" in metrics["significance"]
    assert "RMSE" in (_layout(run).report).read_text()


def _ensemble(run: Params):  # the Python predictor the graph must match
    from fuserec.stages.rating.fuse import load_fusion

    return load_fusion(_layout(run))


def _user_history(run: Params, user: int) -> tuple[str, list[int], list[float]]:
    layout = _layout(run)
    train = pd.read_parquet(layout.split_file("train"))
    users = pd.read_parquet(layout.clean / "users.parquet")
    mine = train[train["user"] == user].sort_values(["timestamp", "item"], kind="stable")
    user_id = str(users.loc[users["user"] == user, "user_id"].iloc[0])
    return user_id, mine["item"].tolist(), mine["rating"].astype(float).tolist()


def test_predict_for_a_stored_user_and_a_history_agrees_with_python(run: Params, tmp_path: Path) -> None:
    from fuserec.histories import Histories
    from fuserec.serving.app import create_app

    layout = _layout(run)
    catalog = pd.read_parquet(layout.export / "catalog.parquet")["item_id"].astype(str).tolist()
    ensemble = _ensemble(run)
    user_id, items, ratings = _user_history(run, 3)
    targets = [0, 5, 11, 17]
    hist = Histories(
        np.array([0, len(items)]),
        np.asarray(items, np.int64),
        len(catalog),
        None,
        np.asarray(ratings, np.float32),
    )
    # a stored user's attributes come from the users table (neural reads them); a bare history has none
    known = ensemble.predict(replace(hist, users=np.array([3])), np.asarray([targets]))[0]
    anonymous = ensemble.predict(hist, np.asarray([targets]))[0]
    with TestClient(create_app(layout.root, tmp_path / "e.sqlite")) as client:
        ready = client.get("/ready").json()
        assert ready["task"] == "rating"
        body = {"user_id": user_id, "items": [catalog[t] for t in targets]}
        stored = client.post("/predict", json=body).json()
        history = [{"item_id": catalog[i], "rating": r} for i, r in zip(items, ratings, strict=True)]
        sent = client.post("/predict", json={"history": history, "items": body["items"]}).json()
    for answer, expected in ((stored, known), (sent, anonymous)):
        got = np.array([p["rating"] for p in answer["predictions"]])
        assert np.max(np.abs(got - expected)) <= 1e-4
        assert answer["strategy"] == "history" and answer["history_size"] == len(items)
        for p in answer["predictions"]:  # the parts add up to the fused rating (before the range clip)
            low, high = answer["rating_range"]
            assert np.clip(sum(p["contributions"].values()), low, high) == pytest.approx(
                p["rating"], abs=1e-4
            )


def test_predict_without_ratings_uses_the_baselines_and_says_so(run: Params, tmp_path: Path) -> None:
    from fuserec.serving.app import create_app

    layout = _layout(run)
    catalog = pd.read_parquet(layout.export / "catalog.parquet")["item_id"].astype(str).tolist()
    baseline = _ensemble(run).components["baseline"]
    with TestClient(create_app(layout.root, tmp_path / "e.sqlite")) as client:
        answer = client.post("/predict", json={"history": [], "items": catalog[:5]}).json()
        unknown = client.post("/predict", json={"history": [], "items": [catalog[0], "no-such-item"]})
        wrong_task = client.post("/recommend", json={"history": [catalog[0]]})
        new_user = client.post("/predict", json={"user_id": "somebody-new", "items": catalog[:5]}).json()
    from fuserec.histories import Histories

    empty = Histories(np.array([0, 0]), np.zeros(0, np.int64), len(catalog), None, np.zeros(0, np.float32))
    expected = baseline.predict(empty, np.arange(5)[None, :])[0]
    for body in (answer, new_user):
        assert body["strategy"] == "baselines" and "baselines" in body["note"]
        got = np.array([p["rating"] for p in body["predictions"]])
        assert np.max(np.abs(got - expected)) <= 1e-4
    assert unknown.status_code == 422 and "no-such-item" in unknown.json()["detail"]
    assert wrong_task.status_code == 409 and "/predict" in wrong_task.json()["detail"]


def test_a_fresh_rating_changes_the_prediction_without_retraining(run: Params, tmp_path: Path) -> None:
    from fuserec.serving.app import create_app

    layout = _layout(run)
    catalog = pd.read_parquet(layout.export / "catalog.parquet")["item_id"].astype(str).tolist()
    user_id, items, _ = _user_history(run, 5)
    others = [c for i, c in enumerate(catalog) if i not in set(items)]
    with TestClient(create_app(layout.root, tmp_path / "e.sqlite")) as client:
        before = client.post("/predict", json={"user_id": user_id, "items": others[:3]}).json()
        stored = client.post(
            "/events",
            json={"events": [{"user_id": user_id, "item_id": others[5], "kind": "rating", "rating": 1}]},
        )
        assert stored.status_code == 200
        bad = client.post("/events", json={"events": [{"user_id": user_id, "item_id": others[5]}]})
        after = client.post("/predict", json={"user_id": user_id, "items": others[:3]}).json()
    assert bad.status_code == 422  # a rating model reads ratings only
    assert after["history_size"] == before["history_size"] + 1
    assert [p["rating"] for p in after["predictions"]] != [p["rating"] for p in before["predictions"]]


def test_kfold_cross_validates_the_whole_procedure(tmp_path: Path) -> None:
    overrides = {
        **RATING,
        "rating": {
            "raters": ["baseline", "knn_baseline"],
            "protocol": "kfold",
            "folds": 3,
            "validation_folds": 2,
        },
        "data": {"synthetic": {"n_interactions": 3000, "seed": 5}},
    }
    params = load_params(write_params(tmp_path, **overrides))
    run_stages(params, ("validate", "clean", "split", "train", "fuse", "export", "evaluate"))
    layout = _layout(params)
    folds = pd.read_parquet(layout.split / "folds.parquet")
    sizes = np.bincount(folds["fold"])[1:]
    assert len(sizes) == 3 and sizes.max() - sizes.min() <= 1
    assert len(pd.read_parquet(layout.split_file("train"))) == len(folds)  # the served model sees all
    metrics = json.loads(layout.metrics.read_text())
    for row in [*metrics["models"].values(), *metrics["fusers"].values(), metrics["served"]]:
        assert len(row["folds"]) == 3
        assert row["rmse"] == pytest.approx(np.mean([f["rmse"] for f in row["folds"]]))
        assert row["n"] == len(folds)
    assert metrics["served"]["max_abs_diff_python"] <= 1e-4


def test_a_real_fuserec_serve_process_answers_predict(run: Params, tmp_path: Path) -> None:
    import httpx

    from tests.test_serving import _free_port, _start_server

    layout = _layout(run)
    catalog = pd.read_parquet(layout.export / "catalog.parquet")["item_id"].astype(str).tolist()
    user_id, items, _ = _user_history(run, 2)
    port = _free_port()
    process = _start_server(layout.root, tmp_path / "e.sqlite", port, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/predict", json={"user_id": user_id, "items": catalog[:3]}, timeout=30)
        ready = httpx.get(f"{url}/ready", timeout=30).json()
    finally:
        process.terminate()
        process.wait(30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["history_size"] == len(items)
    assert ready["task"] == "rating" and ready["model"] == answer.json()["model"]


def test_the_prefect_flow_runs_the_rating_task_and_caches_it(tmp_path: Path, prefect_harness: None) -> None:
    from tests.test_parallel_train import _run

    overrides = {**RATING, "rating": {"raters": ["baseline", "knn_baseline"], "validation_folds": 2}}
    params_file = write_params(tmp_path, **overrides)
    stages = ["validate", "clean", "split", "train", "fuse", "export", "evaluate", "report"]
    first = _run(params_file)
    assert sorted(first) == sorted(stages) and set(first.values()) == {"Completed"}
    assert (
        json.loads(load_params(params_file).outputs_dir.joinpath("metrics.json").read_text())["task"]
        == "rating"
    )
    again = _run(params_file)
    assert set(again.values()) == {"Cached"}
    # a rater's setting reruns what depends on the raters, not the data stages before them
    changed = _run(params_file, ["raters.knn_baseline.k=10"])
    assert {s for s, state in changed.items() if state == "Completed"} == {
        "train",
        "fuse",
        "export",
        "evaluate",
        "report",
    }
