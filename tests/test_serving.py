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

from fuserec.layout import Layout
from fuserec.serving.app import create_app


@pytest.fixture(scope="module")
def outputs(serving_run: Path) -> Path:
    return serving_run


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


def _post_events(client: TestClient, user: str, items: list[str], start: int = 0, **extra: object) -> None:
    at = 10**9 + start
    events = [{"user_id": user, "item_id": i, "timestamp": at + n, **extra} for n, i in enumerate(items)]
    assert client.post("/events", json={"events": events}).status_code == 200


def test_explanations_add_up_to_the_score_and_name_the_history_that_drove_it(
    outputs: Path, tmp_path: Path
) -> None:
    items = _catalog(outputs)
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        liked = [items[3], items[11], items[19], items[27]]
        _post_events(client, "reader", liked)
        got = client.post("/recommend", json={"user_id": "reader", "k": 5}).json()
        assert got["strategy"] == "history"
        components = client.get("/ready").json()["components"]
        for item in got["items"]:  # every listed item carries its share per fused model
            assert set(item["contributions"]) == set(components)
            assert sum(item["contributions"].values()) == pytest.approx(item["score"], abs=1e-4)
        top = got["items"][0]
        why = client.get("/explain", params={"user_id": "reader", "item_id": top["item_id"]}).json()
    assert why["score"] == pytest.approx(top["score"], rel=1e-5) and why["rank"] == 1
    assert why["contributions"] == pytest.approx(top["contributions"], abs=1e-5)
    assert sum(why["contributions"].values()) + why["unexplained"] == pytest.approx(why["score"], abs=1e-6)
    assert abs(why["unexplained"]) < 1e-4  # stacking splits its trees' base evenly: nothing is left over
    drivers = why["because_you_liked"]
    assert drivers and {d["item_id"] for d in drivers} <= set(liked)
    assert all(d["score_drop_without_it"] > 0 for d in drivers)
    drops = [d["score_drop_without_it"] for d in drivers]
    assert drops == sorted(drops, reverse=True)


def test_cold_start_follows_onboarding_then_attributes_then_popularity(outputs: Path, tmp_path: Path) -> None:
    layout = Layout(outputs)
    catalog = pd.read_parquet(layout.export / "catalog.parquet")
    counts = catalog["genres"].str.split("|").explode().value_counts()
    genre = counts[counts >= 5].index[-1]  # the rarest genre that can fill a list
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        onboard = {"user_id": "new", "k": 5, "onboarding": {"genres": [genre.upper()]}}
        got = client.post("/recommend", json=onboard).json()
        assert got["strategy"] == "onboarding" and got["history_length"] == 0
        assert all(genre.lower() in x["genres"] for x in got["items"])
        old = client.post("/recommend", json={"user_id": "new", "k": 5, "attributes": {"age": 67}}).json()
        young = {"user_id": "new", "k": 5, "attributes": {"age": 17, "gender": "F"}}
        assert client.post("/recommend", json=young).json()["strategy"] == "attributes"
        assert old["strategy"] == "attributes"
        plain = client.post("/recommend", json={"user_id": "new", "k": 5}).json()
        assert plain["strategy"] == "popularity"
        seeded = {"user_id": "new", "k": 5, "onboarding": {"items": [str(catalog["item_id"].iat[0])]}}
        assert client.post("/recommend", json=seeded).json()["strategy"] == "onboarding"
    train = pd.read_parquet(layout.split / "train.parquet")
    counts = np.bincount(train["item"], minlength=len(catalog))
    expected = np.lexsort((np.arange(len(counts)), -counts))[:5]
    assert [x["item_id"] for x in plain["items"]] == catalog["item_id"].astype(str).to_numpy()[
        expected
    ].tolist()


def test_filters_diversity_and_low_ratings(outputs: Path, tmp_path: Path) -> None:
    from fuserec.features import item_content_vectors
    from fuserec.rerank import intra_list_diversity

    items = _catalog(outputs)
    catalog = pd.read_parquet(Layout(outputs).export / "catalog.parquet")
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        _post_events(client, "critic", items[:6])
        genre = catalog["genres"].str.split("|").explode().value_counts().index[0]
        only = client.post("/recommend", json={"user_id": "critic", "filter": {"genres": [genre]}}).json()
        assert only["items"] and all(genre.lower() in x["genres"] for x in only["items"])
        plain = client.post("/recommend", json={"user_id": "critic", "k": 10}).json()
        varied = client.post("/recommend", json={"user_id": "critic", "k": 10, "diversity": 0.9}).json()
        # a low rating is not a positive (the training's implicit threshold), a high one is
        _post_events(client, "critic", [items[40]], start=10, rating=1.0)
        assert client.post("/recommend", json={"user_id": "critic"}).json()["history_length"] == 6
        _post_events(client, "critic", [items[41]], start=11, rating=5.0)
        assert client.post("/recommend", json={"user_id": "critic"}).json()["history_length"] == 7
        back = client.get("/events", params={"user_id": "critic"}).json()["events"]
        assert [e["item_id"] for e in back] == [*items[:6], items[40], items[41]]
    vectors = item_content_vectors(catalog)
    index = {v: i for i, v in enumerate(items)}

    def ild(response: dict) -> float:
        return intra_list_diversity(np.asarray([[index[x["item_id"]] for x in response["items"]]]), vectors)

    assert ild(varied) > ild(plain)


