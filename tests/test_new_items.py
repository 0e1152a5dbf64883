"""New items without retraining, through the HTTP API: ``POST /items`` stores an item's metadata, the side
scorer (:mod:`fuserec.cold_items`) lists it for a user whose history it resembles, it survives a restart,
``GET /items/{id}`` lists it, bad input is a 422, and the evaluate stage scores what the service serves."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from fuserec.config import Params, load_params
from fuserec.layout import Layout
from fuserec.manifest import read_json
from fuserec.serving.app import create_app
from fuserec.serving.auth import HEADER, KeyRing
from fuserec.serving.store import Event, SQLiteEventStore

BUDGET = 0.05  # an operator who spends more validation NDCG on showing new items than the default


@pytest.fixture(scope="module")
def explore_run(serving_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Params:
    """The serving run exported again with ``export.new_items_budget`` at :data:`BUDGET`, then evaluated:
    a weight that lists new items where they match (the default budget lists few on this small run)."""
    from fuserec.stages.evaluate import evaluate
    from fuserec.stages.export import export

    root = tmp_path_factory.mktemp("explore")
    outputs = root / "outputs"
    shutil.copytree(serving_run, outputs, ignore=shutil.ignore_patterns(".cache"))
    params = load_params(
        serving_run.parent / "params.yaml", [f"outputs={outputs}", f"export.new_items_budget={BUDGET}"]
    )
    export(params)
    evaluate(params)
    return params


def _tables(outputs: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    layout = Layout(outputs)
    train = pd.read_parquet(layout.split_file("train"))
    users = pd.read_parquet(layout.clean / "users.parquet")
    catalog = pd.read_parquet(layout.export / "catalog.parquet")
    return train, users, catalog


def _fan(outputs: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any], list[str]]:
    """A new user whose history is the 20 catalogue items most like one popular film (by content), and
    an item described as that film is (a new id; its genres, tags, text and year): the user's events,
    the item, and the genres of the history."""
    from fuserec.features import item_content_vectors

    train, _, catalog = _tables(outputs)
    popularity = np.bincount(train["item"], minlength=len(catalog))
    anchor = int(np.argmax(popularity))
    vectors = item_content_vectors(catalog)
    near = np.argsort(-(vectors @ vectors[anchor]), kind="stable")
    liked = [int(i) for i in near if i != anchor and popularity[i] > 0][:20][::-1]  # the closest last
    ids = catalog["item_id"].astype(str).tolist()
    user_id = "fan-of-one-kind"
    events = [{"user_id": user_id, "item_id": ids[i], "timestamp": 10**9 + n} for n, i in enumerate(liked)]
    film = catalog.iloc[anchor]
    item = {
        "item_id": "900001",
        "title": f"Return of {film['title']}",
        "genres": str(film["genres"]).split("|"),
        "tags": [t for t in str(film["tags"]).split("|") if t],
        "text": str(film["text"]),
        "year": int(film["year"]),
    }
    genres = sorted({g for i in liked for g in str(catalog.iloc[i]["genres"]).split("|")})
    return user_id, events, item, genres


STRANGER = {  # nothing in common with any catalogue item: no genre, tag, word or year it knows
    "item_id": "900002",
    "title": "Qwxzy",
    "genres": ["Zzyzx"],
    "tags": ["vxqj"],
    "text": "plokta wibble",
    "year": 1901,
}


def _top(client: TestClient, user_id: str, k: int = 10) -> list[str]:
    response = client.post("/recommend", json={"user_id": user_id, "k": k})
    assert response.status_code == 200, response.text
    return [x["item_id"] for x in response.json()["items"]]


def test_an_item_like_a_users_favourites_reaches_their_top_10_with_no_retraining(
    explore_run: Params, tmp_path: Path
) -> None:
    outputs = explore_run.outputs_dir
    user_id, events, item, genres = _fan(outputs)
    model = Layout(outputs).export / "model.onnx"
    graph_bytes = model.read_bytes()
    store = tmp_path / "events.sqlite"
    with TestClient(create_app(outputs, store)) as client:
        assert client.post("/events", json={"events": events}).status_code == 200
        before = _top(client, user_id)
        stored = client.post("/items", json={"items": [item, STRANGER]})
        assert stored.status_code == 200 and stored.json() == {"added": 2, "updated": 0, "items": 2}
        body = client.post("/recommend", json={"user_id": user_id, "k": 10}).json()
        listed = {x["item_id"]: x for x in body["items"]}
        assert item["item_id"] in listed and STRANGER["item_id"] not in listed, [before, list(listed)]
        entry = listed[item["item_id"]]
        assert entry["added"] is True and entry["title"] == item["title"]
        assert set(entry["genres"]) == {g.lower() for g in item["genres"]}
        shares = entry["contributions"]  # the graph gives it nothing: the content-aware part is all of it
        assert shares["content"] == pytest.approx(entry["score"], rel=1e-6)
        assert set(shares) == set(read_json(Layout(outputs).export / "manifest.json")["components"])
        assert all(v == 0 for name, v in shares.items() if name != "content")
        assert set(genres) & set(item["genres"])  # it is like what the user liked
        # /explain knows it: its rank is where /recommend lists it, and it says how it was scored
        why = client.get("/explain", params={"user_id": user_id, "item_id": item["item_id"]})
        assert why.status_code == 200, why.text
        explained = why.json()
        assert explained["rank"] == list(listed).index(item["item_id"]) + 1
        assert explained["new_item"]["added"] is True and explained["new_item"]["similarity"] > 0.5
        assert explained["kg"]["available"] is False and explained["score"] == pytest.approx(entry["score"])
        stranger = client.get("/explain", params={"user_id": user_id, "item_id": STRANGER["item_id"]}).json()
        assert stranger["rank"] > 10 and stranger["new_item"]["similarity"] == 0.0
        # an event on the added item is accepted: it is seen (never listed again), the graph is untouched
        event = {"events": [{"user_id": user_id, "item_id": item["item_id"], "kind": "click"}]}
        assert client.post("/events", json=event).json() == {"stored": 1}
        after = client.post("/recommend", json={"user_id": user_id, "k": 10}).json()
        assert item["item_id"] not in [x["item_id"] for x in after["items"]]
        assert after["history_length"] == body["history_length"]  # the graph reads the catalogue part
    assert model.read_bytes() == graph_bytes  # no retraining, no re-export


def test_added_items_survive_a_restart_and_are_listed(explore_run: Params, tmp_path: Path) -> None:
    outputs = explore_run.outputs_dir
    user_id, events, item, _ = _fan(outputs)
    _, _, catalog = _tables(outputs)
    store = tmp_path / "events.sqlite"
    with TestClient(create_app(outputs, store)) as client:
        assert client.post("/events", json={"events": events}).status_code == 200
        assert client.post("/items", json={"items": [item]}).status_code == 200
        first = _top(client, user_id)
    with TestClient(create_app(outputs, store)) as client:  # a new app on the same store file
        got = client.get(f"/items/{item['item_id']}")
        assert got.status_code == 200
        listed = got.json()
        assert listed["source"] == "added" and listed["title"] == item["title"]
        assert listed["genres"] == item["genres"] and listed["year"] == item["year"]
        assert listed["text"] == item["text"] and listed["events"] == 0
        assert _top(client, user_id) == first and item["item_id"] in first
        trained = client.get(f"/items/{catalog['item_id'].astype(str).iat[3]}").json()
        assert trained["source"] == "trained" and trained["title"] == str(catalog["title"].iat[3])
        assert isinstance(trained["training_interactions"], int)
        missing = client.get("/items/999999")
        assert missing.status_code == 404 and "999999" not in missing.text


def test_a_real_server_keeps_added_items_when_killed(explore_run: Params, tmp_path: Path) -> None:
    import httpx

    from .test_serving import _free_port, _start_server

    outputs = explore_run.outputs_dir
    user_id, events, item, _ = _fan(outputs)
    store, log = tmp_path / "events.sqlite", tmp_path / "serve.log"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = _start_server(outputs, store, port, log)
    try:
        assert httpx.post(f"{base}/events", json={"events": events}).json() == {"stored": len(events)}
        assert httpx.post(f"{base}/items", json={"items": [item]}).json()["added"] == 1
        top = [
            x["item_id"] for x in httpx.post(f"{base}/recommend", json={"user_id": user_id}).json()["items"]
        ]
        assert item["item_id"] in top
    finally:
        process.kill()  # SIGKILL: only what was committed survives
        process.wait(timeout=30)
    process = _start_server(outputs, store, port, log)
    try:
        listed = httpx.get(f"{base}/items/{item['item_id']}").json()
        assert listed["source"] == "added" and listed["genres"] == item["genres"]
        again = httpx.post(f"{base}/recommend", json={"user_id": user_id}).json()["items"]
        assert [x["item_id"] for x in again] == top
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_added_id_is_updated_and_a_trained_id_is_refused(serving_run: Path, tmp_path: Path) -> None:
    _, _, catalog = _tables(serving_run)
    trained = str(catalog["item_id"].iat[-10])  # an id long enough not to occur in the message by chance
    with TestClient(create_app(serving_run, tmp_path / "e.sqlite")) as client:
        first = {"item_id": "900003", "title": "Fresh (2030)", "genres": ["Comedy"], "year": 2030}
        assert client.post("/items", json={"items": [first]}).json() == {"added": 1, "updated": 0, "items": 1}
        added_at = client.get("/items/900003").json()["added_at"]
        fixed = {**first, "genres": ["Drama"], "text": "a corrected description"}
        assert client.post("/items", json={"items": [fixed]}).json() == {"added": 0, "updated": 1, "items": 1}
        again = client.get("/items/900003").json()
        assert again["genres"] == ["Drama"] and again["text"] == "a corrected description"
        assert again["added_at"] == added_at
        refused = client.post("/items", json={"items": [{**first, "item_id": trained}]})
        assert refused.status_code == 409 and "trained catalogue" in refused.json()["detail"]
        assert trained not in refused.text
        twice = client.post("/items", json={"items": [first, first]})
        assert twice.status_code == 422 and "more than once" in twice.text
        # events and explicit histories may name added items; unknown ids are still refused
        ok = client.post("/events", json={"events": [{"user_id": "u", "item_id": "900003"}]})
        assert ok.status_code == 200
        history = ["900003", str(catalog["item_id"].iat[1])]
        assert client.post("/recommend", json={"history": history}).status_code == 200
        unknown = client.post("/events", json={"events": [{"user_id": "u", "item_id": "424242"}]})
        assert unknown.status_code == 422 and "POST /items" in unknown.text


def _too_many() -> dict[str, Any]:
    return {"items": [{"item_id": str(800_000 + n), "title": "t"} for n in range(1001)]}


SECRET = "s3cr3t-value"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"items": []}, "items"),
        (_too_many(), "items"),
        ({"items": [{"title": "no id"}]}, "item_id"),
        ({"items": [{"item_id": "", "title": "t"}]}, "item_id"),
        ({"items": [{"item_id": f"x{SECRET}", "title": "t"}]}, "item_id"),  # not an id the data accepts
        ({"items": [{"item_id": "007", "title": "t"}]}, "item_id"),  # not written canonically
        ({"items": [{"item_id": "1" * 19, "title": "t"}]}, "item_id"),
        ({"items": [{"item_id": "7000", "title": SECRET * 100}]}, "title"),
        ({"items": [{"item_id": "7000", "title": f"bad\x00{SECRET}"}]}, "title"),
        ({"items": [{"item_id": "7000", "genres": [f"Action|{SECRET}"]}]}, "genres"),
        ({"items": [{"item_id": "7000", "genres": [""]}]}, "genres"),
        ({"items": [{"item_id": "7000", "genres": ["g"] * 51}]}, "genres"),
        ({"items": [{"item_id": "7000", "tags": [SECRET * 10]}]}, "tags"),
        ({"items": [{"item_id": "7000", "year": 99999}]}, "year"),
        ({"items": [{"item_id": "7000", "year": SECRET}]}, "year"),
        ({"items": [{"item_id": "7000", "text": SECRET * 2000}]}, "text"),
        ({"items": [{"item_id": "7000", "text": f"{SECRET}\x07"}]}, "text"),
        ({"items": [{"item_id": "7000"}]}, "at least one of title, genres, tags, text or year"),
        ({"items": [{"item_id": "7000", "title": "t", SECRET: 1}]}, SECRET),  # the unknown field's name
    ],
)
def test_bad_items_get_a_422_naming_the_field_never_the_value(
    serving_run: Path, tmp_path: Path, payload: dict[str, Any], field: str
) -> None:
    with TestClient(create_app(serving_run, tmp_path / "e.sqlite")) as client:
        response = client.post("/items", json=payload)
        assert response.status_code == 422, response.text
        assert field in response.text
        if field != SECRET:
            assert SECRET not in response.text  # what was sent is never echoed
        assert client.get("/items/7000").status_code == 404  # nothing was stored


def test_items_routes_follow_the_scopes_of_events_and_recommend(serving_run: Path, tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path / "keys.json")
    reader, writer = ring.add("web", ["read"]), ring.add("events", ["write"])
    body = {"items": [{"item_id": "900004", "title": "Scoped (2031)", "genres": ["Drama"]}]}
    app = create_app(serving_run, tmp_path / "e.sqlite", keys=KeyRing.load(tmp_path / "keys.json"))
    with TestClient(app) as client:
        assert client.post("/items", json=body).status_code == 401
        assert client.post("/items", json=body, headers={HEADER: reader}).status_code == 403
        assert client.post("/items", json=body, headers={HEADER: writer}).status_code == 200
        assert client.get("/items/900004", headers={HEADER: writer}).status_code == 403
        assert client.get("/items/900004", headers={HEADER: reader}).json()["source"] == "added"


def test_a_store_from_before_added_items_gains_the_table_and_keeps_its_events(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(  # the schema before this change: events and meta only
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, "
        "item_id TEXT NOT NULL, kind TEXT NOT NULL, rating REAL, timestamp INTEGER NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO events (user_id, item_id, kind, rating, timestamp) VALUES ('u', 'i', 'click', NULL, 5);"
        "INSERT INTO meta VALUES ('note', 'kept');"
    )
    db.commit()
    db.close()
    store = SQLiteEventStore(path)
    try:
        assert store.count() == 1 and store.meta("note") == "kept" and store.items() == []
        from fuserec.serving.store import ItemRecord

        assert store.upsert_items([ItemRecord("n1", "New", ("Drama",), (), "", 2020)], now=7) == (1, 0)
        store.append([Event("u", "n1", 6, "click")])
        assert store.event_counts(["n1", "i", "none"]) == {"n1": 1, "i": 1}
    finally:
        store.close()
    reopened = SQLiteEventStore(path)
    try:
        (record,) = reopened.items()
        assert (record.item_id, record.genres, record.year, record.added_at) == ("n1", ("Drama",), 2020, 7)
    finally:
        reopened.close()


def test_the_served_row_measures_what_the_service_serves(explore_run: Params, tmp_path: Path) -> None:
    """The evaluate stage's ranking of a test user (graph, then the side scorer's merge) is the list
    ``/recommend`` returns for the same history, item for item; and metrics.json shows the side scorer."""
    from fuserec.data.dataset import Dataset
    from fuserec.metrics import top_k
    from fuserec.onnx_model import OnnxRecommender
    from fuserec.serving.service import RecommendIn, Service
    from fuserec.stages.evaluate import GRAPH_ALONE, latest_times, served_scorers

    outputs = explore_run.outputs_dir
    layout = Layout(outputs)
    manifest = read_json(layout.export / "manifest.json")
    assert manifest["cold_items"]["weight"] > 0, manifest["cold_items"]
    data = Dataset.load(layout.clean, interactions=layout.split_file("train"))
    test = pd.read_parquet(layout.split_file("test"))
    users = np.unique(test["user"].to_numpy())
    session = OnnxRecommender(layout.export / "model.onnx")
    max_history = int(manifest["max_history"])

    def graph(batch: Any) -> np.ndarray:
        return session.run(batch.to_padded(max_history), latest_times(batch))[0]

    scorers = served_scorers(layout, manifest, "stacking", graph, max_history)
    batch = data.histories().select(users)
    merged = scorers["stacking"](batch)
    alone = scorers[GRAPH_ALONE](batch)
    served = top_k(merged[:, : data.n_items], 10, exclude=batch.to_csr())
    changed = np.flatnonzero((served != top_k(alone, 10, exclude=batch.to_csr())).any(axis=1))
    assert len(changed) > 0  # the side scorer changed some lists: the comparison below means something
    ids = data.items["item_id"].astype(str).to_numpy()
    last = latest_times(batch)
    service = Service(outputs, tmp_path / "e.sqlite")
    try:
        for row in [*changed[:5], 0]:
            history = [str(ids[i]) for i in batch.user(row)]
            got = service.recommend(RecommendIn(history=history, k=10, time=int(last[row])))
            assert [x["item_id"] for x in got["items"]] == [str(ids[i]) for i in served[row]], row
    finally:
        service.close()
    row = read_json(layout.metrics)["served"]
    side = row["side_scorer"]
    assert side["weight"] == manifest["cold_items"]["weight"] and side["new_items_per_list@10"] > 0
    assert "new_items" in row["segments"] and "new_items" in side["graph_alone"]["segments"]
    assert row["largest_difference_from_python"] <= 1e-3  # the graph alone still equals its Python row


def test_the_worker_merges_a_batch_as_each_request_would_be_merged_alone(
    explore_run: Params, tmp_path: Path
) -> None:
    """The scoring worker merges the side scorer into a whole batch at once; every user's list and
    shares must be what merging that user's request alone gives (an added item included)."""
    import asyncio

    from fuserec.serving.service import RecommendIn

    outputs = Path(explore_run.outputs_dir)
    user_id, events, item, _ = _fan(outputs)
    _, users, _ = _tables(outputs)
    with TestClient(create_app(outputs, tmp_path / "e.sqlite")) as client:
        assert client.post("/events", json={"events": events}).status_code == 200
        assert client.post("/items", json={"items": [item]}).status_code == 200
        service = client.app.state.deployment.current  # type: ignore[attr-defined]
        ids = [user_id, *users["user_id"].astype(str).tolist()[:11]]
        requests = [RecommendIn(user_id=u, k=20, time=2**33) for u in ids]

        async def together() -> list[dict[str, Any]]:  # concurrent: the worker batches them
            return await asyncio.gather(*(service.recommend_async(r) for r in requests))

        merged_rows: list[int] = []
        hook = service.batcher.hook

        def counting(scores: Any, parts: Any, contexts: list[Any]) -> Any:
            merged_rows.append(len(contexts))
            return hook(scores, parts, contexts)

        service.batcher.hook = counting
        runs = service.batcher.runs
        batched = asyncio.run(together())
        assert sum(merged_rows) == len(requests)  # every request was merged by the worker
        assert service.batcher.runs - runs < len(requests)  # and some batch held several of them
        for request, got in zip(requests, batched, strict=True):
            alone = service.recommend(request)  # no context: merged in finish, one request
            assert [x["item_id"] for x in got["items"]] == [x["item_id"] for x in alone["items"]]
            for a, b in zip(got["items"], alone["items"], strict=True):
                assert a["score"] == pytest.approx(b["score"], rel=1e-6, abs=1e-6)
                assert a["contributions"] == pytest.approx(b["contributions"], rel=1e-5, abs=1e-6)
        assert "900001" in [x["item_id"] for x in batched[0]["items"]]
