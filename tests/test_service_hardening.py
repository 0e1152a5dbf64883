"""The service in production conditions: cancelled and slow requests, overload, keys and scopes, event
integrity, a store that cannot write, a model file that changed, and reloads under load."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fuserec.config import ServeConfig
from fuserec.layout import Layout
from fuserec.serving.app import create_app
from fuserec.serving.auth import HEADER, KeyRing
from fuserec.serving.batcher import Batcher, Overloaded
from fuserec.serving.store import Event, SQLiteEventStore


class SlowModel:
    """Stands in for the ONNX model: every run takes ``delay`` seconds."""

    outputs = ("scores",)
    feature_names: tuple[str, ...] = ()  # reads no user attributes

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def run(
        self, padded: np.ndarray, times: np.ndarray, features: np.ndarray | None = None
    ) -> list[np.ndarray]:
        time.sleep(self.delay)
        return [np.tile(np.arange(5, dtype=np.float32), (len(padded), 1))]


def _catalog(outputs: Path) -> list[str]:
    return pd.read_parquet(Layout(outputs).export / "catalog.parquet")["item_id"].astype(str).tolist()


# -- the scoring worker ------------------------------------------------------------------------------------
def test_a_request_cancelled_in_the_queue_or_mid_run_never_stops_the_worker() -> None:
    batcher = Batcher(SlowModel(0.3), max_batch=1)  # type: ignore[arg-type]
    try:
        running = batcher.submit([1], 0)
        time.sleep(0.05)  # the worker has taken it
        queued = batcher.submit([2], 0)
        assert queued.cancel()  # still queued: withdrawn
        assert not running.cancel()  # running: too late to withdraw, and that must be harmless
        assert running.result(timeout=5).scores.shape == (5,)
        assert batcher.score([3], 0, timeout=5).scores.shape == (5,)
        assert batcher.alive and batcher.skipped == 1
    finally:
        batcher.close()
    assert not batcher.alive


def test_asyncio_timeouts_cancel_wrapped_futures_without_harm() -> None:
    """``asyncio.wait_for`` over ``wrap_future`` cancels the concurrent future: the path that once killed
    the worker with InvalidStateError."""
    batcher = Batcher(SlowModel(0.2), max_batch=1)  # type: ignore[arg-type]

    async def scenario() -> None:
        for _ in range(3):  # running and queued requests time out together
            waits = [asyncio.wait_for(asyncio.wrap_future(batcher.submit([i], 0)), 0.05) for i in range(3)]
            results = await asyncio.gather(*waits, return_exceptions=True)
            assert all(isinstance(r, TimeoutError) for r in results)
        done = await asyncio.wait_for(asyncio.wrap_future(batcher.submit([9], 0)), 5)
        assert done.scores.shape == (5,)

    try:
        asyncio.run(scenario())
        assert batcher.alive
    finally:
        batcher.close()


def test_a_full_queue_refuses_at_once() -> None:
    batcher = Batcher(SlowModel(0.3), max_batch=1, queue_size=2)  # type: ignore[arg-type]
    try:
        first = batcher.submit([1], 0)
        time.sleep(0.05)
        batcher.submit([2], 0), batcher.submit([3], 0)
        started = time.perf_counter()
        with pytest.raises(Overloaded):
            batcher.submit([4], 0)
        assert time.perf_counter() - started < 0.05
        first.result(timeout=5)
    finally:
        batcher.close()


def test_requests_that_waited_too_long_are_refused_not_scored_late() -> None:
    batcher = Batcher(SlowModel(0.3), max_batch=1, max_wait=0.1)  # type: ignore[arg-type]
    try:
        first = batcher.submit([1], 0)
        time.sleep(0.02)
        late = batcher.submit([2], 0)  # waits ~0.3 s behind the first: over max_wait when reached
        assert first.result(timeout=5).scores.shape == (5,)
        with pytest.raises(Overloaded, match="waited over 100 ms"):
            late.result(timeout=5)
        assert batcher.shed == 1 and batcher.runs == 1  # the late one never reached the model
        assert batcher.score([3], 0, timeout=5).scores.shape == (5,)  # an idle worker serves at once
    finally:
        batcher.close()


def test_callers_own_batches_run_one_at_a_time_beside_the_worker() -> None:
    """Explanations' leave-one-out batches never run two at once (bounded memory) and do not queue behind
    the worker's batches (both cores busy)."""
    running, most = [0], [0]
    lock = threading.Lock()

    class Counting(SlowModel):
        def run(
            self, padded: np.ndarray, times: np.ndarray, features: np.ndarray | None = None
        ) -> list[np.ndarray]:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                return super().run(padded, times)
            finally:
                with lock:
                    running[0] -= 1

    batcher = Batcher(Counting(0.1), max_batch=8)  # type: ignore[arg-type]
    try:
        from concurrent.futures import ThreadPoolExecutor

        single = batcher.submit([1], 0)
        with ThreadPoolExecutor(4) as pool:
            groups = list(pool.map(lambda n: batcher.score_many([[n], [n + 1]], [0, 0], 5), range(4)))
        assert all(len(g) == 2 for g in groups) and single.result(timeout=5).scores.shape == (5,)
        assert most[0] == 2  # the worker's run and one caller's batch, never more
    finally:
        batcher.close()


