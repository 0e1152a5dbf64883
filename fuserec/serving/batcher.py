"""Dynamic batching: requests that arrive together share one onnxruntime run.

On a small machine concurrent requests otherwise queue behind each other, each paying the graph's fixed
per-run cost (the item-item matmuls read the same weights whatever the batch). A single worker thread
takes whatever is queued (up to ``max_batch``) the moment it is free, so a lone request waits for nobody
and a burst is scored at once. Histories of different lengths are right-padded with -1 (the graph treats
padding as absent, a property every plugin's kit checks).

The worker must outlive anything a request does: a request cancelled while queued (a client that hung up, a
timeout) is skipped, one cancelled while its batch runs is answered into the void, and any error is handed
to the waiting requests, so the loop itself never raises.

Overload is refused, not queued: when the queue is full :meth:`Batcher.submit` raises :class:`Overloaded`
at once, and a request that has already waited longer than ``max_wait`` when the worker reaches it is
answered :class:`Overloaded` instead of being scored (shedding at the head of the queue, as CoDel does), so
the requests that are scored keep a latency close to an unloaded one (off unless ``max_wait`` is set).

A caller's own batch (an explanation's leave-one-out histories) runs in the caller's thread beside the
worker, one such batch at a time: both cores stay busy, and at most two model runs (so two runs' working
memory) are ever in flight, however many explanations are asked for at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuserec.onnx_model import CONTRIBUTIONS, OnnxRecommender
from fuserec.serving.batch import pad

log = logging.getLogger("fuserec.serving")


class Overloaded(RuntimeError):
    """The scoring queue is full: the caller should answer 503 and let the client retry."""


class Closed(RuntimeError):
    """This batcher has stopped (its model was replaced): submit to the current one."""


@dataclass
class _Job:
    """One queued history and the future its caller waits on."""

    items: list[int]
    last_time: int
    done: Future[Scored]
    features: np.ndarray | None = None  # the graph's user_features row; None = attributes unknown
    context: Any = None  # what the batch hook needs of this request (the service's side-scorer inputs)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Scored:
    """One history's scores ``[n_items]`` and each component's share ``[M, n_items]``.

    ``names``: the shares' names when the batch hook renamed or added shares (None: the model's own)."""

    scores: np.ndarray
    contributions: np.ndarray
    names: list[str] | None = None


#: Run by the worker on each batch it scored, with each request's ``context``: ``(scores [B, n],
#: parts [M, B, n], contexts) -> (scores [B, n'], parts [M', B, n'], names)``. Why in the worker: array work
#: on a whole batch costs about what it costs on one request.
BatchHook = Callable[[np.ndarray, np.ndarray, list[Any]], tuple[np.ndarray, np.ndarray, list[str]]]


class Batcher:
    """Scores histories through ``model``, coalescing concurrent calls; :meth:`close` stops the worker."""

    def __init__(
        self,
        model: OnnxRecommender,
        max_batch: int = 32,
        queue_size: int = 0,
        max_wait: float = 0.0,
        hook: BatchHook | None = None,
    ) -> None:
        """``queue_size``: requests that may wait at once (0 = unbounded); ``max_wait``: seconds a request
        may wait for the worker before it is refused (0 = no limit); ``hook``: run on each queued batch
        whose requests all carry a ``context`` (:data:`BatchHook`)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.runs = 0  # onnxruntime calls so far (what batching saves is visible in tests and /ready)
        self.scored = 0
        self.max_wait = max_wait
        self.hook = hook
        self.skipped = 0  # requests cancelled before their batch ran
        self.shed = 0  # requests refused because they waited longer than max_wait
        self._closed = False
        self._side = threading.BoundedSemaphore(1)  # one caller's own batch at a time, beside the worker
        self._queue: queue.Queue[_Job | None] = queue.Queue(queue_size)
        self._worker = threading.Thread(target=self._loop, name="fuserec-batcher", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        """Whether the scoring worker runs (``/ready`` fails when it does not)."""
        return self._worker.is_alive() and not self._closed

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(
        self, items: list[int], last_time: int, features: np.ndarray | None = None, context: Any = None
    ) -> Future[Scored]:
        """Queue a history (and the user's attribute row, where the graph reads one); the future resolves
        when the batch it joined has been scored.

        Raises :class:`Overloaded` when the queue is full and :class:`Closed` after :meth:`close`.
        """
        done: Future[Scored] = Future()
        self._put(_Job(items, last_time, done, features, context))
        return done

    def _put(self, job: _Job) -> None:
        if self._closed:
            raise Closed("this model has been replaced")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests are waiting to be scored") from None

    def score(
        self, items: list[int], last_time: int, timeout: float = 30.0, features: np.ndarray | None = None
    ) -> Scored:
        """Block until this history is scored (in whatever batch the worker forms).

        On timeout the request is withdrawn (the worker skips it) and ``TimeoutError`` is raised.
        """
        done = self.submit(items, last_time, features)
        try:
            return done.result(timeout=timeout)
        except TimeoutError:
            done.cancel()
            raise

    def score_many(
        self,
        histories: list[list[int]],
        last_time: list[int],
        timeout: float = 30.0,
        features: np.ndarray | None = None,
    ) -> list[Scored]:
        """Score a caller's own batch in one run, in this thread, once no other such batch runs (e.g. an
        explanation's leave-one-out histories); ``TimeoutError`` when that takes over ``timeout``."""
        if self._closed:
            raise Closed("this model has been replaced")
        if not self._side.acquire(timeout=timeout):
            raise TimeoutError(f"another caller's batch ran for over {timeout:g} s")
        try:
            rows: list[np.ndarray | None] | None = None
            if features is not None:
                rows = [features] * len(histories)  # one user's variants
            return self._run(histories, last_time, rows)
        finally:
            self._side.release()

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

    def _answer(self, batch: list[_Job]) -> None:
        # A request that waited too long is refused (its client is better off retrying than waiting
        # more); one cancelled while it waited (client gone, timed out) is dropped. The rest are marked
        # running, after which a cancel no longer succeeds and setting their result is safe.
        now, live = time.monotonic(), []
        for job in batch:
            if not job.done.set_running_or_notify_cancel():
                self.skipped += 1
            elif self.max_wait > 0 and now - job.queued_at > self.max_wait:
                self.shed += 1
                waited = f"waited over {self.max_wait * 1000:.0f} ms for the model"
                _settle(job.done, exc=Overloaded(waited))
            else:
                live.append(job)
        if not live:
            return
        try:
            results = self._run(
                [job.items for job in live],
                [job.last_time for job in live],
                [job.features for job in live],
                [job.context for job in live],
            )
        except Exception as exc:  # every waiting request learns why, none hangs
            for job in live:
                _settle(job.done, exc=exc)
            return
        for job, result in zip(live, results, strict=True):
            _settle(job.done, result=result)

    def _run(
        self,
        histories: list[list[int]],
        last_time: list[int],
        features: list[np.ndarray | None] | None = None,
        contexts: list[Any] | None = None,
    ) -> list[Scored]:
        padded = pad(histories)
        times = np.asarray(last_time, dtype=np.int64)
        matrix = None
        if self.model.feature_names:  # unknown attributes stay zero rows: the history-only path
            matrix = np.zeros((len(histories), len(self.model.feature_names)), dtype=np.float32)
            for i, row in enumerate(features or []):
                if row is not None:
                    matrix[i] = row
        if CONTRIBUTIONS in self.model.outputs:
            scores, _, _, parts = self.model.run_with_contributions(padded, times, matrix)
        else:  # an older export: the model is its own single share
            scores = self.model.run(padded, times, matrix)[0]
            parts = scores[None]
        self.runs += 1
        self.scored += len(histories)
        names: list[str] | None = None
        if self.hook is not None and contexts and all(c is not None for c in contexts):
            scores, parts, names = self.hook(scores, parts, contexts)
        return [Scored(scores[i], parts[:, i], names) for i in range(len(histories))]


def _settle(done: Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Answer a request; one that can no longer take an answer is ignored, never fatal to the worker."""
    try:
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)
    except InvalidStateError:
        pass
