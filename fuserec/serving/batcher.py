"""Dynamic batching: requests that arrive together share one onnxruntime run.

On a small machine concurrent requests otherwise queue behind each other, each paying the graph's fixed
per-run cost (the item-item matmuls read the same weights whatever the batch). A single worker thread
takes whatever is queued (up to ``max_batch``) the moment it is free, so a lone request waits for nobody
and a burst is scored at once. Histories of different lengths are right-padded with -1 (the graph treats
padding as absent, a property every plugin's kit checks).

The worker must outlive anything a request does: a request cancelled while queued (a client that hung up, a
timeout) is skipped, one cancelled while its batch runs is answered into the void, and any error is handed
to the waiting requests, so the loop itself never raises. The queue is bounded: when it is full,
:meth:`Batcher.submit` raises :class:`Overloaded` at once instead of letting latency grow without limit.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

from fuserec.onnx_model import CONTRIBUTIONS, OnnxRecommender
from fuserec.serving.batch import pad

log = logging.getLogger("fuserec.serving")


class Overloaded(RuntimeError):
    """The scoring queue is full: the caller should answer 503 and let the client retry."""


class Closed(RuntimeError):
    """This batcher has stopped (its model was replaced): submit to the current one."""


@dataclass(frozen=True)
class Scored:
    """One history's scores ``[n_items]`` and each component's share ``[M, n_items]``."""

    scores: np.ndarray
    contributions: np.ndarray


class Batcher:
    """Scores histories through ``model``, coalescing concurrent calls; :meth:`close` stops the worker."""

    def __init__(self, model: OnnxRecommender, max_batch: int = 32, queue_size: int = 0) -> None:
        """``queue_size``: histories that may wait at once (0 = unbounded)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.runs = 0  # onnxruntime calls so far (what batching saves is visible in tests and /ready)
        self.scored = 0
        self.skipped = 0  # requests cancelled before their batch ran
        self._closed = False
        self._queue: queue.Queue[tuple[list[int], int, Future[Scored]] | None] = queue.Queue(queue_size)
        self._worker = threading.Thread(target=self._loop, name="fuserec-batcher", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        """Whether the scoring worker runs (``/ready`` fails when it does not)."""
        return self._worker.is_alive() and not self._closed

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, items: list[int], last_time: int) -> Future[Scored]:
        """Queue a history; the future resolves when the batch it joined has been scored.

        Raises :class:`Overloaded` when the queue is full and :class:`Closed` after :meth:`close`.
        """
        if self._closed:
            raise Closed("this model has been replaced")
        done: Future[Scored] = Future()
        try:
            self._queue.put_nowait((items, last_time, done))
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} histories are waiting to be scored") from None
        return done

    def score(self, items: list[int], last_time: int, timeout: float = 30.0) -> Scored:
        """Block until this history is scored (in whatever batch the worker forms).

        On timeout the request is withdrawn (the worker skips it) and ``TimeoutError`` is raised.
        """
        done = self.submit(items, last_time)
        try:
            return done.result(timeout=timeout)
        except TimeoutError:
            done.cancel()
            raise

    def score_many(self, histories: list[list[int]], last_time: list[int]) -> list[Scored]:
        """Score a caller's own batch in one run (e.g. an explanation's leave-one-out histories)."""
        return self._run(histories, last_time)

    def close(self) -> None:
        """Stop after the queued requests are answered."""
        self._closed = True
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
                self._answer(batch)
            except BaseException:  # never let one batch end the worker; its requests were answered above
                log.exception("scoring worker: a batch failed unexpectedly; the worker goes on")

    def _answer(self, batch: list[tuple[list[int], int, Future[Scored]]]) -> None:
        # A request cancelled while it waited (client gone, timed out) is dropped; the rest are marked
        # running, after which a cancel no longer succeeds and setting their result is safe.
        live = [b for b in batch if b[2].set_running_or_notify_cancel()]
        self.skipped += len(batch) - len(live)
        if not live:
            return
        try:
            results = self._run([b[0] for b in live], [b[1] for b in live])
        except Exception as exc:  # every waiting request learns why, none hangs
            for _, _, done in live:
                _settle(done, exc=exc)
            return
        for (_, _, done), result in zip(live, results, strict=True):
            _settle(done, result=result)

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


def _settle(done: Future[Scored], result: Scored | None = None, exc: BaseException | None = None) -> None:
    """Answer a request; one that can no longer take an answer is ignored, never fatal to the worker."""
    try:
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass
