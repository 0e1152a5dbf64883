"""Serving speed of an exported model: onnxruntime against torch eager, and the HTTP API under load.

Usage (from the repository root, after a run whose outputs hold the exported model):
    python benchmarks/serving.py --outputs /tmp/ml/flow/s42c [--seconds 5] [--json out.json]

One run measures, on this machine:
- single-history latency (p50, p99 over ``--n`` real training histories) of onnxruntime and of the same
  model in torch eager (the fuser's or plugin's ``to_torch()`` inside the export wrapper);
- batched throughput (users/s) at batch 256 of both;
- ``POST /recommend`` through ``fuserec serve`` (uvicorn, its own process) on 127.0.0.1 (a free port) at 1,
  16 and 64 concurrent keep-alive clients (asyncio, raw HTTP/1.1), each level for ``--seconds``: p50, p99,
  requests/s and errors.
It prints what it saw, and whether the serving targets were met (ORT p99 <= 5 ms, HTTP p99 <= 50 ms at 16
clients with no errors, ORT at least as fast as torch at batch 256).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import numpy as np


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


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


def http_speed(outputs: Path, seconds: float, store: Path, max_batch: int, threads: int = 0) -> dict:
    """``POST /recommend`` to ``fuserec serve`` in its own process (its own GIL), from asyncio clients."""
    import asyncio
    import subprocess
    import sys

    import httpx
    import pandas as pd

    from fuserec.layout import Layout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "from fuserec.cli import app; app()", "serve", "--outputs", str(outputs)]
    command += [
        "--store",
        str(store),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--threads",
        str(threads),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fuserec serve did not start") from None
            time.sleep(0.3)
    users = pd.read_parquet(Layout(outputs).clean / "users.parquet")["user_id"].astype(str).tolist()

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

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
        return {
            **_percentiles(latencies),
            "requests_per_s": len(latencies) / elapsed,
            "requests": len(latencies),
            "errors": errors,
        }

    out = {}
    try:
        asyncio.run(level(4))  # warm-up: first requests pay lazy initialisation
        for clients in (1, 16, 64):
            out[f"clients_{clients}"] = asyncio.run(level(clients))
        out["server_batches"] = httpx.get(f"{base}/ready").json()["batches"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


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
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"model_speed": model_speed(args.outputs, args.n)}
    with tempfile.TemporaryDirectory() as tmp:
        result["http"] = http_speed(
            args.outputs, args.seconds, Path(tmp) / "events.sqlite", args.max_batch, args.threads
        )
    speed, http = result["model_speed"], result["http"]
    result["targets"] = {  # the serving targets, as measured here: True = met
        "ort_single_p99_le_5ms": speed["onnxruntime"]["p99_ms"] <= 5.0,
        "http_p99_le_50ms_at_16_clients": http["clients_16"]["p99_ms"] <= 50.0,
        "no_http_errors": all(http[f"clients_{c}"]["errors"] == 0 for c in (1, 16, 64)),
        "ort_at_least_torch_at_batch_256": speed["ort_over_torch_batch256"] >= 1.0,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
