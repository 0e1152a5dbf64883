"""The whole pipeline at growing sizes: wall time and peak memory of `fuserec run`, per stage.

Usage:
    python benchmarks/scale.py --sizes 100000 1000000 [--work /tmp/fuserec-scale] [--resume]

Each size runs ``fuserec run`` (the Prefect flow, default plugin set, params.yaml defaults) in a subprocess
on the synthetic generator, shaped like the MovieLens release of that size (users x items of ML-100k,
ML-1M and ML-10M: catalogues grow far slower than logs in real data; the generator's own default of one
item per 30 interactions would give 333k items at 10^7, which no dense item-item model holds). Memory is
the resident set of the flow process and all its children, sampled every 0.2 s (shared pages of Dask
workers count twice: the figure errs high). Stage times come from the stage cache's journal (when each
task finished). ``--resume`` keeps the outputs folder, so a run cut short continues from its cached stages
(``docs/how-to/scale-with-dask.md``); the timings then cover only what ran this time and the row says so.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# interactions -> (users, items) of the MovieLens release with that many ratings
SHAPES = {100_000: (943, 1682), 1_000_000: (6040, 3706), 10_000_000: (69878, 10677)}
STAGES = ("validate", "clean", "split", "train", "fuse", "export", "evaluate", "report")


class MemorySampler(threading.Thread):
    """Peak and time series of the RSS of a process tree."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = 0
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):  # exited since the listing
                    rss += proc.memory_info().rss
            self.samples.append((time.time(), rss))
            self.done.wait(self.every)

    def peak_between(self, start: float, end: float) -> int:
        """Peak within [start, end], counting the samples just outside it (a stage shorter than a tick)."""
        times = [t for t, _ in self.samples]
        lo = max(0, bisect.bisect_left(times, start) - 1)
        hi = bisect.bisect_right(times, end) + 1
        return max((rss for _, rss in self.samples[lo:hi]), default=0)


def stage_windows(journal: list[dict[str, Any]], start: float) -> dict[str, tuple[float, float]]:
    """Each stage's (start, end): it starts when the previous one finished (the flow runs them in order)."""
    finished: dict[str, float] = {}
    for row in journal:
        stage = row["task"].split("[")[0]
        stage = "train" if stage == "train_inner" else stage  # both carves' fits are the train stage
        finished[stage] = max(finished.get(stage, 0.0), row["time"])
    windows, previous = {}, start
    for stage in STAGES:
        if stage in finished:
            windows[stage] = (previous, finished[stage])
            previous = finished[stage]
    return windows


def fit_seconds(outputs: Path) -> dict[str, float]:
    """Each plugin's fit time from its manifest, on train and on train' (whichever invocation fitted it)."""
    found = {}
    for carve, folder in (("train", "models"), ("train_inner", "inner_models")):
        for manifest in sorted((outputs / folder).glob("*/manifest.json")):
            found[f"{carve}[{manifest.parent.name}]"] = json.loads(manifest.read_text())["fit_seconds"]
    return found


def run_size(n: int, shape: tuple[int, int], work: Path, resume: bool, extra: list[str]) -> dict[str, Any]:
    outputs = work / f"synthetic-{n}"
    if outputs.exists() and not resume:
        shutil.rmtree(outputs)
    users, items = shape
    overrides = [
        "data.source=synthetic",
        f"data.synthetic.n_interactions={n}",
        f"data.synthetic.n_users={users}",
        f"data.synthetic.n_items={items}",
        f"outputs={outputs}",
        *extra,
    ]
    cmd = [sys.executable, "-m", "fuserec.cli", "run"] + [a for o in overrides for a in ("--set", o)]
    log = work / f"synthetic-{n}.log"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home")}
    print(f"[{n:,}] {users} users x {items} items: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    start = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        rc = proc.wait()
    end = time.time()
    sampler.done.set()
    sampler.join()
    journal_file = outputs / ".cache" / "journal.jsonl"
    lines = journal_file.read_text().splitlines() if journal_file.exists() else []
    everything = [json.loads(line) for line in lines]
    journal = [r for r in everything if r["time"] >= start]
    windows = stage_windows(journal, start)
    # Seconds of each task's latest completed run, whichever invocation ran it (a resumed run reuses some).
    task_seconds = {r["task"]: r.get("seconds") for r in everything if r["state"] == "Completed"}
    row: dict[str, Any] = {
        "interactions": n,
        "users": users,
        "items": items,
        "exit_code": rc,
        "wall_s": round(end - start, 1),
        "peak_rss_gib": round(sampler.peak_between(start, end) / 2**30, 2),
        "cached_stages": sorted({r["task"] for r in journal if r["state"] == "Cached"}),
        "stages": {
            stage: {
                "wall_s": round(b - a, 1),
                "peak_rss_gib": round(sampler.peak_between(a, b) / 2**30, 2),
            }
            for stage, (a, b) in windows.items()
        },
        "task_seconds": task_seconds,
        "fit_seconds": fit_seconds(outputs),
        "overrides": extra,
    }
    metrics_file = outputs / "metrics.json"
    if rc == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        row["ndcg@10"] = {
            **{f"models.{k}": round(v["ndcg@10"], 4) for k, v in metrics.get("models", {}).items()},
            **{f"fusers.{k}": round(v["ndcg@10"], 4) for k, v in metrics.get("fusers", {}).items()},
        }
    else:
        row["log_tail"] = log.read_text()[-3000:]
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(SHAPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/fuserec-scale"))
    parser.add_argument("--resume", action="store_true", help="keep outputs: continue from cached stages")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra params override")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale-synthetic.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    result.update(
        {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
            "python": platform.python_version(),
        }
    )
    for n in args.sizes:
        if n not in SHAPES:
            parser.error(f"no MovieLens shape for {n}; choose from {sorted(SHAPES)}")
        row = run_size(n, SHAPES[n], args.work, args.resume, args.extra)
        row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        before = [r for r in result["rows"] if r["interactions"] == n]
        if args.resume and before:  # the earlier invocations of a resumed run, newest last
            earlier = before[0].pop("earlier_invocations", [])
            row["earlier_invocations"] = [*earlier, before[0]]
            row["peak_rss_gib_all_invocations"] = max(
                r["peak_rss_gib"] for r in [row, *row["earlier_invocations"]]
            )
        result["rows"] = [r for r in result["rows"] if r["interactions"] != n] + [row]
        result["rows"].sort(key=lambda r: r["interactions"])
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
