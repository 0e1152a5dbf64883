"""Serving speed of an exported model: onnxruntime against torch eager, and the HTTP API under load.

Usage (from the repository root, after a run whose outputs hold the exported model):
    python benchmarks/serving.py --outputs /tmp/ml/flow/s42c [--seconds 5] [--json out.json]

One run measures, on this machine:
- single-history latency (p50, p99 over ``--n`` real training histories) of onnxruntime and of the same
  model in torch eager (the fuser's or plugin's ``to_torch()`` inside the export wrapper);
- batched throughput (users/s) at batch 256 of both;
- ``POST /recommend`` through ``fuserec serve`` (uvicorn, its own process) on 127.0.0.1 (a free port) at
  each of ``--levels`` concurrent keep-alive clients (asyncio, raw HTTP/1.1; 1, 16 and 64 always), each
  level for ``--seconds``: p50, p99, requests/s, errors, and the CPU ms per request of the server and of
  the clients (they share the cores); then ``within_slo``: the most requests/s of a level with p99 <= 50 ms
  and no errors (throughput under a latency objective);
- overload (unless ``--skip-overload``), on the same server: open-loop ``POST /recommend`` (requests sent on
  a fixed schedule whatever the answers; 75% stored users, 25% explicit histories) at 3x the 16-client rate C
  for ``--overload-seconds`` (60), from ``--overload-generators`` (2) processes, while another process polls
  ``GET /health`` every 100 ms. Every answer must be a 200 or a 503 (no other status, broken connection, or
  request unanswered after serve.request_timeout_s + 1 s), the 200s' p99 at most 4x the 1-client p99, and
  /health's p99 and max under 50 ms; the offered rate says whether the generators reached 3x C, and the CPU
  seconds of server, generators and other processes say who had the cores.
It prints what it saw, and whether the serving targets were met (ORT p99 <= 5 ms, HTTP p99 <= 50 ms at 16
clients with no errors, ORT at least as fast as torch at batch 256), then the overload phase's lines, the
last of them ``overload: PASS`` or ``overload: FAIL (...)``; ``--json`` holds it all (``overload`` key).
The exit status stays 0 either way, as for the targets.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LEVELS = (1, 16, 64)  # always measured (the overload phase and the targets read them); --levels adds more
SLO_P99_MS = 50.0


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _ms(seconds: list[float] | np.ndarray) -> dict[str, float | None]:
    """p50, p99 and max in ms; None for an empty sample (nothing of that kind was answered)."""
    ms = np.asarray(seconds, dtype=float) * 1000.0
    if ms.size == 0:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


# -- the server under test, shared with benchmarks/soak.py ----------------------------------------------
# No API keys: with no keys file the service runs open, which it allows on loopback only (where it runs here).
NO_KEYS = "serve.keys_file=/nonexistent/fuserec-benchmark-keys.json"
# --set settings every server started here gets (--server-set adds; --legacy-server empties it for a commit
# whose `fuserec serve` predates the serve: section)
SERVER_SETTINGS = [NO_KEYS]


def ok_rate(level: dict) -> float:
    """Requests per second that got an answer other than an error (a 503 is quick, not capacity)."""
    requests = max(int(level["requests"]), 1)
    return float(level["requests_per_s"]) * (requests - int(level["errors"])) / requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_settings(overrides: list[str] | None = None, params: Path = Path("params.yaml")) -> Any:
    """The ``serve:`` settings the server started by :class:`Server` reads (``params`` plus ``overrides``),
    as ``fuserec serve`` loads them: its limits (request_timeout_s, max_inflight, ...) decide the checks."""
    from fuserec.config import Params, load_params

    sets = [*SERVER_SETTINGS, *(overrides or [])]
    settings = load_params(params, sets, check_plugins=False) if params.exists() else Params()
    return settings.serve


def describe_outputs(outputs: Path) -> dict:
    """What an outputs folder serves: model, catalogue, and the cleaned data's shape (is it ML-100k?)."""
    from fuserec.layout import Layout
    from fuserec.manifest import read_json

    layout = Layout(outputs)
    manifest_file = layout.export / "manifest.json"
    if not manifest_file.exists():
        raise SystemExit(
            f"{outputs} holds no exported model ({manifest_file} is missing): give --outputs a finished "
            "run's outputs folder, e.g. one from `fuserec run` on ../shared/data/ml-100k"
        )
    manifest = read_json(manifest_file)
    summary_file = layout.clean / "summary.json"
    summary = read_json(summary_file) if summary_file.exists() else {}
    out = {
        "outputs": str(Path(outputs).resolve()),
        "model": manifest["algorithm"]["name"],
        "components": manifest.get("components") or [manifest["algorithm"]["name"]],
        "sha256": str(manifest.get("sha256", ""))[:12],
        "items": manifest["n_items"],
        "users": summary.get("users"),
        "rows": summary.get("rows_in"),
    }
    # ML-100k: 100,000 ratings by 943 users of 1,682 films
    out["ml100k"] = (out["rows"], out["users"], out["items"]) == (100_000, 943, 1682)
    return out


