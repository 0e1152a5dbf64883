"""The HTTP service end to end: a small trained run, events that change recommendations at once, a
store that survives a restart, and 4xx (never 5xx) for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuserec.config import load_params
from fuserec.layout import Layout
from fuserec.serving.app import create_app

from .conftest import SMALL, write_params


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train, fuse, evaluate, export):
        stage.fn(params)
    return params.outputs_dir


def _catalog(outputs: Path) -> list[str]:
    return pd.read_parquet(Layout(outputs).export / "catalog.parquet")["item_id"].astype(str).tolist()


def test_events_change_recommendations_at_once_and_survive_a_restart(outputs: Path, tmp_path: Path) -> None:
    store = tmp_path / "events.sqlite"
    items = _catalog(outputs)
    with TestClient(create_app(outputs, store)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready").json()
        assert ready["model"] == "stacking" and ready["providers"][0] == "CPUExecutionProvider"
        assert ready["events"] > 0  # the training interactions were imported on first start
        before = client.post("/recommend", json={"user_id": "newbie", "k": 5}).json()
        assert before["history_length"] == 0 and len(before["items"]) == 5
        liked = [items[3], items[11], items[19]]
        stored = client.post("/events", json={"events": [{"user_id": "newbie", "item_id": i} for i in liked]})
        assert stored.status_code == 200 and stored.json() == {"stored": 3}
        after = client.post("/recommend", json={"user_id": "newbie", "k": 5}).json()
        assert after["history_length"] == 3
        ids = [x["item_id"] for x in after["items"]]
        assert ids != [x["item_id"] for x in before["items"]] and not set(ids) & set(liked)
        count = client.get("/ready").json()["events"]
    with TestClient(create_app(outputs, store)) as client:  # a new process reading the same file
        assert client.get("/ready").json()["events"] == count
        again = client.post("/recommend", json={"user_id": "newbie", "k": 5}).json()
        assert again["history_length"] == 3 and again["items"] == after["items"]


def test_explicit_history_matches_the_exported_model(outputs: Path, tmp_path: Path) -> None:
    from fuserec.onnx_model import OnnxRecommender

    items = _catalog(outputs)
    when = 10**9
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        body = {"history": [items[2], items[6]], "k": 10, "time": when, "exclude": [items[0]]}
        got = client.post("/recommend", json=body).json()
    session = OnnxRecommender(Layout(outputs).export / "model.onnx")
    scores = session.run(np.asarray([[2, 6]], dtype=np.int64), np.asarray([when], dtype=np.int64))[0][0]
    top = [int(i) for i in np.lexsort((np.arange(len(scores)), -scores)) if i not in (0, 2, 6)][:10]
    assert [x["item_id"] for x in got["items"]] == [items[i] for i in top]
    np.testing.assert_allclose([x["score"] for x in got["items"]], scores[top], rtol=1e-6)


def test_a_first_event_and_an_empty_user_are_served(outputs: Path, tmp_path: Path) -> None:
    """One-item histories once crashed ALS's fold-in inside the graph: a user's first event is common."""
    items = _catalog(outputs)
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        assert (
            client.post("/events", json={"events": [{"user_id": "solo", "item_id": items[4]}]}).status_code
            == 200
        )
        for body in ({"user_id": "solo"}, {"user_id": "nobody"}, {"history": [items[4]]}, {"history": []}):
            response = client.post("/recommend", json=body)
            assert response.status_code == 200 and len(response.json()["items"]) == 10, body


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"user_id": "u", "k": 0}, "greater than or equal"),
        ({"user_id": "u", "k": 10_000}, "less than or equal"),
        ({"history": ["no-such-item"]}, "unknown history item ids"),
        ({"user_id": "u", "history": []}, "exactly one of"),
        ({}, "exactly one of"),
        ({"user_id": "u", "exclude": ["nope"]}, "unknown excluded item ids"),
        ({"user_id": "", "k": 3}, "at least 1 character"),
        ({"user_id": "u", "surprise": 1}, "Extra inputs"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(
    outputs: Path, tmp_path: Path, payload: dict, fragment: str
) -> None:
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        response = client.post("/recommend", json=payload)
    assert response.status_code == 422 and fragment in response.text


def test_bad_events_are_refused_and_nothing_is_stored(outputs: Path, tmp_path: Path) -> None:
    items = _catalog(outputs)
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        count = client.get("/ready").json()["events"]
        good, bad = {"user_id": "x", "item_id": items[0]}, {"user_id": "x", "item_id": "ghost"}
        assert client.post("/events", json={"events": [good, bad]}).status_code == 422
        headers = {"content-type": "application/json"}
        assert client.post("/events", content=b"{not json", headers=headers).status_code == 422
        assert client.post("/events", json={"events": []}).status_code == 422
        raw = b'{"events": [{"user_id": "x", "item_id": "%s", "rating": NaN}]}' % items[0].encode()
        assert client.post("/events", content=raw, headers=headers).status_code == 422
        assert client.get("/ready").json()["events"] == count


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
EVENT_KEYS = ["user_id", "item_id", "rating", "timestamp", "kind"]
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "user_id": JSON,
        "history": JSON,
        "k": JSON,
        "exclude": JSON,
        "time": JSON,
        "events": st.lists(st.dictionaries(st.sampled_from(EVENT_KEYS), JSON)),
    },
)


@pytest.fixture(scope="module")
def client(outputs: Path, tmp_path_factory: pytest.TempPathFactory):
    with TestClient(create_app(outputs, tmp_path_factory.mktemp("fuzz") / "e.sqlite")) as client:
        yield client


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/recommend", "/events"]), body=FIELDS | JSON)
def test_hostile_payloads_get_4xx_never_5xx(client: TestClient, path: str, body: object) -> None:
    response = client.post(path, json=body)
    assert response.status_code < 500, (path, body, response.text)