def _slow_asgi(seconds: float, seen: list[int]) -> Any:
    """An ASGI app that answers 200 after ``seconds``, recording how many requests it holds at once."""
    holding = [0]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        holding[0] += 1
        seen.append(holding[0])
        await asyncio.sleep(seconds)
        holding[0] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_a_flood_lowers_the_limit_until_it_ends_and_closed_loop_clients_never_trigger_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fuserec.serving import admission

    monkeypatch.setattr(admission, "WINDOW_S", 0.2)
    seen: list[int] = []
    changes: list[bool] = []
    gate = admission.Admission(_slow_asgi(0.02, seen), 10, 2, 1, frozenset({"/health"}), changes.append)

    async def closed_loop(client: httpx.AsyncClient, until: float) -> list[int]:
        codes = []
        while time.monotonic() < until:
            codes.append((await client.get("/x")).status_code)
        return codes

    async def scenario() -> tuple[list[int], bool, list[int], list[int], list[int]]:
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            until = time.monotonic() + 1.0  # 10 closed-loop clients: exactly the limit, never a flood
            calm = [
                c for cs in await asyncio.gather(*(closed_loop(client, until) for _ in range(10))) for c in cs
            ]
            flooded_while_calm = gate.flooded or bool(changes)
            seen.clear()
            flood: list[asyncio.Task[httpx.Response]] = []
            for _ in range(120):  # open loop for 1.2 s: 1,500/s against 500/s of capacity (10 / 20 ms)
                flood += [asyncio.create_task(client.get("/x")) for _ in range(15)]
                await asyncio.sleep(0.01)
            codes = [r.status_code for r in await asyncio.gather(*flood)]
            held_late = seen[-40:]  # the last 0.4 s: long after the flood was recognised
            await asyncio.sleep(0.45)  # a quiet window, then closed-loop clients again: the limit is back
            until = time.monotonic() + 0.5
            after = [
                c for cs in await asyncio.gather(*(closed_loop(client, until) for _ in range(10))) for c in cs
            ]
            return calm, flooded_while_calm, codes, held_late, after

    calm, flooded_while_calm, codes, held_late, after = asyncio.run(scenario())
    assert set(calm) == {200} and not flooded_while_calm
    assert set(codes) == {200, 503} and gate.refused > 0
    assert max(held_late) <= 2  # once the flood is recognised, at most flood_limit at once
    assert set(after) == {200} and changes == [True, False] and not gate.flooded


# -- through the app ---------------------------------------------------------------------------------------
def _app(outputs: Path, tmp_path: Path, keys: KeyRing | None = None, **settings: Any) -> FastAPI:
    return create_app(outputs, tmp_path / "events.sqlite", settings=ServeConfig(**settings), keys=keys)


