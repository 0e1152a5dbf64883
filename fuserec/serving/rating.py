"""``POST /predict``: predicted ratings of a run of the rating task (``task: rating``) from one ONNX graph.

A request names a stored user (their rated events, training ratings included) or sends a rated history,
and the item ids to rate. The graph folds the history in, so a new user or a fresh rating needs no
retraining. Each prediction comes with every model's own prediction and each part of the fused one (they
add up to it before the rating range is applied). A user without ratings gets the baselines' prediction
(global mean plus item bias), and the answer says so. Unknown item ids are a 422 naming them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fuserec.config import ServeConfig
from fuserec.layout import CATALOG_FILE, MODEL_FILE, Layout
from fuserec.manifest import read_json
from fuserec.privacy.minimise import age_group, edges_from_labels
from fuserec.rating_onnx import RatingSession
from fuserec.serving.attributes import UserAttributes
from fuserec.serving.service import (
    MAX_HISTORY_REQUEST,
    Attributes,
    EventsIn,
    catalogue_indices,
    check_provider,
    default_store,
    events_document,
    timed_out,
    unavailable,
    verify_model,
)
from fuserec.serving.store import Event, SQLiteEventStore

log = logging.getLogger("fuserec.serving")

MAX_ITEMS_REQUEST = 1_000
RATINGS_IMPORTED = "rating_task_training_imported"
BASELINE = "baseline"
NO_RATINGS = "no ratings: the baselines' prediction (global mean plus item bias), not the fused model's"
Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class RatedItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: Id
    rating: float = Field(allow_inf_nan=False)


class PredictIn(BaseModel):
    """A stored user (``user_id``) or a rated ``history``, and the ``items`` to rate."""

    model_config = ConfigDict(extra="forbid")
    user_id: Id | None = None
    history: list[RatedItem] | None = Field(None, max_length=MAX_HISTORY_REQUEST)
    items: list[Id] = Field(min_length=1, max_length=MAX_ITEMS_REQUEST)
    time: int | None = Field(
        None, ge=0, le=2**40, description="unix seconds of the request (only ratings by then are read)"
    )
    attributes: Attributes | None = Field(
        None, description="age, gender, occupation: replace a stored user's for this request"
    )


def _client_error(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


class RatingWorker:
    """One thread runs the graph; at most ``queue_size`` requests wait for it, more are refused (503)."""

    def __init__(self, queue_size: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuserec-rating")
        self._slots = threading.BoundedSemaphore(queue_size + 1)
        self.runs = 0
        self.scored = 0
        self.waiting = 0
        self.max_wait = 0.0  # the app sets it during floods; a rating run is short, so it is not used
        self._closed = False

    @property
    def alive(self) -> bool:
        return not self._closed

    async def run(self, fn: Any, *args: Any) -> Any:
        if not self._slots.acquire(blocking=False):
            raise unavailable("the rating model is busy: too many requests are waiting; retry shortly")
        self.waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fn, *args)
        finally:
            self.waiting -= 1
            self._slots.release()

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False)


class RatingService:
    """A rating run's graph, catalogue and the users' stored ratings; what ``/predict`` reads."""

    def __init__(
        self,
        outputs: Path,
        store: Path | SQLiteEventStore | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        settings: ServeConfig | None = None,
    ) -> None:
        self.settings = settings = settings or ServeConfig()
        layout = Layout(Path(outputs))
        self.manifest = read_json(layout.export / "manifest.json")
        verify_model(layout.export, self.manifest)
        requested = list(providers or self.manifest.get("providers") or ["CPUExecutionProvider"])
        threads = settings.threads if threads is None else threads
        self.model = RatingSession(layout.export / MODEL_FILE, requested, threads, spinning=False)
        check_provider(requested, self.model.providers)
        catalog = pd.read_parquet(layout.export / CATALOG_FILE)
        self.item_ids = catalog["item_id"].astype(str).to_numpy()
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.n_items = len(self.item_ids)
        self.components: list[str] = list(self.manifest["components"])
        self.parts: list[str] = list(self.manifest["parts"])
        low, high = (float(v) for v in self.manifest["rating_range"])
        self.rating_range = (low, high)
        self.max_history = int(self.manifest["max_history"])
        self.owns_store = not isinstance(store, SQLiteEventStore)
        if isinstance(store, SQLiteEventStore):
            self.store = store
        else:
            self.store = SQLiteEventStore(store or default_store(settings), settings.history_cap)
        self._import_training(layout)
        columns = tuple(self.model.feature_names) if self.model.reads_user_features else ()
        self.attributes = UserAttributes.load(layout, self.manifest, columns, age_band_of(layout))
        self.batcher = RatingWorker(settings.queue_size)
        log.info("serving rating model %s on %s", self.manifest["algorithm"]["name"], self.model.providers[0])

    def _import_training(self, layout: Layout) -> None:
        """On first start, every training rating of the run, so a known user's history is in the store."""
        if self.store.meta(RATINGS_IMPORTED) is not None:
            return
        train_file, users_file = layout.split_file("train"), layout.clean / "users.parquet"
        if self.store.count() or not (train_file.exists() and users_file.exists()):
            self.store.set_meta(RATINGS_IMPORTED, "skipped: the store was not empty or the run has no split")
            return
        frame = pd.read_parquet(train_file).merge(
            pd.read_parquet(users_file)[["user", "user_id"]], on="user", sort=False
        )
        frame["item_id"] = self.item_ids[frame["item"].to_numpy()]
        frame["user_id"] = frame["user_id"].astype(str)
        self.store.import_frame(frame[["user_id", "item_id", "timestamp", "rating"]])
        self.store.set_meta(RATINGS_IMPORTED, "1")

    # -- requests -----------------------------------------------------------------------------------
    def indices(self, ids: list[str], what: str) -> list[int]:
        return catalogue_indices(self.index, ids, what, "add them to the data and retrain")

    def rated_history(self, req: PredictIn) -> tuple[list[int], list[float]]:
        """The request's rated history as catalogue indices and ratings, latest ``max_history`` kept."""
        if (req.user_id is None) == (req.history is None):
            raise _client_error("give exactly one of user_id or history")
        low, high = self.rating_range
        if req.history is not None:
            bad = [n for n, e in enumerate(req.history) if not low <= e.rating <= high]
            if bad:
                raise _client_error(
                    f"history ratings at positions {bad[:5]} lie outside [{low:g}, {high:g}], the range the "
                    "model was trained on"
                )
            items = self.indices([e.item_id for e in req.history], "history")
            ratings = [e.rating for e in req.history]
        else:
            assert req.user_id is not None
            now = req.time if req.time is not None else int(time.time())
            events = [
                e
                for e in self.store.events(req.user_id, self.settings.history_cap)
                if e.rating is not None and e.timestamp <= now and e.item_id in self.index
            ]
            items = [self.index[e.item_id] for e in events]
            ratings = [float(np.clip(float(e.rating or 0.0), low, high)) for e in events]
        return items[-self.max_history :], ratings[-self.max_history :]

    def features(self, req: PredictIn) -> np.ndarray | None:
        """The request's ``user_features`` row: its attributes, else the stored user's, else None (zeros)."""
        a = req.attributes
        row = self.attributes.row(
            req.user_id, *((a.age, a.gender, a.occupation) if a else (None, None, None))
        )
        return None if row is None else np.asarray(row, np.float32)[None, :]

    def _run(
        self, items: list[int], ratings: list[float], targets: list[int], features: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        out = self.model.run([items], [ratings], [targets], features)
        self.batcher.runs += 1
        self.batcher.scored += 1
        return out

    async def predict_async(self, req: PredictIn) -> dict[str, Any]:
        targets = self.indices(req.items, "requested")
        items, ratings = self.rated_history(req)
        try:
            out = await asyncio.wait_for(
                self.batcher.run(self._run, items, ratings, targets, self.features(req)),
                self.settings.request_timeout_s,
            )
        except TimeoutError:
            raise timed_out(self.settings.request_timeout_s) from None
        return self.answer(req, items, out)

    def answer(self, req: PredictIn, items: list[int], out: dict[str, np.ndarray]) -> dict[str, Any]:
        fused = out["ratings"][0]
        models = out["predictions"][:, 0]
        parts = out["contributions"][:, 0]
        strategy, note = "history", None
        if not items and BASELINE in self.components:
            strategy, note = "baselines", NO_RATINGS
            fused = models[self.components.index(BASELINE)]
        elif not items:  # no baseline rater served: the model's own prediction from an empty history
            strategy = "empty_history"
            note = f"no ratings: {self.manifest['algorithm']['name']}'s prediction from an empty history"
        predictions = []
        for n, item_id in enumerate(req.items):
            predictions.append(
                {
                    "item_id": item_id,
                    "rating": _num(fused[n]),
                    "models": {name: _num(models[c, n]) for c, name in enumerate(self.components)},
                    "contributions": {BASELINE: _num(fused[n])}
                    if strategy == "baselines"  # the baseline alone answered: it is the whole rating
                    else {name: _num(parts[p, n]) for p, name in enumerate(self.parts)},
                }
            )
        body: dict[str, Any] = {
            "model": self.manifest["algorithm"]["name"],
            "strategy": strategy,
            "history_size": len(items),
            "rating_range": list(self.rating_range),
            "predictions": predictions,
        }
        if note:
            body["note"] = note
        if req.user_id is not None:
            body["user_id"] = req.user_id
        return body

    def add_events(self, req: EventsIn) -> dict[str, Any]:
        """Store rated events (all or none): the next ``/predict`` of those users folds them in."""
        self.indices([e.item_id for e in req.events], "event")
        now = int(time.time())
        low, high = self.rating_range
        for n, e in enumerate(req.events):
            if e.timestamp is not None and e.timestamp > now + self.settings.clock_skew_s:
                raise _client_error(
                    f"events[{n}].timestamp is {e.timestamp - now} s in the future; events may be dated at "
                    f"most serve.clock_skew_s={self.settings.clock_skew_s} s after the server's clock"
                )
            if e.rating is None or not low <= e.rating <= high:
                raise _client_error(
                    f"events[{n}] needs a rating within [{low:g}, {high:g}]: this model reads ratings"
                )
        events = [
            Event(e.user_id, e.item_id, now if e.timestamp is None else e.timestamp, "rating", e.rating)
            for e in req.events
        ]
        try:
            stored = self.store.append(events)
        except sqlite3.Error as exc:  # disk full, read-only file, locked too long: nothing was stored
            log.error("event store cannot write (%s): %d events refused", type(exc).__name__, len(events))
            detail = f"the event store cannot write ({exc}); nothing was stored, retry later"
            raise unavailable(detail) from None
        return {"stored": stored}

    def events(self, user_id: str, limit: int) -> dict[str, Any]:
        return events_document(self.store, user_id, limit)

    def close(self) -> None:
        self.batcher.close()
        if self.owns_store:
            self.store.close()


def _num(value: Any) -> float:
    return round(float(value), 6)


def age_band_of(layout: Layout) -> Any:
    """An exact age in the run's users-table terms: its stored group, else its decade (as cold start)."""
    edges: tuple[int, ...] | None = None
    users_file = layout.clean / "users.parquet"
    if users_file.exists():
        users = pd.read_parquet(users_file)
        if "age" in users and not pd.api.types.is_numeric_dtype(users["age"].dtype):
            edges = edges_from_labels(users["age"].tolist())

    def band(age: float) -> str:
        return age_group(age, edges) if edges is not None else str(int(age // 10 * 10))

    return band


def is_rating_model(root: Path) -> bool:
    """Whether the run folder ``root`` exports a rating-task model (its manifest says ``task: rating``)."""
    path = Layout(root).export / "manifest.json"
    return path.exists() and read_json(path).get("task") == "rating"


__all__ = ["PredictIn", "RatedItem", "RatingService", "is_rating_model"]
