"""Serving speed of an exported model: onnxruntime against torch eager, and the HTTP API under load.

Usage (from the repository root, after a run whose outputs hold the exported model):
    python benchmarks/serving.py --outputs /tmp/ml/flow/s42c [--seconds 5] [--json out.json]

One run measures, on this machine:
- single-history latency (p50, p99 over ``--n`` real training histories) of onnxruntime and of the same
  model in torch eager (the fuser's or plugin's ``to_torch()`` inside the export wrapper);
- batched throughput (users/s) at batch 256 of both;
- ``POST /recommend`` through uvicorn on 127.0.0.1 (a free port) at 1, 16 and 64 concurrent clients, each
  level for ``--seconds``: p50, p99, requests/s and errors.
It prints what it saw, including misses of the issue's targets (ORT p99 <= 5 ms, HTTP p99 <= 50 ms at 16
clients, ORT at least as fast as torch at batch 256).
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def model_speed(outputs: Path, n: int) -> dict:
    import torch

    from fuserec.data.dataset import Dataset
    from fuserec.layout import Layout
    from fuserec.manifest import read_json
    from fuserec.onnx_model import OnnxRecommender, TimedTopKModel, TopKModel, uses_time
    from fuserec.tasks.export import MODEL_FILE, load_scorer, scorer_folder
    from fuserec.tasks.split import SPLIT_FILES

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


def http_speed(outputs: Path, seconds: float, store: Path) -> dict:
    import httpx
    import pandas as pd
    import uvicorn

    from fuserec.layout import Layout
    from fuserec.serving.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(outputs, store), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    users = pd.read_parquet(Layout(outputs).clean / "users.parquet")["user_id"].astype(str).tolist()
    url = f"http://127.0.0.1:{port}/recommend"
    out = {}
    try:
        for clients in (1, 16, 64):
            latencies: list[float] = []
            errors = 0
            stop = time.perf_counter() + seconds

            def worker(seed: int, stop: float = stop) -> tuple[list[float], int]:
                rng = np.random.default_rng(seed)
                mine, bad = [], 0
                with httpx.Client(timeout=30.0) as client:
                    while time.perf_counter() < stop:
                        body = {"user_id": users[int(rng.integers(len(users)))], "k": 10}
                        start = time.perf_counter()
                        try:
                            ok = client.post(url, json=body).status_code == 200
                        except httpx.HTTPError:  # a refused or reset connection is an error, not a crash
                            ok = False
                        mine.append(time.perf_counter() - start)
                        bad += not ok
                return mine, bad

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                for mine, bad in pool.map(worker, range(clients)):
                    latencies += mine
                    errors += bad
            elapsed = time.perf_counter() - start
            out[f"clients_{clients}"] = {
                **_percentiles(latencies),
                "requests_per_s": len(latencies) / elapsed,
                "requests": len(latencies),
                "errors": errors,
            }
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return out


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a finished run's outputs folder")
    parser.add_argument("--n", type=int, default=200, help="single-history requests per engine")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each HTTP load level")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"model_speed": model_speed(args.outputs, args.n)}
    with tempfile.TemporaryDirectory() as tmp:
        result["http"] = http_speed(args.outputs, args.seconds, Path(tmp) / "events.sqlite")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