def test_request_diversity_keeps_the_exports_head(outputs: Path, tmp_path: Path) -> None:
    """A request's diversity re-ranks as the export says: with ``keep`` 10 a top-10 is not touched."""
    import json
    import shutil

    items = _catalog(outputs)
    lists = {}
    for keep in (0, 10):
        copy = tmp_path / f"keep{keep}"
        shutil.copytree(outputs, copy)
        manifest = Layout(copy).export / "manifest.json"
        data = json.loads(manifest.read_text())
        data["rerank"] = data["rerank"] | {"keep": keep}
        manifest.write_text(json.dumps(data))
        with TestClient(create_app(copy, tmp_path / f"e{keep}.sqlite")) as client:
            _post_events(client, "critic", items[:6])
            for d in (0.0, 0.9):
                body = {"user_id": "critic", "k": 10, "diversity": d}
                lists[keep, d] = [x["item_id"] for x in client.post("/recommend", json=body).json()["items"]]
    assert lists[10, 0.9] == lists[10, 0.0] == lists[0, 0.0]
    assert lists[0, 0.9] != lists[0, 0.0]  # keep 0: the whole list is open to MMR


def test_concurrent_requests_share_onnxruntime_runs(outputs: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fuserec.onnx_model import OnnxRecommender
    from fuserec.serving.batcher import Batcher

    model = OnnxRecommender(Layout(outputs).export / "model.onnx")
    batcher = Batcher(model, max_batch=8)
    histories = [[i, i + 3, i + 7][: 1 + i % 3] for i in range(24)]
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda h: batcher.score(h, 10**9), histories))
        alone = [batcher.score_many([h], [10**9])[0] for h in histories[:4]]
    finally:
        batcher.close()
    assert batcher.runs < len(histories) + 4  # some requests were scored together
    for got, ref in zip(results[:4], alone, strict=True):  # batching and padding change nothing
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.contributions, ref.contributions, rtol=1e-5, atol=1e-5)


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
        "filter": JSON | st.fixed_dictionaries({"genres": JSON}),
        "diversity": JSON,
        "onboarding": JSON | st.fixed_dictionaries({}, optional={"genres": JSON, "items": JSON}),
        "attributes": JSON | st.dictionaries(st.sampled_from(["age", "gender", "occupation"]), JSON),
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/explain", "/events", "/recommend", "/metrics", "/nowhere/../etc"]),
    params=st.dictionaries(st.sampled_from(["user_id", "item_id", "limit", "x"]), st.text(max_size=300)),
)
def test_hostile_queries_get_4xx_never_5xx(client: TestClient, path: str, params: dict) -> None:
    response = client.get(path, params=params)
    assert response.status_code < 500, (path, params, response.text)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(outputs: Path, store: Path, port: int, log: Path):
    """``fuserec serve`` in its own process, on a free loopback port; returns once /health answers."""
    import subprocess
    import sys
    import time

    import httpx

    command = [sys.executable, "-c", "from fuserec.cli import app; app()", "serve"]
    command += ["--model", str(Layout(outputs).export), "--store", str(store), "--port", str(port)]
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fuserec serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"fuserec serve did not answer /health in 120 s: {log.read_text()[-2000:]}")