class Server:
    """``fuserec serve`` in its own process on 127.0.0.1 (a free port); :meth:`stop` / :meth:`kill` end it."""

    def __init__(self, process: subprocess.Popen, port: int, command: list[str]) -> None:
        self.process = process
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.command = command
        self.users: list[str] = []  # the client ids the load sends (client_users)

    @classmethod
    def start(
        cls,
        outputs: Path,
        store: Path,
        *,
        max_batch: int | None = None,
        threads: int | None = None,
        overrides: list[str] | None = None,
        log: Path | None = None,
        port: int | None = None,
        timeout: float = 180.0,
    ) -> Server:
        """Start it and wait until ``/health`` answers (``RuntimeError`` when it exits or never does).

        ``log``: where its output goes (default: nowhere; the access log costs the server the same either
        way). ``overrides``: ``serve.x=y`` settings, as ``--set``.
        """
        port = port or free_port()
        command = [
            sys.executable,
            "-c",
            "from fuserec.cli import app; app()",
            "serve",
            "--outputs",
            str(outputs),
        ]
        command += ["--store", str(store), "--port", str(port)]
        if max_batch is not None:
            command += ["--max-batch", str(max_batch)]
        if threads is not None:
            command += ["--threads", str(threads)]
        for setting in [*SERVER_SETTINGS, *(overrides or [])]:
            command += ["--set", setting]
        sink = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the child holds it)
        try:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        finally:
            if log is not None:
                sink.close()
        server = cls(process, port, command)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.kill()
            raise
        return server

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fuserec serve did not start") from None
            time.sleep(0.3)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stop(self) -> None:
        """SIGTERM (uvicorn's graceful shutdown), then SIGKILL if it has not exited in 30 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL, no shutdown of any kind."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def request_bytes(method: str, path: str, payload: Any = None) -> bytes:
    """One HTTP/1.1 keep-alive request, ready to write."""
    body = b"" if payload is None else json.dumps(payload).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if payload is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# uvicorn closes a keep-alive connection idle for 5 s (timeout_keep_alive); a request written just then
# meets a closed socket, a client-side race. The open-loop pools reuse no connection idle for longer than:
IDLE_S = 2.0


class Connection:
    """A bare keep-alive HTTP/1.1 connection (asyncio streams): far cheaper per request than httpx, which
    matters when the load generator shares the cores with the server."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.open = True
        self.used = time.monotonic()

    @property
    def stale(self) -> bool:
        """Idle long enough that the server may be closing it (see ``IDLE_S``)."""
        return time.monotonic() - self.used > IDLE_S

    @classmethod
    async def connect(cls, port: int) -> Connection:
        import asyncio

        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Write one request and read its response: (status, body). A server that says ``Connection:
        close`` leaves this connection closed (:attr:`open` false). Raises ``OSError``,
        ``asyncio.IncompleteReadError`` or ``ValueError`` on a broken exchange."""
        self.writer.write(raw)
        await self.writer.drain()
        line = await self.reader.readline()
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"not an HTTP status line: {line[:40]!r}")
        length = 0
        while (header := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self.open = False
        body = await self.reader.readexactly(length) if length else b""
        self.used = time.monotonic()
        if not self.open:
            self.close()
        return int(parts[1]), body

    def close(self) -> None:
        self.open = False
        self.writer.close()


def send_once(port: int, raw: bytes, timeout: float = 30.0) -> int | None:
    """One request on a fresh connection: its status, None when it broke or timed out."""
    import asyncio

    async def once() -> int | None:
        conn = await Connection.connect(port)
        try:
            return (await conn.send(raw))[0]
        finally:
            conn.close()

    try:
        return asyncio.run(asyncio.wait_for(once(), timeout))
    except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
        return None


CLIENT_PREFIX = "bench-"  # client ids of a pseudonymised run's benchmark users
EVENTS_PER_POST = 1000


def client_users(outputs: Path, base: str) -> list[str]:
    """The user ids the load clients send, each with its training history in the server's store.

    A run without pseudonyms stores the ids clients send: its users-table ids are those. A pseudonymised
    run stores pseudonyms, which the service would map once more (and find nobody: every request would
    take the cheap cold-start path, never the model). There each training user becomes a client id
    ``bench-<row>`` whose training events are first sent through ``POST /events``, as a real client's are.
    """
    import httpx
    import pandas as pd

    from fuserec.layout import CATALOG_FILE, Layout
    from fuserec.serving.privacy import read_privacy_record

    layout = Layout(outputs)
    stored = pd.read_parquet(layout.clean / "users.parquet")["user_id"].astype(str).tolist()
    record = read_privacy_record(outputs)
    if not (record and record.get("pseudonymised")):
        return stored
    item_ids = pd.read_parquet(layout.export / CATALOG_FILE)["item_id"].astype(str).to_numpy()
    train = pd.read_parquet(layout.split_file("train"))
    events = [
        {
            "user_id": f"{CLIENT_PREFIX}{int(row.user)}",
            "item_id": str(item_ids[int(row.item)]),
            "timestamp": int(row.timestamp),
            **({"rating": float(row.rating)} if "rating" in train and pd.notna(row.rating) else {}),
        }
        for row in train.itertuples(index=False)
    ]
    with httpx.Client(base_url=base, timeout=60.0) as client:
        for start in range(0, len(events), EVENTS_PER_POST):
            response = client.post("/events", json={"events": events[start : start + EVENTS_PER_POST]})
            response.raise_for_status()
    print(f"  {len(events)} training events sent as {train['user'].nunique()} clients' (pseudonymised run)")
    return [f"{CLIENT_PREFIX}{u}" for u in sorted(train["user"].unique())]


def request_mix(outputs: Path, n: int, history_share: float, users: list[str], seed: int = 0) -> list[bytes]:
    """``n`` ``POST /recommend`` requests: stored users (their history is read from the event store) and,
    at ``history_share``, explicit histories (a real training history's latest 50 items, sent in full).

    ``users``: the client ids to draw from (:func:`client_users`)."""
    import pandas as pd

    from fuserec.layout import CATALOG_FILE, Layout

    layout = Layout(outputs)
    item_ids = pd.read_parquet(layout.export / CATALOG_FILE)["item_id"].astype(str).to_numpy()
    train = pd.read_parquet(layout.split_file("train"), columns=["user", "item", "timestamp"])
    histories = [
        item_ids[g.sort_values("timestamp", kind="stable")["item"].to_numpy()[-50:]].tolist()
        for _, g in train.groupby("user", sort=True)
    ]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if rng.random() < history_share:
            payload: dict[str, Any] = {"history": histories[int(rng.integers(len(histories)))], "k": 10}
        else:
            payload = {"user_id": str(users[int(rng.integers(len(users)))]), "k": 10}
        out.append(request_bytes("POST", "/recommend", payload))
    return out


def model_speed(outputs: Path, n: int) -> dict:
    import torch

    from fuserec.artifacts import load_scorer, scorer_folder
    from fuserec.data.dataset import Dataset
    from fuserec.layout import MODEL_FILE, SPLIT_FILES, Layout
    from fuserec.manifest import read_json
    from fuserec.onnx_model import OnnxRecommender, TimedTopKModel, TopKModel, uses_time

    layout = Layout(outputs)
    manifest = read_json(layout.export / "manifest.json")
    scorer = load_scorer(layout, scorer_folder(layout, manifest["algorithm"]["name"]))
    timed = uses_time(scorer)
    wrapper = TimedTopKModel if timed else TopKModel
    module = wrapper(scorer.to_torch(), manifest["n_items"], manifest["k"]).eval()
    session = OnnxRecommender(layout.export / MODEL_FILE, manifest["providers"])
    data = Dataset.load(layout.clean, interactions=layout.split / SPLIT_FILES["train"])
    hist = data.histories()
    rows = np.random.default_rng(0).choice(np.flatnonzero(hist.lengths > 0), size=n, replace=True)
    last = scorer.history_time(hist) if timed else np.zeros(len(hist), dtype=np.int64)

    def ort(batch: np.ndarray) -> None:
        h = hist.select(batch)
        session.run(h.to_padded(manifest["max_history"]), last[batch] if timed else None)

    def eager(batch: np.ndarray) -> None:
        h = hist.select(batch)
        args = [torch.from_numpy(h.to_padded(manifest["max_history"]))]
        if timed:
            args.append(torch.from_numpy(last[batch]))
        with torch.no_grad():
            module(*args)

    out = {"model": manifest["algorithm"]["name"], "providers": session.providers}
    for name, fn in (("onnxruntime", ort), ("torch_eager", eager)):
        fn(rows[:1])  # warm-up
        single = []
        for r in rows:
            start = time.perf_counter()
            fn(np.asarray([r]))
            single.append(time.perf_counter() - start)
        batch = np.resize(rows, 256)
        start = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            fn(batch)
        throughput = 256 * repeats / (time.perf_counter() - start)
        out[name] = {**_percentiles(single), "batch256_users_per_s": throughput}
    out["ort_over_torch_single_p50"] = out["torch_eager"]["p50_ms"] / out["onnxruntime"]["p50_ms"]
    out["ort_over_torch_batch256"] = (
        out["onnxruntime"]["batch256_users_per_s"] / out["torch_eager"]["batch256_users_per_s"]
    )
    return out


def http_speed(
    outputs: Path,
    seconds: float,
    store: Path,
    max_batch: int,
    threads: int = 0,
    after: Callable[[Server, dict], None] | None = None,
    levels: tuple[int, ...] = LEVELS,
) -> dict:
    """``POST /recommend`` to ``fuserec serve`` in its own process (its own GIL), from asyncio clients.

    Each level of ``levels`` concurrent clients also records the CPU seconds the server and the clients
    used per request (the load generator shares the cores). ``after(server, levels)`` runs once the levels
    are measured, on the same server (the overload phase).
    """
    import asyncio

    import httpx

    server = Server.start(outputs, store, max_batch=max_batch, threads=threads)
    port, base = server.port, server.base
    users = server.users = client_users(outputs, base)

    async def level(clients: int) -> dict:
        latencies: list[float] = []
        errors = 0
        stop = time.perf_counter() + seconds

        async def worker(seed: int) -> None:
            # a bare keep-alive HTTP/1.1 client: the load generator shares the 2 cores with the server, so
            # it must cost far less per request than the server does (httpx's per-request Python was not)
            nonlocal errors
            rng = np.random.default_rng(seed)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                while time.perf_counter() < stop:
                    body = json.dumps({"user_id": users[int(rng.integers(len(users)))], "k": 10}).encode()
                    head = (
                        f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n"
                    )
                    start = time.perf_counter()
                    try:
                        writer.write(head.encode() + body)
                        await writer.drain()
                        ok = (await reader.readline()).split(b" ")[1] == b"200"
                        length = 0
                        while (line := await reader.readline()) not in (b"\r\n", b""):
                            if line.lower().startswith(b"content-length:"):
                                length = int(line.split(b":")[1])
                        await reader.readexactly(length)
                    except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
                        ok = False  # a refused or reset connection is an error, not a crash
                        writer.close()
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    latencies.append(time.perf_counter() - start)
                    errors += not ok
            finally:
                writer.close()

        start, cpu, own = time.perf_counter(), CpuUsage(server.pid), time.process_time()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed, used, clients_cpu = time.perf_counter() - start, cpu.since(), time.process_time() - own
        per_request = 1000.0 / max(len(latencies), 1)
        return {
            **_percentiles(latencies),
            "requests_per_s": len(latencies) / elapsed,
            "requests": len(latencies),
            "errors": errors,
            "server_cpu_ms_per_request": used.get("server", float("nan")) * per_request,
            "clients_cpu_ms_per_request": clients_cpu * per_request,
        }

    out = {}
    try:
        asyncio.run(level(4))  # warm-up: first requests pay lazy initialisation
        for clients in sorted({*levels, *LEVELS}):
            out[f"clients_{clients}"] = asyncio.run(level(clients))
        out["within_slo"] = within_slo(out)
        out["server_batches"] = httpx.get(f"{base}/ready").json()["batches"]
        if after is not None:
            after(server, out)
    finally:
        server.stop()
    return out


def within_slo(levels: dict, p99_ms: float = SLO_P99_MS) -> dict[str, Any]:
    """The most requests/s of any level whose p99 is at most ``p99_ms`` with no errors: throughput under a
    latency objective, the number that says how much traffic the service takes while still answering fast."""
    ok = {
        k: v
        for k, v in levels.items()
        if k.startswith("clients_") and v["p99_ms"] <= p99_ms and v["errors"] == 0
    }
    if not ok:
        return {"p99_ms_at_most": p99_ms, "requests_per_s": 0.0, "level": None}
    best = max(ok, key=lambda k: ok[k]["requests_per_s"])
    return {"p99_ms_at_most": p99_ms, "requests_per_s": ok[best]["requests_per_s"], "level": best}


# -- the overload phase ------------------------------------------------------------------------------------
HISTORY_SHARE = 0.25  # of the overload phase's requests: an explicit history rather than a stored user


def _use_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio: slower, still correct
        pass


def open_loop(spec: dict) -> dict:
    """One open-loop generator (run in its own process): ``spec["rate"]`` requests/s on a fixed schedule
    from ``spec["start_at"]`` (wall clock) for ``spec["seconds"]``, whatever the answers; each request on an
    idle keep-alive connection, a new one when none is idle (at most ``spec["max_connections"]``).

    Returns counts per status, the latencies of 200s and 503s (from the write; 200s also from the
    scheduled time), the send lag behind the schedule, and what failed: connection errors, requests
    unanswered after ``spec["deadline_s"]``, and slots skipped because every connection was busy.
    """
    import asyncio
    from collections import Counter

    _use_uvloop()
    port, rate, seconds, deadline = spec["port"], spec["rate"], spec["seconds"], spec["deadline_s"]
    requests: list[bytes] = spec["requests"]
    codes: Counter[int] = Counter()
    ok: list[float] = []
    ok_scheduled: list[float] = []
    ok_second: list[int] = []  # the second of the phase each 200 was due in
    refused: list[float] = []
    lag: list[float] = []
    failed = {"connection_errors": 0, "unanswered": 0, "not_sent_no_connection": 0}

    async def run() -> dict:
        idle: list[Connection] = []
        opened = 0
        await asyncio.sleep(max(0.0, spec["start_at"] - 1.0 - time.time()))
        for _ in range(spec["preopen"]):  # just before the start: none is stale yet
            idle.append(await Connection.connect(port))
            opened += 1

        async def one(conn: Connection | None, raw: bytes, due: float, second: int) -> None:
            nonlocal opened
            try:
                async with asyncio.timeout(deadline):
                    if conn is None:
                        conn = await Connection.connect(port)
                    start = time.perf_counter()
                    status, _ = await conn.send(raw)
            except TimeoutError:
                failed["unanswered"] += 1
                if conn is not None:
                    conn.close()
                opened -= 1
                return
            except (OSError, ValueError, asyncio.IncompleteReadError):
                failed["connection_errors"] += 1
                if conn is not None:
                    conn.close()
                opened -= 1
                return
            end = time.perf_counter()
            codes[status] += 1
            if status == 200:
                ok.append(end - start)
                ok_scheduled.append(end - due)
                ok_second.append(second)
            elif status == 503:
                refused.append(end - start)
            if conn.open:
                idle.append(conn)
            else:
                opened -= 1

        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()
        n = int(rate * seconds)
        t0 = time.perf_counter()
        last_send, peak = t0, opened
        for i in range(n):
            due = t0 + (i + spec["offset"]) / rate
            now = time.perf_counter()
            if due > now + 0.0005:
                await asyncio.sleep(due - now)
            while idle and idle[-1].stale:  # LIFO: the top is the most recently used
                idle.pop().close()
                opened -= 1
            if idle:
                conn: Connection | None = idle.pop()
            elif opened < spec["max_connections"]:
                conn, opened = None, opened + 1
            else:
                failed["not_sent_no_connection"] += 1
                continue
            peak = max(peak, opened)
            last_send = time.perf_counter()
            lag.append(last_send - due)
            task = loop.create_task(one(conn, requests[i % len(requests)], due, int(due - t0)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        sending = max(last_send - t0, seconds)
        if pending:
            await asyncio.wait(pending, timeout=deadline + 5.0)
        for conn in idle:
            conn.close()
        return {"sending_s": sending, "connections_peak": peak}

    cpu = time.process_time()
    info = asyncio.run(run())
    return {
        **info,
        "cpu_s": time.process_time() - cpu,
        "sent": len(lag),
        "codes": dict(codes),
        "ok": ok,
        "ok_scheduled": ok_scheduled,
        "ok_second": ok_second,
        "refused": refused,
        "lag": lag,
        **failed,
    }


def health_probe(spec: dict) -> dict:
    """``GET /health`` every ``spec["period_s"]`` on one keep-alive connection (blocking sockets, its own
    process, so a busy load generator does not delay it); each probe's latency, status, or failure."""
    start_at, period, seconds, deadline = (
        spec["start_at"],
        spec["period_s"],
        spec["seconds"],
        spec["deadline_s"],
    )
    raw = request_bytes("GET", "/health")
    latencies: list[float] = []
    at: list[float] = []  # each answered probe's second into the phase
    codes: dict[int, int] = {}
    errors = 0
    sock: socket.socket | None = None
    cpu = time.process_time()
    for i in range(int(seconds / period)):
        delay = start_at + i * period - time.time()
        if delay > 0:
            time.sleep(delay)
        start = time.perf_counter()
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", spec["port"]), timeout=deadline)
            sock.sendall(raw)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next(
                (
                    int(v)
                    for n, _, v in (h.partition(b":") for h in lines[1:])
                    if n.strip().lower() == b"content-length"
                ),
                0,
            )
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                body += chunk
            status = int(lines[0].split(b" ")[1])
        except (OSError, ValueError, IndexError):
            errors += 1
            if sock is not None:
                sock.close()
            sock = None
            continue
        latencies.append(time.perf_counter() - start)
        at.append(i * period)
        codes[status] = codes.get(status, 0) + 1
    if sock is not None:
        sock.close()
    return {
        "latencies": latencies,
        "at": at,
        "codes": codes,
        "errors": errors,
        "cpu_s": time.process_time() - cpu,
    }


def run_processes(jobs: list[tuple[Callable[[dict], dict], dict]], timeout: float) -> list[dict]:
    """Each ``fn(spec)`` in its own (spawned) process; their results, in order. Any process still running
    after ``timeout`` seconds is killed (``RuntimeError``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process holding torch's and onnxruntime's threads
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_child, args=(index, fn, spec, results), daemon=True)
        for index, (fn, spec) in enumerate(jobs)
    ]
    for p in processes:
        p.start()
    out: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < len(jobs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{len(jobs) - len(out)} load processes did not finish in {timeout:.0f} s")
            try:
                index, result = results.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: look again (and at the deadline)
                if all(not p.is_alive() for p in processes) and results.empty():
                    raise RuntimeError("a load process died without a result") from None
                continue
            if isinstance(result, BaseException):
                raise RuntimeError(f"load process {index} failed: {result!r}")
            out[index] = result
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return [out[i] for i in range(len(jobs))]


def _child(index: int, fn: Callable[[dict], dict], spec: dict, results: Any) -> None:
    try:
        results.put((index, fn(spec)))
    except BaseException as exc:  # reported to the parent, which raises
        results.put((index, RuntimeError(f"{type(exc).__name__}: {exc}")))


class CpuUsage:
    """CPU seconds used since it was made: by the whole machine (busy, every core) and by one process (the
    server, its threads included); empty when psutil is missing."""

    def __init__(self, pid: int) -> None:
        try:
            import psutil
        except ImportError:
            self.process = None
            return
        self.psutil = psutil
        self.process = psutil.Process(pid)
        self.start = time.monotonic()
        self.machine = self._busy()
        self.own = self._own()

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def _own(self) -> float:
        t = self.process.cpu_times()
        return float(t.user + t.system)

    def since(self) -> dict[str, float]:
        if self.process is None:
            return {}
        try:
            own = self._own() - self.own
        except self.psutil.Error:  # the server has gone
            own = float("nan")
        return {
            "wall": time.monotonic() - self.start,
            "cores": float(self.psutil.cpu_count() or 0),
            "machine_busy": self._busy() - self.machine,
            "server": own,
        }


def overload(
    server: Server,
    requests: list[bytes],
    capacity: float,
    unloaded_p99_ms: float,
    seconds: float,
    *,
    factor: float = 3.0,
    generators: int = 2,
    settings: Any = None,
) -> dict:
    """Open-loop ``POST /recommend`` at ``factor`` x ``capacity`` requests/s for ``seconds``, from
    ``generators`` processes, while another process probes ``GET /health`` every 100 ms.

    Passes when every answer is a 200 or a 503 (no other status, no broken connection, nothing unanswered
    after serve.request_timeout_s + 1 s), the 200s' p99 is at most 4x ``unloaded_p99_ms``, and /health's
    p99 and max stay under 50 ms.
    """
    settings = settings or serve_settings()
    deadline = float(settings.request_timeout_s) + 1.0
    target = factor * capacity
    start_at = time.time() + 3.0 + 0.5 * generators  # after every spawned process has started
    common = {"port": server.port, "seconds": seconds, "deadline_s": deadline, "start_at": start_at}
    per = target / generators
    jobs: list[tuple[Callable[[dict], dict], dict]] = [
        (
            open_loop,
            {
                **common,
                "rate": per,
                "offset": g / generators,  # the processes' schedules interleave
                "requests": requests[g::generators] or requests,
                "preopen": 32,
                "max_connections": max(64, int(settings.max_inflight) * 4 // generators),
            },
        )
        for g in range(generators)
    ]
    jobs.append((health_probe, {**common, "period_s": 0.1}))
    usage = CpuUsage(server.pid)
    *loads, health = run_processes(jobs, timeout=seconds + deadline + 60.0 + 0.5 * generators)
    cpu = usage.since()
    if cpu:
        cpu["generators"] = sum(r["cpu_s"] for r in loads)
        cpu["probe"] = health["cpu_s"]
        # other processes on the machine (another job's tests, say) move every number here
        cpu["others"] = max(0.0, cpu["machine_busy"] - cpu["server"] - cpu["generators"] - cpu["probe"])

    sent = sum(r["sent"] for r in loads)
    sending = max(r["sending_s"] for r in loads)
    codes: dict[str, int] = {}
    for r in loads:
        for code, n in r["codes"].items():
            codes[str(code)] = codes.get(str(code), 0) + n
    other = {c: n for c, n in codes.items() if c not in ("200", "503")}
    failures = {k: sum(r[k] for r in loads) for k in ("connection_errors", "unanswered")}
    ok = [x for r in loads for x in r["ok"]]
    ok_scheduled = [x for r in loads for x in r["ok_scheduled"]]
    refused = [x for r in loads for x in r["refused"]]
    by_second: dict[int, list[float]] = {}
    for r in loads:
        for latency, second in zip(r["ok"], r["ok_second"], strict=True):
            by_second.setdefault(second, []).append(latency)
    lag = [x for r in loads for x in r["lag"]]
    offered = sent / sending
    limit = 4.0 * unloaded_p99_ms
    ok_ms = _ms(ok)
    health_ms = _ms(health["latencies"])
    health_bad = health["errors"] + sum(n for c, n in health["codes"].items() if c != 200)
    after = send_once(server.port, requests[0], deadline)
    out = {
        "seconds": seconds,
        "capacity_rps": capacity,
        "factor": factor,
        "target_rps": target,
        "offered_rps": offered,
        "offered_x_capacity": offered / capacity,
        "reached_target": offered >= 0.95 * target,
        "generators": generators,
        "sent": sent,
        "not_sent_no_connection": sum(r["not_sent_no_connection"] for r in loads),
        "connections_peak": sum(r["connections_peak"] for r in loads),
        "send_lag_ms": _ms(lag),
        "codes": dict(sorted(codes.items())),
        "other_codes": other,
        **failures,
        "answered_200_rps": codes.get("200", 0) / sending,
        "ok_200": ok_ms,
        "ok_200_from_schedule": _ms(ok_scheduled),
        "ok_200_per_second": [
            {"second": t, "answered": len(by_second[t]), **_ms(by_second[t])} for t in sorted(by_second)
        ],
        "refused_503": _ms(refused),
        "unloaded_p99_ms": unloaded_p99_ms,
        "p99_limit_ms": limit,
        "health": {
            "probes": len(health["latencies"]) + health["errors"],
            "codes": {str(c): n for c, n in health["codes"].items()},
            "errors": health["errors"],
            **health_ms,
            # when the slowest probe was sent: a stall at the phase's start (a burst of connections) or later
            "max_at_s": health["at"][int(np.argmax(health["latencies"]))] if health["latencies"] else None,
        },
        "cpu_s": cpu,
        "after_status": after,
        "server_alive": server.process.poll() is None,
    }
    out["checks"] = {
        "only_200_or_503": not other,
        "no_connection_errors_or_unanswered": failures["connection_errors"] == 0
        and failures["unanswered"] == 0,
        "p99_200_le_4x_unloaded": ok_ms["p99_ms"] is not None and ok_ms["p99_ms"] <= limit,
        "health_all_200": health_bad == 0 and bool(health["latencies"]),
        "health_p99_lt_50ms": health_ms["p99_ms"] is not None and health_ms["p99_ms"] < 50.0,
        "health_max_lt_50ms": health_ms["max_ms"] is not None and health_ms["max_ms"] < 50.0,
        "recommend_200_after": after == 200,
    }
    out["passed"] = all(out["checks"].values())
    return out


def overload_lines(o: dict) -> list[str]:
    """What the overload phase saw, in a few lines, ending with a PASS or FAIL line."""

    def fmt(d: dict) -> str:
        return (
            " / ".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("p50_ms", "p99_ms", "max_ms")) + " ms"
        )

    lines = [
        f"overload: capacity C = {o['capacity_rps']:.0f} req/s (16 clients); target {o['factor']:g} x C = "
        f"{o['target_rps']:.0f} req/s open-loop for {o['seconds']:g} s from {o['generators']} processes",
        f"overload: offered {o['offered_rps']:.0f} req/s = {o['offered_x_capacity']:.2f} x C"
        + ("" if o["reached_target"] else f"  (NOT REACHED: the generator fell short of {o['factor']:g} x C)")
        + f"; send lag p50/p99/max {fmt(o['send_lag_ms'])}; slots skipped (no free connection): "
        f"{o['not_sent_no_connection']}",
        f"overload: answers {o['codes']}, connection errors {o['connection_errors']}, unanswered "
        f"{o['unanswered']}; 200s {o['answered_200_rps']:.0f}/s",
        f"overload: 200 latency p50/p99/max {fmt(o['ok_200'])} (limit p99 <= 4 x unloaded "
        f"{o['unloaded_p99_ms']:.1f} = {o['p99_limit_ms']:.1f} ms); "
        f"from schedule {fmt(o['ok_200_from_schedule'])}; 503 {fmt(o['refused_503'])}",
        f"overload: /health {o['health']['probes']} probes, codes {o['health']['codes']}, errors "
        f"{o['health']['errors']}, p50/p99/max {fmt(o['health'])} (limit < 50 ms; max at "
        f"{o['health'].get('max_at_s')} s)",
    ]
    per_second = o.get("ok_200_per_second") or []
    if per_second:

        def second(d: dict) -> str:
            return f"{d['second']}s {d['answered']} x {d['p99_ms']:.0f}"

        first = ", ".join(second(d) for d in per_second[:3])
        worst = ", ".join(second(d) for d in sorted(per_second, key=lambda d: -d["p99_ms"])[:3])
        lines.append(f"overload: 200s per second (count x p99 ms): first {first}; worst {worst}")
    cpu = o.get("cpu_s") or {}
    if cpu:
        lines.append(
            f"overload: CPU seconds over {cpu['wall']:.0f} s on {cpu['cores']:.0f} cores: server "
            f"{cpu['server']:.0f}, generators {cpu['generators']:.0f}, probe {cpu['probe']:.1f}, "
            f"other processes {cpu['others']:.0f}"
        )
    failed = [k for k, v in o["checks"].items() if not v]
    lines.append("overload: PASS" if o["passed"] else f"overload: FAIL ({', '.join(failed)})")
    return lines


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a finished run's outputs folder")
    parser.add_argument("--n", type=int, default=200, help="single-history requests per engine")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each HTTP load level")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's dynamic batch limit")
    parser.add_argument(
        "--threads", type=int, default=0, help="the server's onnxruntime threads (0: per core)"
    )
    parser.add_argument(
        "--overload-seconds", type=float, default=60.0, help="duration of the open-loop overload phase"
    )
    parser.add_argument("--skip-overload", action="store_true", help="no overload phase")
    parser.add_argument(
        "--levels",
        default="1,4,8,16,32,64",
        help="concurrent clients of each HTTP load level, comma-separated (1, 16 and 64 always run)",
    )
    parser.add_argument(
        "--overload-factor", type=float, default=3.0, help="offered load, in multiples of the 16-client rate"
    )
    parser.add_argument(
        "--overload-generators", type=int, default=2, help="load generator processes of the overload phase"
    )
    parser.add_argument(
        "--server-set", action="append", default=[], help="serve.KEY=VALUE for the server, repeatable"
    )
    parser.add_argument(
        "--legacy-server",
        action="store_true",
        help="the fuserec on PYTHONPATH predates serve settings (a previous commit): pass the server none",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.legacy_server:
        SERVER_SETTINGS.clear()
    SERVER_SETTINGS.extend(args.server_set)
    served = describe_outputs(args.outputs)
    print(
        f"serving {served['model']} ({len(served['components'])} components, sha256 {served['sha256']}) from "
        f"{served['outputs']}: {served['users']} users, {served['items']} items, {served['rows']} rows"
        + (" (ML-100k)" if served["ml100k"] else ""),
        flush=True,
    )
    result: dict[str, Any] = {"model_speed": model_speed(args.outputs, args.n)}
    phase: dict[str, Any] = {}

    def overload_phase(server: Server, levels: dict) -> None:
        requests = request_mix(args.outputs, 4000, HISTORY_SHARE, server.users)
        phase["overload"] = overload(
            server,
            requests,
            ok_rate(levels["clients_16"]),  # capacity: answered requests only, not quick refusals
            levels["clients_1"]["p99_ms"],
            args.overload_seconds,
            factor=args.overload_factor,
            generators=args.overload_generators,
        )

    with tempfile.TemporaryDirectory() as tmp:
        result["http"] = http_speed(
            args.outputs,
            args.seconds,
            Path(tmp) / "events.sqlite",
            args.max_batch,
            args.threads,
            after=None if args.skip_overload else overload_phase,
            levels=tuple(int(c) for c in args.levels.split(",") if c.strip()),
        )
    speed, http = result["model_speed"], result["http"]
    result["targets"] = {  # the serving targets, as measured here: True = met
        "ort_single_p99_le_5ms": speed["onnxruntime"]["p99_ms"] <= 5.0,
        "http_p99_le_50ms_at_16_clients": http["clients_16"]["p99_ms"] <= 50.0,
        "no_http_errors": all(v["errors"] == 0 for k, v in http.items() if k.startswith("clients_")),
        "ort_at_least_torch_at_batch_256": speed["ort_over_torch_batch256"] >= 1.0,
    }
    result["served"] = served
    result["server_set"] = list(SERVER_SETTINGS)  # what the server was started with, beside params.yaml
    if not args.legacy_server:
        result["serve_settings"] = serve_settings().model_dump()
    result.update(phase)
    print(json.dumps(result, indent=2))
    if "overload" in result:
        print("\n".join(overload_lines(result["overload"])))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
