"""Dynamic batching: requests that arrive together share one onnxruntime run.

On a small machine concurrent requests otherwise queue behind each other, each paying the graph's fixed
per-run cost (the item-item matmuls read the same weights whatever the batch). A single worker thread
takes whatever is queued (up to ``max_batch``) the moment it is free, so a lone request waits for nobody
and a burst is scored at once. Histories of different lengths are right-padded with -1 (the graph treats
padding as absent, a property every plugin's kit checks).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from fuserec.onnx_model import CONTRIBUTIONS, OnnxRecommender
from fuserec.serving.batch import pad


@dataclass(frozen=True)
class Scored:
    """One history's scores ``[n_items]`` and each component's share ``[M, n_items]``."""

    scores: np.ndarray
    contributions: np.ndarray


class Batcher:
    """Scores histories through ``model``, coalescing concurrent calls; :meth:`close` stops the worker."""

    def __init__(self, model: OnnxRecommender, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.runs = 0  # onnxruntime calls so far (what batching saves is visible in tests and /ready)
        self.scored = 0
        self._queue: queue.Queue[tuple[list[int], int, Future[Scored]] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="fuserec-batcher", daemon=True)
        self._worker.start()

    def submit(self, items: list[int], last_time: int) -> Future[Scored]:
        """Queue a history; the future resolves when the batch it joined has been scored."""
        done: Future[Scored] = Future()
        self._queue.put((items, last_time, done))
        return done

    def score(self, items: list[int], last_time: int, timeout: float = 30.0) -> Scored:
        """Block until this history is scored (in whatever batch the worker forms)."""
        return self.submit(items, last_time).result(timeout=timeout)

    def score_many(self, histories: list[list[int]], last_time: list[int]) -> list[Scored]:
        """Score a caller's own batch in one run (e.g. an explanation's leave-one-out histories)."""
        return self._run(histories, last_time)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5.0)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            try:
                results = self._run([b[0] for b in batch], [b[1] for b in batch])
            except Exception as exc:  # every waiting request learns why, none hangs
                for _, _, done in batch:
                    done.set_exception(exc)
                continue
            for (_, _, done), result in zip(batch, results, strict=True):
                done.set_result(result)

    def _run(self, histories: list[list[int]], last_time: list[int]) -> list[Scored]:
        padded = pad(histories)
        times = np.asarray(last_time, dtype=np.int64)
        if CONTRIBUTIONS in self.model.outputs:
            scores, _, _, parts = self.model.run_with_contributions(padded, times)
        else:  # an older export: the model is its own single share
            scores = self.model.run(padded, times)[0]
            parts = scores[None]
        self.runs += 1
        self.scored += len(histories)
        return [Scored(scores[i], parts[:, i]) for i in range(len(histories))]