def test_a_real_server_serves_events_at_once_and_loses_nothing_when_killed(
    outputs: Path, tmp_path: Path
) -> None:
    import httpx

    items = _catalog(outputs)
    store, log = tmp_path / "events.sqlite", tmp_path / "serve.log"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = _start_server(outputs, store, port, log)
    try:
        before = httpx.post(f"{base}/recommend", json={"user_id": "walk-in", "k": 5}).json()
        liked = [items[5], items[8], items[13]]
        events = [{"user_id": "walk-in", "item_id": i, "timestamp": 10**9 + n} for n, i in enumerate(liked)]
        assert httpx.post(f"{base}/events", json={"events": events}).json() == {"stored": 3}
        after = httpx.post(f"{base}/recommend", json={"user_id": "walk-in", "k": 5}).json()
        assert before["strategy"] == "popularity" and after["strategy"] == "history"
        assert [x["item_id"] for x in after["items"]] != [x["item_id"] for x in before["items"]]
        top = after["items"][0]
        why = httpx.get(f"{base}/explain", params={"user_id": "walk-in", "item_id": top["item_id"]}).json()
        assert sum(why["contributions"].values()) == pytest.approx(top["score"], abs=1e-4)
        assert "fuserec_requests_total" in httpx.get(f"{base}/metrics").text
    finally:
        process.kill()  # SIGKILL: no shutdown hook runs; only committed transactions may survive
        process.wait(timeout=30)
    process = _start_server(outputs, store, port, log)
    try:
        back = httpx.get(f"{base}/events", params={"user_id": "walk-in"}).json()["events"]
        assert [e["item_id"] for e in back] == liked
        again = httpx.post(f"{base}/recommend", json={"user_id": "walk-in", "k": 5}).json()
        assert again["items"] == after["items"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    # the server's log (uvicorn's and the app's) names routes, never the ids in paths and queries
    logged = log.read_text(errors="replace")
    assert '"GET /events" 200' in logged and '"GET /explain" 200' in logged
    assert "walk-in" not in logged


def test_a_new_item_with_content_only_is_recommended_by_content_aware_models(outputs: Path) -> None:
    """How a new item enters the catalogue (docs/how-to/operate-the-service.md): a row in the items table,
    no interactions; after the next export the content-aware plugins score it from its attributes alone."""
    from fuserec.data.dataset import Dataset
    from fuserec.histories import Histories
    from fuserec.plugins.content import Content

    layout = Layout(outputs)
    data = Dataset.load(layout.clean, interactions=layout.split / "train.parquet")
    twin = int(np.argmax(data.item_popularity()))  # the new item copies a popular item's attributes
    new = data.items.iloc[[twin]].assign(item=data.n_items, item_id="brand-new")
    grown = Dataset(data.interactions, pd.concat([data.items, new], ignore_index=True), data.users)
    assert grown.item_popularity()[-1] == 0  # nobody has interacted with it
    model = Content().fit(grown)
    fans = data.interactions.loc[data.interactions["item"] != twin].groupby("user")["item"].apply(list)
    scores = model.score(Histories.from_lists(fans.head(20).tolist(), grown.n_items))
    np.testing.assert_allclose(scores[:, -1], scores[:, twin], rtol=1e-5, atol=1e-6)
    ranks = (scores > scores[:, [-1]]).sum(axis=1)
    assert (scores[:, -1] > 0).all() and ranks.min() < 10  # it makes some top-10s with zero interactions


def test_fuserec_show_prints_a_top_k_from_a_time_reading_model(outputs: Path) -> None:
    """``fuserec run`` ends with ``show``; with stacking (which reads last_time) it once crashed there."""
    from typer.testing import CliRunner

    from fuserec.cli import app

    users = pd.read_parquet(Layout(outputs).clean / "users.parquet")["user_id"].astype(str)
    result = CliRunner().invoke(app, ["show", "--set", f"outputs={outputs}", "--user", users.iat[0]])
    assert result.exit_code == 0, result.output
    assert "from stacking" in result.output


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA: the refusal needs a provider that is absent")
def test_an_unavailable_provider_is_refused_not_silently_replaced(outputs: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"CUDAExecutionProvider.*not available"):
        create_app(outputs, tmp_path / "e.sqlite", providers=["CUDAExecutionProvider"])


def test_oversized_bodies_are_refused_before_parsing(client: TestClient) -> None:
    huge = b'{"history": [' + b'"1",' * 700_000 + b'"1"]}'
    response = client.post("/recommend", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "bytes" in response.json()["detail"]

    def stream():  # no content-length: counted as it arrives
        yield b'{"events": ['
        for _ in range(100):
            yield b'{"user_id": "x", "item_id": "1"},' * 1000
        yield b"]}"

    response = client.post("/events", content=stream(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.get("/health").status_code == 200  # and the service is fine


def test_explain_ranks_each_item_where_recommend_lists_it(outputs: Path, tmp_path: Path) -> None:
    """Low-rated and older items are seen, not positives: /explain must leave them out as /recommend does."""
    items = _catalog(outputs)
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        events = [{"user_id": "walk", "item_id": items[n], "timestamp": 1_000 + n} for n in range(4)]
        events += [
            {"user_id": "walk", "item_id": items[9], "kind": "rating", "rating": 1.0, "timestamp": 1_005}
        ]
        events += [{"user_id": "walk", "item_id": items[12], "kind": "dislike", "timestamp": 1_006}]
        assert client.post("/events", json={"events": events}).status_code == 200
        for user in ("walk", "0"):
            top = client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]
            for position, entry in enumerate(top, start=1):
                why = client.get("/explain", params={"user_id": user, "item_id": entry["item_id"]}).json()
                assert why["rank"] == position, (user, entry["item_id"], why["rank"], position)
        seen = client.get("/explain", params={"user_id": "walk", "item_id": items[9]}).json()
        assert seen["rank"] is None and seen["seen"] and not seen["in_history"]