def _slow_runs(monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    original = Batcher._run

    def slow(self: Batcher, *args: Any) -> Any:
        time.sleep(delay)
        return original(self, *args)

    monkeypatch.setattr(Batcher, "_run", slow)


def test_a_slow_model_answers_504_and_the_service_goes_on(
    serving_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _catalog(serving_run)
    with TestClient(_app(serving_run, tmp_path, request_timeout_s=0.2)) as client:
        _slow_runs(monkeypatch, 0.6)
        slow = client.post("/recommend", json={"history": items[:3]})
        assert slow.status_code == 504 and "request_timeout_s" in slow.json()["detail"]
        explain = client.get("/explain", params={"user_id": "0", "item_id": items[5]})
        assert explain.status_code in (200, 504)  # a cold user needs no model run
        monkeypatch.undo()
        time.sleep(0.7)  # the timed-out batch finishes into the void
        assert client.post("/recommend", json={"history": items[:3]}).status_code == 200
        assert client.get("/ready").json()["ready"] is True


def test_ready_fails_when_the_worker_is_not_alive(serving_run: Path, tmp_path: Path) -> None:
    with TestClient(_app(serving_run, tmp_path)) as client:
        assert client.get("/ready").status_code == 200
        client.app.state.deployment.current.batcher.close()  # type: ignore[attr-defined]
        ready = client.get("/ready")
        assert (
            ready.status_code == 503 and ready.json()["ready"] is False and "worker" in ready.json()["reason"]
        )
        assert client.get("/health").status_code == 200  # alive, not ready


async def _burst(app: FastAPI, requests: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:
        return list(await asyncio.gather(*(client.request(m, p, json=b) for m, p, b in requests)))


def test_overload_is_a_fast_503_with_retry_after(
    serving_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _catalog(serving_run)
    app = _app(serving_run, tmp_path, queue_size=2, max_batch=1, max_inflight=6)
    _slow_runs(monkeypatch, 0.2)
    try:
        burst = [("POST", "/recommend", {"history": items[i : i + 2]}) for i in range(12)]
        responses = asyncio.run(_burst(app, burst))
    finally:
        app.state.deployment.close()
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "overloaded" in r.json()["detail"] for r in refused)
    assert sum(c == 200 for c in codes) >= 2  # what the queue holds is answered


def test_a_flood_bounds_the_queue_wait_and_a_reloaded_service_inherits_it(
    serving_run: Path, tmp_path: Path
) -> None:
    app = _app(serving_run, tmp_path, max_queue_wait_ms=0, flood_queue_wait_ms=7)
    deployment = app.state.deployment
    try:
        assert deployment.current.batcher.max_wait == 0
        app.state.on_flood(True)
        assert deployment.current.batcher.max_wait == pytest.approx(0.007)
        deployment.reload()
        assert deployment.current.batcher.max_wait == pytest.approx(0.007)
        app.state.on_flood(False)
        assert deployment.current.batcher.max_wait == 0
    finally:
        deployment.close()


# -- keys and scopes ---------------------------------------------------------------------------------------
def test_keys_and_scopes_guard_every_route(serving_run: Path, tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path / "keys.json")
    reader, writer, admin = (
        ring.add("web", ["read"]),
        ring.add("events", ["write"]),
        ring.add("ops", ["admin"]),
    )
    stored = (tmp_path / "keys.json").read_text()
    assert reader not in stored and writer not in stored and "sha256" in stored  # hashes only
    items = _catalog(serving_run)
    event = {"events": [{"user_id": "u1", "item_id": items[0]}]}
    with TestClient(_app(serving_run, tmp_path, keys=KeyRing.load(tmp_path / "keys.json"))) as client:

        def call(method: str, path: str, key: str | None, **kw: Any) -> int:
            headers = {HEADER: key} if key else {}
            return client.request(method, path, headers=headers, **kw).status_code

        assert call("POST", "/recommend", None, json={"user_id": "u1"}) == 401
        assert call("POST", "/recommend", "frk_wrong", json={"user_id": "u1"}) == 401
        assert call("POST", "/recommend", reader, json={"user_id": "u1"}) == 200
        assert call("GET", "/explain", reader, params={"user_id": "u1", "item_id": items[1]}) == 200
        assert call("POST", "/events", reader, json=event) == 403
        assert call("POST", "/events", writer, json=event) == 200
        assert call("POST", "/recommend", writer, json={"user_id": "u1"}) == 403
        assert call("GET", "/events", reader, params={"user_id": "u1"}) == 403
        assert call("GET", "/events", admin, params={"user_id": "u1"}) == 200
        assert call("POST", "/admin/reload", writer) == 403
        assert call("POST", "/admin/reload", admin) == 200
        assert call("GET", "/health", None) == 200 and call("GET", "/ready", None) == 200
        schema = client.get("/openapi.json").json()
    scheme = next(iter(schema["components"]["securitySchemes"].values()))
    assert scheme == {**scheme, "type": "apiKey", "in": "header", "name": HEADER}
    assert schema["paths"]["/recommend"]["post"]["security"]


def test_without_keys_only_loopback_is_served(serving_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fuserec.cli import app

    with pytest.raises(PermissionError, match="fuserec keys add"):
        create_app(serving_run, tmp_path / "e.sqlite", host="0.0.0.0")
    args = [
        "serve",
        "--outputs",
        str(serving_run),
        "--host",
        "0.0.0.0",
        "--params",
        str(tmp_path / "none.yaml"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "fuserec keys add" in result.output
    assert not (tmp_path / "e.sqlite").exists()  # refused before anything was opened


# -- event integrity ---------------------------------------------------------------------------------------
def test_events_are_checked_dated_and_read_as_of_the_request(serving_run: Path, tmp_path: Path) -> None:
    items = _catalog(serving_run)
    now = int(time.time())
    with TestClient(_app(serving_run, tmp_path, clock_skew_s=60)) as client:

        def post(*events: dict[str, Any]) -> httpx.Response:
            return client.post("/events", json={"events": list(events)})

        future = post({"user_id": "a", "item_id": items[0], "timestamp": now + 3600})
        assert future.status_code == 422 and "clock_skew_s" in future.text
        assert post({"user_id": "a", "item_id": items[0], "timestamp": now + 30}).status_code == 200
        assert post({"user_id": "z", "item_id": items[1], "timestamp": 0}).status_code == 200
        stored = client.get("/events", params={"user_id": "z"}).json()["events"]
        assert [e["timestamp"] for e in stored] == [0]  # 0 is a time, not "missing"
        assert post({"user_id": "a", "item_id": items[0], "kind": "bought"}).status_code == 422
        assert post({"user_id": "a", "item_id": items[0], "kind": "rating"}).status_code == 422  # no rating

        # as of T: only events at or before T are read
        post(
            {"user_id": "t", "item_id": items[2], "timestamp": 1_000},
            {"user_id": "t", "item_id": items[3], "timestamp": 3_000},
        )
        early = client.post("/recommend", json={"user_id": "t", "time": 2_000, "k": 50}).json()
        late = client.post("/recommend", json={"user_id": "t", "time": 4_000, "k": 50}).json()
        assert early["history_length"] == 1 and late["history_length"] == 2

        # a dislike or a low rating is seen, never a positive
        post(
            {"user_id": "d", "item_id": items[4], "kind": "dislike"},
            {"user_id": "d", "item_id": items[5], "kind": "rating", "rating": 1.0},
        )
        disliked = client.post("/recommend", json={"user_id": "d", "k": 100}).json()
        assert disliked["history_length"] == 0
        assert not {items[4], items[5]} & {x["item_id"] for x in disliked["items"]}
        post({"user_id": "d", "item_id": items[6], "kind": "like"})
        assert client.post("/recommend", json={"user_id": "d"}).json()["history_length"] == 1


def test_ratings_outside_the_validated_range_are_refused(serving_run: Path, tmp_path: Path) -> None:
    items = _catalog(serving_run)
    with TestClient(_app(serving_run, tmp_path)) as client:
        service = client.app.state.deployment.current  # type: ignore[attr-defined]
        assert service.rating_range is not None  # the export records the validated range
        low, high = service.rating_range
        for rating, code in ((high, 200), (low, 200), (high + 0.5, 422), (low - 1.0, 422)):
            body = {"events": [{"user_id": "r", "item_id": items[0], "kind": "rating", "rating": rating}]}
            assert client.post("/events", json=body).status_code == code, rating


def test_the_store_is_bounded_per_user_and_by_age(tmp_path: Path) -> None:
    store = SQLiteEventStore(tmp_path / "e.sqlite", history_cap=3)
    store.append([Event("u", f"i{n}", 100 + n) for n in range(5)])
    store.append([Event("v", "x", 10)])
    assert [e.item_id for e in store.events("u", 10)] == ["i2", "i3", "i4"]
    assert store.prune(before=102) == 1  # v's event is older than the window; u's kept ones are not
    assert store.count() == 3
    store.close()


def test_a_store_that_cannot_write_refuses_events_and_keeps_recommending(
    serving_run: Path, tmp_path: Path
) -> None:
    items = _catalog(serving_run)
    with TestClient(_app(serving_run, tmp_path)) as client:
        store = client.app.state.deployment.store  # type: ignore[attr-defined]
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here on
        before = store.count()
        many = [{"user_id": f"full{n}", "item_id": items[n % 10]} for n in range(500)]
        refused = client.post("/events", json={"events": many})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "nothing was stored" in refused.json()["detail"] and store.count() == before
        assert client.post("/recommend", json={"user_id": "0"}).status_code == 200
        assert client.post("/recommend", json={"history": items[:2]}).status_code == 200


# -- the model's lifecycle ---------------------------------------------------------------------------------
def test_a_model_file_that_changed_after_export_is_refused(serving_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(serving_run / "model", copy / "model")
    with open(copy / "model" / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(RuntimeError, match="sha256"):
        create_app(copy, tmp_path / "e.sqlite")


def _promote(run: Path, served: Path) -> None:
    from fuserec.stages.promote import promote_candidate

    decision = promote_candidate(run, served, algorithm="stacking", tolerance=1.0)
    assert decision.promoted, decision.reason


def test_events_outlive_promotions_and_restarts(serving_run: Path, tmp_path: Path) -> None:
    from fuserec.serving.service import default_store

    served = tmp_path / "served"
    _promote(serving_run, served)
    settings = ServeConfig()
    store = default_store(settings, served)
    assert store.parent == served and not store.is_relative_to(served / "current")
    items = _catalog(serving_run)
    posted = [{"user_id": "keep", "item_id": items[n], "timestamp": 1_000 + n} for n in range(6)]
    with TestClient(create_app(served / "current", store, settings=settings)) as client:
        assert client.post("/events", json={"events": posted[:3]}).status_code == 200
    _promote(serving_run, served)
    with TestClient(create_app(served / "current", store, settings=settings)) as client:
        assert client.post("/events", json={"events": posted[3:]}).status_code == 200
    _promote(serving_run, served)
    with TestClient(create_app(served / "current", store, settings=settings)) as client:
        back = client.get("/events", params={"user_id": "keep"}).json()["events"]
    assert [(e["item_id"], e["timestamp"]) for e in back] == [(p["item_id"], p["timestamp"]) for p in posted]


def test_a_promotion_under_load_swaps_the_model_with_no_failed_request(
    serving_run: Path, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    _promote(serving_run, served)
    items = _catalog(serving_run)
    app = create_app(served / "current", tmp_path / "e.sqlite", settings=ServeConfig(watch_s=0.2))
    deployment = app.state.deployment
    codes: list[int] = []

    async def load(stop: threading.Event) -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:

            async def one_client(n: int) -> None:
                while not stop.is_set():
                    r = await client.post("/recommend", json={"history": items[n : n + 3], "k": 5})
                    codes.append(r.status_code)

            async def promote_twice() -> None:
                for _ in range(2):
                    await asyncio.sleep(0.5)
                    await asyncio.to_thread(_promote, serving_run, served)
                    r = await client.post("/admin/reload")
                    assert r.status_code == 200, r.text
                await asyncio.sleep(0.5)
                stop.set()

            await asyncio.gather(*(one_client(n) for n in range(4)), promote_twice())

    try:
        asyncio.run(load(threading.Event()))
    finally:
        deployment.close()
    assert deployment.reloads == 2 and len(codes) > 20
    assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert deployment.loaded[0] == str((served / "current").resolve())


def test_a_watching_service_loads_a_promoted_model_by_itself(serving_run: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    _promote(serving_run, served)
    app = create_app(served / "current", tmp_path / "e.sqlite", settings=ServeConfig(watch_s=0.1))
    with TestClient(app) as client:
        first = client.get("/ready").json()
        app.state.model_info.info({"version": "stale", "name": "stale"})  # a reload must relabel it
        _promote(serving_run, served)
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["reloads"] == first["reloads"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/ready").json()["reloads"] == first["reloads"] + 1
        metrics = client.get("/metrics").text
        assert "stale" not in metrics and f'version="{first["sha256"][:12]}"' in metrics
        assert client.post("/recommend", json={"user_id": "0"}).status_code == 200
