"""Soak and fault test of ``fuserec serve``: mixed traffic for minutes, then kill -9 and a full disk.

Usage (from the repository root, after a run whose outputs hold the exported model; not run in CI):
    python benchmarks/soak.py --outputs /tmp/ml/flow/s42c [--minutes 10] [--capacity R] [--json out.json]

Runtime: about ``--minutes`` plus 1-2 minutes (capacity, server starts, the two fault phases).

Phases, each ending by itself, on ``fuserec serve`` in its own process on 127.0.0.1 (no API keys: open on
loopback), started on the exported model the way ``benchmarks/serving.py`` starts it:

1. capacity: closed-loop, 16 keep-alive clients of the traffic mix below for ``--capacity-seconds``
   (requests/s), unless ``--capacity`` gives it;
2. soak: open-loop (requests on a fixed schedule, whatever the answers) at ``--load`` (70%) of that capacity
   for ``--minutes``: 70% ``POST /recommend`` (any training user), 15% ``GET /explain`` (a user and a
   random item), 15% ``POST /events`` (1-5 events of a pool of ``--pool`` users, who are also recommended
   to and explained). Per minute: requests, status counts, p50/p99 per kind, the server's RSS. Checks:
   no 5xx, no other error (4xx, broken connection, no answer within serve.request_timeout_s + 1 s), RSS at
   the end within 10% of its value at the end of minute 1 (the warm-up);
3. kill -9: events posted at ``--kill-rate`` requests/s for new users, the server SIGKILLed mid-stream after
   ``--kill-after`` s, restarted on the same store; every acknowledged event (a 200 with its count) must be
   read back by ``GET /events``, and none that was never sent or was refused;
4. full disk: a fresh store on a small tmpfs mounted for this (root only; /dev/shm when it is small
   enough to fill, else the phase is skipped and says so). With the store's WAL checkpointed and truncated
   (as SQLite does on a clean close; without it SQLite rewrites the WAL's already allocated pages and a
   full disk shows only when a file must grow), the tmpfs is filled until ENOSPC: events must get 503
   while ``/recommend`` and ``/health`` answer 200, and events must be stored again once the filler is gone.

It prints a line per minute and per phase, a summary table, writes ``--json FILE``, and exits 1 when a
check fails (the work folder with the server logs is then kept and named).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import (  # benchmarks/ is no package: found by path, above
    Connection,
    Server,
    _ms,
    _use_uvloop,
    client_users,
    describe_outputs,
    request_bytes,
    serve_settings,
)

KINDS = ("recommend", "explain", "events")
MIX = (0.70, 0.15, 0.15)
EVENT_KINDS = ("view", "click", "like", "purchase")
RSS_GROWTH_LIMIT = 0.10
KILL_BURST = 8  # event posts sent together just before the kill
BROKEN = (OSError, ValueError, asyncio.IncompleteReadError)


class Traffic:
    """The soak's requests: (kind, raw HTTP request), drawn from the training users and the catalogue."""

    def __init__(self, outputs: Path, pool: int, seed: int = 0) -> None:
        import pandas as pd

        from fuserec.layout import CATALOG_FILE, Layout

        layout = Layout(outputs)
        self.users = pd.read_parquet(layout.clean / "users.parquet")["user_id"].astype(str).to_numpy()
        self.items = pd.read_parquet(layout.export / CATALOG_FILE)["item_id"].astype(str).to_numpy()
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.choice(self.users, size=min(pool, len(self.users)), replace=False)

    def use_users(self, users: list[str]) -> None:
        """Send these client ids (:func:`serving.client_users`), with a fresh pool drawn from them."""
        self.users = np.asarray(users)
        self.pool = self.rng.choice(self.users, size=min(len(self.pool), len(self.users)), replace=False)

    def user(self) -> str:
        """Half the time a pool user (whose events the soak keeps adding), else any training user."""
        users = self.pool if self.rng.random() < 0.5 else self.users
        return str(users[int(self.rng.integers(len(users)))])

    def item(self) -> str:
        return str(self.items[int(self.rng.integers(len(self.items)))])

    def next(self) -> tuple[str, bytes]:
        kind = KINDS[int(self.rng.choice(3, p=MIX))]
        if kind == "recommend":
            return kind, request_bytes("POST", "/recommend", {"user_id": self.user(), "k": 10})
        if kind == "explain":
            query = urllib.parse.urlencode({"user_id": self.user(), "item_id": self.item()})
            return kind, request_bytes("GET", f"/explain?{query}")
        user = str(self.pool[int(self.rng.integers(len(self.pool)))])
        events = [
            {"user_id": user, "item_id": self.item(), "kind": EVENT_KINDS[int(self.rng.integers(4))]}
            for _ in range(int(self.rng.integers(1, 6)))
        ]
        return kind, request_bytes("POST", "/events", {"events": events})


