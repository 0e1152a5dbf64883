"""User attributes reach the served graph: the encoder, the graph's input, evaluate and the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.api import USER_FEATURES
from fuserec.features import AttributeEncoder, table_rows, user_attribute_matrix
from fuserec.histories import Histories
from fuserec.layout import MODEL_FILE, Layout
from fuserec.onnx_model import OnnxRecommender, export_onnx
from fuserec.parity import parity_check
from fuserec.plugins.kg import KnowledgeGraph
from fuserec.plugins.popularity import Popularity
from fuserec.plugins.twotower import TwoTower
from fuserec.serving.app import create_app
from fuserec.testing import planted_dataset

from .conftest import SMALL, write_params
from .test_twotower import FAST


# -- the encoder ----------------------------------------------------------------------------------------
@st.composite
def users_tables(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(1, 60))
    ages = draw(st.lists(st.one_of(st.none(), st.integers(0, 99)), min_size=n, max_size=n))
    jobs = draw(st.lists(st.sampled_from(["a", "b", "c", None, ""]), min_size=n, max_size=n))
    zips = draw(st.lists(st.text("0123456789", min_size=1, max_size=5), min_size=n, max_size=n))
    return pd.DataFrame(
        {
            "user": np.arange(n),
            "user_id": np.arange(n) + 100,
            "age": pd.array(ages, dtype="Float64"),
            "occupation": jobs,
            "zip": zips,
        }
    )


@settings(max_examples=60, deadline=None)
@given(users=users_tables())
def test_the_encoder_round_trips_and_encodes_one_person_as_the_table(users: pd.DataFrame) -> None:
    encoder = AttributeEncoder.fit(users)
    matrix, names = user_attribute_matrix(users)
    assert list(encoder.names) == names
    np.testing.assert_array_equal(encoder.transform(users), matrix)
    again = AttributeEncoder.from_json(json.loads(json.dumps(encoder.to_json())))
    np.testing.assert_array_equal(again.transform(users), matrix)
    assert set(np.unique(matrix)) <= {0.0, 1.0}
    for row in range(min(len(users), 5)):  # one person at a time, as the service encodes them
        person = {c: users[c].iloc[row] for c in ("age", "occupation", "zip")}
        person = {c: str(v) for c, v in person.items() if not pd.isna(v)}
        np.testing.assert_array_equal(again.encode(person), matrix[row])


def test_table_puts_columns_in_the_graphs_order_and_unknown_rows_are_zero() -> None:
    users = pd.DataFrame({"user_id": range(6), "gender": list("MFMFMF"), "job": list("xxxyyy")})
    encoder = AttributeEncoder.fit(users, config=_counts(1))
    table = encoder.table(users, ["job:y", "nothing:here", "gender:M"])
    np.testing.assert_array_equal(table[:, 0], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(table[:, 1], 0)
    np.testing.assert_array_equal(table[:, 2], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(table_rows(table, np.array([-1, 3, 99])), [[0, 0, 0], table[3], [0, 0, 0]])


def _counts(min_count: int) -> object:
    from fuserec.features import ContentFeatures

    return ContentFeatures(attribute_min_count=min_count)


# -- the graph ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted() -> tuple[TwoTower, KnowledgeGraph, Popularity]:
    data = planted_dataset()
    kg = KnowledgeGraph({"factors": 16, "max_epochs": 2, "progress": False, "threads": 1}).fit(data)
    return TwoTower(FAST).fit(data), kg, Popularity().fit(data)


@pytest.mark.parametrize("which", [0, 1])
def test_a_model_that_reads_attributes_exports_them_as_an_input(
    fitted: tuple[TwoTower, KnowledgeGraph, Popularity], which: int, tmp_path: Path
) -> None:
    algo = fitted[which]
    data = planted_dataset()
    session = OnnxRecommender(export_onnx(algo, tmp_path / "m.onnx", 10))
    assert USER_FEATURES in {i.name for i in session.session.get_inputs()}
    encoder = AttributeEncoder.fit(data.users)
    table = encoder.table(data.users, session.feature_names)
    assert table.any(axis=1).all()  # every planted user has attributes
    hist = data.histories().select(np.arange(12))
    report = parity_check(algo, session, hist, 10, features=table_rows(table, hist.users))
    assert report["scores_match"] and report["top_items_match_up_to_ties"], report
    # zero rows are the unknown user: the history-only scores
    bare = Histories(hist.indptr, hist.items, hist.n_items)
    np.testing.assert_allclose(session.run(hist.to_padded())[0], algo.score(bare), rtol=1e-5, atol=1e-5)
    # and the attributes do move the scores (otherwise this test could not fail)
    assert not np.allclose(session.run(hist.to_padded())[0], algo.score(hist), atol=1e-4)


def test_a_fused_graph_reads_the_union_of_its_components_columns(
    fitted: tuple[TwoTower, KnowledgeGraph, Popularity],
) -> None:
    from fuserec.fusion import FusedModule
    from fuserec.plugins.fusers.voting import RRF

    twotower, kg, popularity = fitted
    modules = [popularity.to_torch(), twotower.to_torch(), kg.to_torch()]
    fused = FusedModule(RRF(), modules, planted_dataset().n_items)
    names = fused.user_feature_names
    assert set(names) == set(twotower.attribute_names_) | set(kg.state_["attr_names"])
    data = planted_dataset()
    hist = data.histories().select(np.arange(5))
    feats = torch.from_numpy(AttributeEncoder.fit(data.users).table(data.users, names)[hist.users])
    with torch.no_grad():
        own = [names.index(n) for n in twotower.attribute_names_]
        expected = twotower.to_torch()(torch.from_numpy(hist.to_padded()), feats[:, own])
        fused.fuser.combine = lambda scores, seen: (scores[1], scores)  # type: ignore[method-assign]
        got = fused(torch.from_numpy(hist.to_padded()), None, feats)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


# -- a run whose served model reads attributes: evaluate and the service feed them ---------------------
@pytest.fixture(scope="module")
def attribute_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fuserec.config import load_params
    from fuserec.tasks.clean import clean
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export
    from fuserec.tasks.fuse import fuse
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    root = tmp_path_factory.mktemp("attributes")
    sections = {
        **SMALL,
        "train": {"algorithms": ["popularity", "twotower"]},
        "fuse": {"fusers": ["weighted"], "components": ["popularity", "twotower"]},
        "export": {"algorithm": "weighted"},
    }
    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train, fuse, export, evaluate):
        stage.fn(params)
    return params.outputs_dir


def test_evaluate_scores_the_graph_with_each_users_attributes(attribute_run: Path) -> None:
    layout = Layout(attribute_run)
    manifest = json.loads((layout.export / "manifest.json").read_text())
    spec = manifest["features_input"]
    assert spec["name"] == USER_FEATURES and spec["columns"] and spec["encoder"]
    assert manifest["parity"]["scores_match"]
    metrics = json.loads(layout.metrics.read_text())
    served, python = metrics["served"], metrics["fusers"]["weighted"]
    assert served["largest_difference_from_python"] <= 1e-6, (served, python)
    assert served["ndcg@10"] == pytest.approx(python["ndcg@10"], abs=1e-6)


def test_the_service_feeds_a_known_users_attributes_and_a_requests(
    attribute_run: Path, tmp_path: Path
) -> None:
    layout = Layout(attribute_run)
    users = pd.read_parquet(layout.clean / "users.parquet")
    train = pd.read_parquet(layout.split_file("train"))
    row = int(train["user"].iloc[0])
    user_id = str(users.loc[users["user"] == row, "user_id"].iloc[0])
    session = OnnxRecommender(layout.export / MODEL_FILE)
    with TestClient(create_app(attribute_run, tmp_path / "e.sqlite")) as client:
        service = client.app.state.deployment.current  # type: ignore[attr-defined]
        known = client.post("/recommend", json={"user_id": user_id, "k": 10}).json()
        items, _ = service.history(user_id, 2**40)
        table = AttributeEncoder.fit(users).table(users, session.feature_names)
        expected = session.run(np.array([items]), None, table[[row]])[0][0]
        first = known["items"][0]
        assert first["score"] == pytest.approx(float(expected[service.index[first["item_id"]]]), abs=1e-5)
        # the same history sent anonymously has no attributes: other scores
        history = [service.item_ids[i] for i in items]
        anonymous = client.post("/recommend", json={"history": history, "k": 10}).json()
        assert anonymous["items"][0]["score"] != pytest.approx(first["score"], abs=1e-6)
        # attributes in the body are read (and differ between two people)
        a = {"age": 20, "gender": "F", "occupation": str(users["occupation"].iloc[0])}
        b = {"age": 60, "gender": "M", "occupation": str(users["occupation"].iloc[-1])}
        with_a = client.post("/recommend", json={"history": history, "k": 10, "attributes": a}).json()
        with_b = client.post("/recommend", json={"history": history, "k": 10, "attributes": b}).json()
        scores_a = [i["score"] for i in with_a["items"]]
        assert scores_a != [i["score"] for i in anonymous["items"]]
        assert scores_a != [i["score"] for i in with_b["items"]]