class Pool:
    """Keep-alive connections for open-loop traffic: an idle one when there is one, else a new one."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.limit = limit
        self.idle: list[Connection] = []
        self.opened = 0

    def take(self) -> Connection | bool | None:
        """An idle connection, None (open a new one: there is room), or False (all ``limit`` busy)."""
        while self.idle and self.idle[-1].stale:  # LIFO: the top is the most recently used
            self.idle.pop().close()
            self.opened -= 1
        if self.idle:
            return self.idle.pop()
        if self.opened < self.limit:
            self.opened += 1
            return None
        return False

    def give(self, conn: Connection | None) -> None:
        if conn is not None and conn.open:
            self.idle.append(conn)
        else:
            if conn is not None:
                conn.close()
            self.opened -= 1

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def exchange(pool: Pool, conn: Connection | None, raw: bytes, deadline: float) -> tuple[Any, float]:
    """Send ``raw`` (opening the connection when ``conn`` is None): ((status, body), seconds from the
    write), or (the failure's name, seconds): "unanswered" after ``deadline`` s, "broken" on a reset."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(deadline):
            if conn is None:
                conn = await Connection.connect(pool.port)
            start = time.perf_counter()
            answer = await conn.send(raw)
    except TimeoutError:
        if conn is not None:
            conn.close()
        pool.give(None)
        return "unanswered", time.perf_counter() - start
    except BROKEN:
        if conn is not None:
            conn.close()
        pool.give(None)
        return "broken", time.perf_counter() - start
    pool.give(conn)
    return answer, time.perf_counter() - start


def machine_busy(psutil: Any) -> float:
    """CPU seconds the machine has been busy, every core together."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


# -- capacity and soak ----------------------------------------------------------------------------------
def capacity(server: Server, traffic: Traffic, seconds: float, deadline: float, clients: int = 16) -> dict:
    """Closed loop: ``clients`` connections, each sending the next request of the mix when answered."""

    async def run(duration: float) -> dict:
        codes: Counter[str] = Counter()
        stop = time.perf_counter() + duration

        async def client() -> None:
            conn = await Connection.connect(server.port)
            while time.perf_counter() < stop:
                _, raw = traffic.next()
                try:
                    status, _ = await asyncio.wait_for(conn.send(raw), deadline)
                except (TimeoutError, *BROKEN) as exc:
                    codes["unanswered" if isinstance(exc, TimeoutError) else "broken"] += 1
                    conn.close()
                    conn = await Connection.connect(server.port)
                    continue
                codes[str(status)] += 1
                if not conn.open:
                    conn = await Connection.connect(server.port)
            conn.close()

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        return {"requests_per_s": sum(codes.values()) / elapsed, "codes": dict(codes), "seconds": elapsed}

    asyncio.run(run(3.0))  # warm-up
    return asyncio.run(run(seconds))


def soak(
    server: Server, traffic: Traffic, rate: float, minutes: int, deadline: float, max_connections: int
) -> dict:
    """Open loop at ``rate`` requests/s for ``minutes``; per minute (by scheduled time): counts, status
    codes and latencies per kind, failures, and the server's RSS and CPU at the minute's end."""
    import psutil

    process = psutil.Process(server.pid)
    rss_start = process.memory_info().rss
    n_min = minutes
    lat: list[dict[str, list[float]]] = [{k: [] for k in KINDS} for _ in range(n_min)]
    codes: list[dict[str, Counter[str]]] = [{k: Counter() for k in KINDS} for _ in range(n_min)]
    skipped = [0] * n_min
    rss: list[int | None] = [None] * n_min
    cpu: list[float | None] = [None] * n_min  # the server's CPU seconds in each minute
    others: list[float | None] = [None] * n_min  # every other process's but this one's (other jobs)
    lag: list[float] = []

    async def run() -> None:
        pool = Pool(server.port, max_connections)
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()
        t0 = time.perf_counter()
        marks = [sum(process.cpu_times()[:2]), machine_busy(psutil), time.process_time()]

        async def one(m: int, kind: str, conn: Connection | None, raw: bytes) -> None:
            answer, seconds = await exchange(pool, conn, raw, deadline)
            status = str(answer[0]) if isinstance(answer, tuple) else answer
            codes[m][kind][status] += 1
            if isinstance(answer, tuple):
                lat[m][kind].append(seconds)

        async def ticker() -> None:
            nonlocal marks
            for m in range(n_min):
                await asyncio.sleep(max(0.0, t0 + 60.0 * (m + 1) - time.perf_counter()))
                rss[m] = process.memory_info().rss
                now = [sum(process.cpu_times()[:2]), machine_busy(psutil), time.process_time()]
                cpu[m] = now[0] - marks[0]
                others[m] = max(0.0, (now[1] - marks[1]) - cpu[m] - (now[2] - marks[2]))
                marks = now
                c = {k: sum(codes[m][k].values()) for k in KINDS}
                print(
                    f"  minute {m + 1}: sent {sum(c.values())} ({', '.join(f'{k} {c[k]}' for k in KINDS)}), "
                    f"RSS {rss[m] / 2**20:.0f} MiB, CPU s: server {cpu[m]:.0f}, "
                    f"other processes {others[m]:.0f}",
                    flush=True,
                )

        tick = loop.create_task(ticker())
        for i in range(int(rate * minutes * 60)):
            due = t0 + i / rate
            now = time.perf_counter()
            if due > now + 0.0005:
                await asyncio.sleep(due - now)
            m = min(int((due - t0) // 60), n_min - 1)
            conn = pool.take()
            if conn is False:
                skipped[m] += 1
                continue
            kind, raw = traffic.next()
            lag.append(time.perf_counter() - due)
            task = loop.create_task(one(m, kind, conn or None, raw))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=deadline + 5.0)
        await tick
        pool.close()

    _use_uvloop()
    asyncio.run(run())
    per_minute = []
    for m in range(n_min):
        row: dict[str, Any] = {"minute": m + 1, "rss_mib": None if rss[m] is None else rss[m] / 2**20}
        row["server_cpu_s"] = cpu[m]
        row["other_processes_cpu_s"] = others[m]
        row["skipped_no_connection"] = skipped[m]
        row["requests"] = sum(sum(codes[m][k].values()) for k in KINDS)
        for k in KINDS:
            row[k] = {"requests": sum(codes[m][k].values()), "codes": dict(codes[m][k]), **_ms(lat[m][k])}
        per_minute.append(row)
    total: Counter[str] = Counter()
    for m in range(n_min):
        for k in KINDS:
            total.update(codes[m][k])
    five = sum(n for c, n in total.items() if c.isdigit() and c.startswith("5"))
    other = sum(n for c, n in total.items() if not (c.isdigit() and c.startswith(("2", "5"))))
    growth = (rss[-1] - rss[0]) / rss[0] if n_min >= 2 and rss[0] and rss[-1] else None
    out = {
        "rate_rps": rate,
        "minutes": minutes,
        "sent": sum(r["requests"] for r in per_minute),
        "skipped_no_connection": sum(skipped),
        "send_lag_ms": _ms(lag),
        "codes": dict(sorted(total.items())),
        "errors_5xx": five,
        "errors_other": other,
        "rss_start_mib": rss_start / 2**20,
        "rss_growth_after_minute_1": growth,
        "per_minute": per_minute,
    }
    out["checks"] = {
        "no_5xx": five == 0,
        "no_other_errors": other == 0,  # 4xx, broken connections, unanswered in time
        "rss_growth_lt_10pct": None if growth is None else growth < RSS_GROWTH_LIMIT,
    }
    return out


# -- kill -9 ----------------------------------------------------------------------------------------------
def kill_phase(
    server: Server,
    restart: Any,
    traffic: Traffic,
    rate: float,
    background: float,
    after: float,
    users: int,
    deadline: float,
) -> dict:
    """Post events for ``users`` new users at ``rate`` requests/s, beside ``POST /recommend`` at
    ``background`` requests/s; SIGKILL the server after ``after`` s while both keep coming (1 s more);
    restart it on the same store (``restart()``) and read every user's events back. Just before the kill
    ``KILL_BURST`` posts go out at once, so that some are in progress when it lands."""
    base = int(time.time()) - 1_000_000  # each event's own timestamp: base + a running number
    names = [f"soak-kill-{u:03d}" for u in range(users)]
    acked: set[tuple] = set()
    in_flight: set[tuple] = set()  # sent before the kill, answer lost in it: stored or not, either is right
    after_kill: set[tuple] = set()  # sent after the kill: no server to take them
    refused: set[tuple] = set()
    answers: Counter[str] = Counter()
    background_answers: Counter[str] = Counter()
    seq = 0
    killed_at: list[float] = []
    pending_at_kill: list[int] = []  # event requests sent and not yet answered when the kill came

    async def run() -> None:
        pool = Pool(server.port, 128)
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()
        side_pending: set[asyncio.Task] = set()
        t0 = time.perf_counter()

        async def post(conn: Connection | None, raw: bytes, events: list[tuple]) -> None:
            before = not killed_at
            answer, _ = await exchange(pool, conn, raw, deadline)
            if isinstance(answer, tuple):
                status, body = answer
                answers[str(status)] += 1
                stored = json.loads(body).get("stored") if status == 200 else None
                (acked if stored == len(events) else refused).update(events)
            else:
                answers[answer if before else f"{answer} (sent after the kill)"] += 1
                (in_flight if before else after_kill).update(events)

        async def recommend(conn: Connection | None, raw: bytes) -> None:
            answer, _ = await exchange(pool, conn, raw, deadline)
            background_answers[str(answer[0]) if isinstance(answer, tuple) else answer] += 1

        async def load() -> None:
            for i in range(int(background * (after + 1.0))):
                due = t0 + i / background
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                conn = pool.take()
                if conn is not False:
                    body = {"user_id": traffic.user(), "k": 10}
                    task = loop.create_task(
                        recommend(conn or None, request_bytes("POST", "/recommend", body))
                    )
                    side_pending.add(task)
                    task.add_done_callback(side_pending.discard)

        def send() -> None:
            nonlocal seq
            conn = pool.take()
            if conn is False:
                answers["not_sent_no_connection"] += 1
                return
            user = names[int(traffic.rng.integers(users))]
            events = []
            for _ in range(int(traffic.rng.integers(1, 6))):
                events.append((user, traffic.item(), base + seq, "click"))
                seq += 1
            fields = ("user_id", "item_id", "timestamp", "kind")
            payload = {"events": [dict(zip(fields, e, strict=True)) for e in events]}
            task = loop.create_task(post(conn or None, request_bytes("POST", "/events", payload), events))
            pending.add(task)
            task.add_done_callback(pending.discard)

        side = loop.create_task(load()) if background > 0 else None
        i = 0
        while True:
            due = t0 + i / rate
            if due - t0 > after + 1.0:
                break
            if not killed_at and due - t0 >= after:
                for _ in range(KILL_BURST):  # so that the kill surely lands mid-request, mid-transaction
                    send()
                await asyncio.sleep(0.003)  # written, not yet all answered
                pending_at_kill.append(len(pending))
                os.kill(server.pid, signal.SIGKILL)
                killed_at.append(time.perf_counter() - t0)
            now = time.perf_counter()
            if due > now + 0.0005:
                await asyncio.sleep(due - now)
            i += 1
            send()
        if side is not None:
            await side
        if pending or side_pending:
            await asyncio.wait(pending | side_pending, timeout=deadline + 5.0)
        pool.close()

    _use_uvloop()
    asyncio.run(run())
    server.process.wait(timeout=30)
    exit_code = server.process.returncode
    started = time.perf_counter()
    fresh = restart()
    restart_s = time.perf_counter() - started
    found: set[tuple] = set()
    try:
        import httpx

        for name in names:
            r = httpx.get(f"{fresh.base}/events", params={"user_id": name, "limit": 10_000}, timeout=30)
            r.raise_for_status()
            found.update((name, e["item_id"], e["timestamp"], e["kind"]) for e in r.json()["events"])
    finally:
        fresh.stop()
    out = {
        "rate_rps": rate,
        "killed_after_s": killed_at[0] if killed_at else None,
        "in_flight_at_kill": pending_at_kill[0] if pending_at_kill else None,
        "background_recommend_rps": background,
        "background_answers": dict(sorted(background_answers.items())),
        "server_exit_code": exit_code,
        "answers": dict(sorted(answers.items())),
        "events_sent": seq,
        "acknowledged": len(acked),
        "refused": len(refused),
        "lost_in_flight": len(in_flight),
        "sent_after_kill": len(after_kill),
        "found": len(found),
        "missing": len(acked - found),
        "found_of_lost_in_flight": len(found & in_flight),
        "found_never_acknowledged_nor_in_flight": len(found - acked - in_flight),
        "restart_s": restart_s,
    }
    out["checks"] = {
        "killed_by_sigkill": bool(killed_at) and exit_code == -signal.SIGKILL,
        "acknowledged_some": len(acked) > 0,
        "no_acknowledged_event_missing": out["missing"] == 0,
        "nothing_refused_was_stored": out["found_never_acknowledged_nor_in_flight"] == 0,
    }
    return out


# -- full disk ---------------------------------------------------------------------------------------------
class SmallDisk:
    """A small filesystem to fill: a tmpfs mounted for this (root), else /dev/shm when it is at most
    ``max_fill_mib``; :attr:`skip` says why there is none. :meth:`fill` until ENOSPC, :meth:`empty` after."""

    def __init__(self, work: Path, size_mib: int, max_fill_mib: int) -> None:
        self.folder: Path | None = None
        self.mounted: Path | None = None
        self.filler: Path | None = None
        self.how = ""
        self.skip = ""
        point = work / "small-disk"
        point.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "fuserec-soak", str(point)]
        tried = subprocess.run(mount, capture_output=True, text=True)
        if tried.returncode == 0:
            self.folder = self.mounted = point
            self.how = f"a {size_mib} MiB tmpfs mounted at {point}"
            return
        why = (tried.stderr or tried.stdout).strip() or f"exit {tried.returncode}"
        shm = Path("/dev/shm")
        if shm.is_dir():
            st = os.statvfs(shm)
            total = st.f_blocks * st.f_frsize / 2**20
            if total <= max_fill_mib and os.access(shm, os.W_OK):
                self.folder = Path(tempfile.mkdtemp(prefix="fuserec-soak-", dir=shm))
                self.how = f"/dev/shm ({total:.0f} MiB tmpfs; mounting one failed: {why})"
                return
            self.skip = (
                f"no small filesystem to fill: mounting a tmpfs failed ({why}) and /dev/shm is "
                f"{total:.0f} MiB, over --max-fill-mib {max_fill_mib} (filling it would take that much "
                "memory)"
            )
        else:
            self.skip = (
                f"no small filesystem to fill: mounting a tmpfs failed ({why}) and there is no /dev/shm"
            )

    def free(self) -> int:
        assert self.folder is not None
        st = os.statvfs(self.folder)
        return int(st.f_bavail * st.f_frsize)

    def fill(self) -> int:
        """Write a filler file until the filesystem refuses (ENOSPC); the bytes written."""
        assert self.folder is not None
        self.filler = self.folder / "filler"
        written = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for block in (2**20, 4096, 512):
                chunk = b"\0" * block
                while True:
                    try:
                        written += os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def empty(self) -> None:
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
            self.filler = None

    def close(self) -> None:
        """Delete the filler, unmount what was mounted, remove the folder (the server must be gone)."""
        self.empty()
        if self.mounted is not None:
            done = subprocess.run(["umount", str(self.mounted)], capture_output=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mounted)], capture_output=True)
            self.mounted = None
        elif self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


def disk_phase(
    outputs: Path, work: Path, traffic: Traffic, args: argparse.Namespace, deadline: float
) -> dict:
    """A fresh store on a small filesystem, filled while the server runs: events 503, recommendations 200;
    events stored again once the filler is gone. Skipped, saying why, when no such filesystem can be had."""
    import httpx

    disk = SmallDisk(work, args.disk_mib, args.max_fill_mib)
    if disk.skip:
        return {"skipped": disk.skip, "checks": {}}
    assert disk.folder is not None
    store = disk.folder / "events.sqlite"
    server = None
    base_ts = int(time.time()) - 2_000_000
    seq = 0
    user = "soak-disk-000"

    def events_request(client: httpx.Client) -> tuple[int, list[tuple], httpx.Response]:
        nonlocal seq
        events = []
        for _ in range(int(traffic.rng.integers(1, 6))):
            events.append((traffic.item(), base_ts + seq))
            seq += 1
        payload = {
            "events": [{"user_id": user, "item_id": i, "timestamp": t, "kind": "like"} for i, t in events]
        }
        r = client.post("/events", json=payload)
        return r.status_code, events, r

    try:
        server = Server.start(
            outputs,
            store,
            max_batch=args.max_batch,
            threads=args.threads,
            log=work / "server-disk.log",
        )
        out: dict[str, Any] = {"filesystem": disk.how, "store": str(store)}
        acked: set[tuple] = set()
        refused: set[tuple] = set()
        with httpx.Client(base_url=server.base, timeout=deadline) as client:
            status, events, _ = events_request(client)
            out["before_fill_events_status"] = status
            if status == 200:
                acked.update(events)
            # informational: full, but the WAL's pages still allocated (SQLite rewrites them in place)
            disk.fill()
            status, events, _ = events_request(client)
            out["full_disk_before_wal_truncate_events_status"] = status
            (acked if status == 200 else refused).update(events)
            disk.empty()
            with contextlib.closing(sqlite3.connect(store, timeout=10)) as db:
                out["wal_checkpoint_truncate"] = list(
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                )
            out["free_before_fill_bytes"] = disk.free()
            out["filler_bytes"] = disk.fill()
            out["free_after_fill_bytes"] = disk.free()
            full: Counter[str] = Counter()
            recommend: Counter[str] = Counter()
            health: Counter[str] = Counter()
            retry_after = 0
            for _ in range(args.disk_requests):
                status, events, response = events_request(client)
                full[str(status)] += 1
                retry_after += status == 503 and response.headers.get("retry-after") is not None
                if status != 200 and "detail" not in out:
                    out["detail"] = response.json().get("detail")
                (acked if status == 200 else refused).update(events)
                r = client.post("/recommend", json={"user_id": traffic.user(), "k": 10})
                recommend[str(r.status_code)] += 1
                health[str(client.get("/health").status_code)] += 1
            out["while_full"] = {
                "events": dict(full),
                "events_503_with_retry_after": retry_after,
                "recommend": dict(recommend),
                "health": dict(health),
            }
            disk.empty()
            out["free_after_removing_filler_bytes"] = disk.free()
            after: Counter[str] = Counter()
            for _ in range(5):
                status, events, _ = events_request(client)
                after[str(status)] += 1
                (acked if status == 200 else refused).update(events)
            out["after_events"] = dict(after)
            r = client.get("/events", params={"user_id": user, "limit": 10_000})
            r.raise_for_status()
            found = {(e["item_id"], e["timestamp"]) for e in r.json()["events"]}
        n = args.disk_requests
        out["acknowledged"] = len(acked)
        out["acknowledged_missing"] = len(acked - found)
        out["refused_but_stored"] = len(refused & found)
        out["checks"] = {
            "disk_full": out["free_after_fill_bytes"] == 0,
            "events_200_before_fill": out["before_fill_events_status"] == 200,
            "events_503_while_full": full.get("503", 0) == n,
            "recommend_200_while_full": recommend.get("200", 0) == n,
            "health_200_while_full": health.get("200", 0) == n,
            "events_200_after_freeing": after.get("200", 0) == 5,
            "acknowledged_stored_refused_not": out["acknowledged_missing"] == 0
            and out["refused_but_stored"] == 0,
        }
        return out
    finally:
        if server is not None:
            server.kill()
        disk.close()


# -- report -------------------------------------------------------------------------------------------------
def _f(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary(result: dict) -> list[str]:
    s = result["soak"]
    lines = [
        "",
        f"soak: {s['rate_rps']:.1f} req/s open-loop = {result['load']:.0%} of capacity "
        f"{result['capacity']['requests_per_s']:.1f} req/s, {s['minutes']} min",
        "| minute | requests | codes | recommend p50/p99 ms | explain p50/p99 ms | events p50/p99 ms "
        "| RSS MiB | CPU s server / others |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in s["per_minute"]:
        merged: Counter[str] = Counter()
        for k in KINDS:
            merged.update(row[k]["codes"])
        cells = [f"{_f(row[k]['p50_ms'])} / {_f(row[k]['p99_ms'])}" for k in KINDS]
        lines.append(
            f"| {row['minute']} | {row['requests']} | {dict(sorted(merged.items()))} | {' | '.join(cells)} | "
            f"{_f(row['rss_mib'], '.0f')} | {_f(row['server_cpu_s'], '.0f')} / "
            f"{_f(row['other_processes_cpu_s'], '.0f')} |"
        )
    growth = s["rss_growth_after_minute_1"]
    lines.append(
        f"soak: codes {s['codes']}; 5xx {s['errors_5xx']}, other errors {s['errors_other']}; "
        f"RSS {s['rss_start_mib']:.0f} MiB at the start; growth after minute 1: "
        f"{'-' if growth is None else f'{growth:+.1%}'} (limit +10%)"
    )
    k = result.get("kill")
    if k:
        lines.append(
            f"kill -9: after {_f(k['killed_after_s'])} s at {k['rate_rps']:g} req/s "
            f"({k['in_flight_at_kill']} requests in flight at the kill): {k['acknowledged']} events "
            f"acknowledged, {k['found']} found after restart ({k['restart_s']:.1f} s), "
            f"missing {k['missing']}; "
            f"lost in flight {k['lost_in_flight']} ({k['found_of_lost_in_flight']} of them stored), "
            f"{k['sent_after_kill']} sent after the kill; "
            f"answers {k['answers']}"
        )
    d = result.get("disk")
    if d and d.get("skipped"):
        lines.append(f"full disk: SKIPPED: {d['skipped']}")
    elif d:
        w = d["while_full"]
        lines += [
            f"full disk ({d['filesystem']}): free after filling {d['free_after_fill_bytes']} bytes",
            f"full disk: with the WAL truncated, while full: events {w['events']}, recommend "
            f"{w['recommend']}, health {w['health']}; after freeing: events {d['after_events']}",
            f"full disk: acknowledged missing {d['acknowledged_missing']}, refused but stored "
            f"{d['refused_but_stored']}; 503 detail: {d.get('detail')!r}",
            "full disk: before the WAL truncation (SQLite rewrites its allocated pages) an event post got "
            f"{d['full_disk_before_wal_truncate_events_status']}",
        ]
    lines.append("")
    lines.append("| phase | check | result |")
    lines.append("|---|---|---|")
    for phase in ("soak", "kill", "disk"):
        for name, ok in (result.get(phase) or {}).get("checks", {}).items():
            lines.append(f"| {phase} | {name} | {'n/a' if ok is None else 'PASS' if ok else 'FAIL'} |")
    lines.append("soak.py: PASS" if result["passed"] else f"soak.py: FAIL ({', '.join(result['failed'])})")
    return lines


def _terminate(signum: int, _: Any) -> None:
    raise SystemExit(128 + signum)  # so every finally runs: servers killed, filler deleted, tmpfs unmounted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a finished run's outputs folder")
    parser.add_argument("--minutes", type=int, default=10, help="soak duration (minute 1 is the warm-up)")
    parser.add_argument("--capacity", type=float, default=None, help="req/s of the mix (default: measured)")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="soak rate, a share of the capacity")
    parser.add_argument("--pool", type=int, default=100, help="users the soak's events go to")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--kill-rate", type=float, default=50.0, help="event posts/s of the kill -9 phase")
    parser.add_argument(
        "--kill-background",
        type=float,
        default=None,
        help="recommend req/s beside them (default: the soak's)",
    )
    parser.add_argument("--kill-after", type=float, default=5.0, help="seconds of posting before the kill")
    parser.add_argument("--kill-users", type=int, default=20)
    parser.add_argument(
        "--disk-mib", type=int, default=64, help="size of the tmpfs the full-disk phase fills"
    )
    parser.add_argument("--max-fill-mib", type=int, default=1024, help="largest /dev/shm it would fill")
    parser.add_argument(
        "--disk-requests", type=int, default=20, help="event posts made while the disk is full"
    )
    parser.add_argument("--skip-faults", action="store_true", help="only capacity and soak")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--work", type=Path, default=None, help="store and server logs (default: a temp folder)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)

    served = describe_outputs(args.outputs)
    print(
        f"serving {served['model']} (sha256 {served['sha256']}) from {served['outputs']}: "
        f"{served['users']} users, {served['items']} items, {served['rows']} rows"
        + (" (ML-100k)" if served["ml100k"] else ""),
        flush=True,
    )
    settings = serve_settings()
    deadline = float(settings.request_timeout_s) + 1.0
    work = args.work or Path(tempfile.mkdtemp(prefix="fuserec-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "events.sqlite"
    traffic = Traffic(args.outputs, args.pool)
    result: dict[str, Any] = {"served": served, "work": str(work), "load": args.load}
    servers: list[Server] = []

    def start(log: str) -> Server:
        server = Server.start(
            args.outputs, store, max_batch=args.max_batch, threads=args.threads, log=work / log
        )
        servers.append(server)
        return server

    started = time.monotonic()
    try:
        server = start("server.log")
        print(f"server up on port {server.port} (pid {server.pid}); work folder {work}", flush=True)
        traffic.use_users(client_users(args.outputs, server.base))  # a pseudonymised run: clients' own ids
        if args.capacity is None:
            result["capacity"] = capacity(server, traffic, args.capacity_seconds, deadline)
        else:
            result["capacity"] = {"requests_per_s": args.capacity, "given": True}
        rate = args.load * result["capacity"]["requests_per_s"]
        print(f"capacity {result['capacity']}; soak at {rate:.1f} req/s for {args.minutes} min", flush=True)
        result["soak"] = soak(server, traffic, rate, args.minutes, deadline, args.max_connections)
        if not args.skip_faults:
            print("kill -9 under load ...", flush=True)
            result["kill"] = kill_phase(
                server,
                lambda: start("server-restarted.log"),
                traffic,
                args.kill_rate,
                rate if args.kill_background is None else args.kill_background,
                args.kill_after,
                args.kill_users,
                deadline,
            )
            print("full disk ...", flush=True)
            result["disk"] = disk_phase(args.outputs, work, traffic, args, deadline)
    finally:
        for s in servers:
            s.kill()
    result["seconds"] = time.monotonic() - started
    failed = [
        f"{phase}.{name}"
        for phase in ("soak", "kill", "disk")
        for name, ok in (result.get(phase) or {}).get("checks", {}).items()
        if ok is False
    ]
    result["failed"] = failed
    result["passed"] = not failed
    print("\n".join(summary(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if failed:
        print(f"server logs and store kept in {work}")
        sys.exit(1)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
