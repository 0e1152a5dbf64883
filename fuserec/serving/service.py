"""What every request reads and the rules that turn a request into a ranked, explained list.

The exported ONNX model, its catalogue and the event store are loaded once. A request never touches
training code: raw ids map to catalogue indices (unknown ids are refused before anything reaches the
graph's Gather), the history is the user's stored positive events (or the request's own), and the one
exported graph scores it, through :class:`~fuserec.serving.batcher.Batcher` so concurrent requests share a
run. Users with no usable history are served by explicit cold-start rules (onboarding genres, user
attributes, popularity), each named in the response. The HTTP layer (``app.py``) only validates and routes.

``/explain`` reports what the served model itself says: each component's share (the graph's
``contributions`` output), the rank ``/recommend`` gives the item, and one batched leave-one-out run over
the latest history items (``EXPLAIN_DRIVERS``). That run answers "because you liked" (the fused score's
drops) and, when ``sasrec`` is a component, which recent items mattered to the sequence model (the drops
of sasrec's own share, the leave-one-out attribution sasrec's ``explain`` computes). When ``kg`` is a
component, its graph paths are the kg plugin's own ``explain``, run here from the explain state the
export saved beside the graph (:mod:`fuserec.explain_states`); they are listed only when kg's share of
the item's score is positive, and each section says when and why it is not available.

A request never waits without bound: scoring waits at most ``serve.request_timeout_s`` (then 504), a full
scoring queue answers 503 with ``Retry-After`` at once, and a store that cannot write (disk full, read-only)
answers 503 for events while recommendations go on from what it can read.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from fuserec.api import Algorithm
from fuserec.config import ServeConfig
from fuserec.explain_states import load_explainers
from fuserec.features import item_content_vectors
from fuserec.layout import CATALOG_FILE, MODEL_FILE, Layout
from fuserec.manifest import file_sha256, read_json
from fuserec.metrics import top_k
from fuserec.onnx_model import OnnxRecommender
from fuserec.rerank import Rerank, mmr_top_k, unit_vectors
from fuserec.serving.attributes import UserAttributes
from fuserec.serving.batch import catalog_titles, indexed_history, training_events
from fuserec.serving.batcher import Batcher, Overloaded, Scored
from fuserec.serving.coldstart import ColdStart, attribute_values, genre_sets
from fuserec.serving.new_items import ADDED_REASON, NEW_ITEMS, ItemsIn, NewItems, genres_text
from fuserec.serving.store import Event, SQLiteEventStore

log = logging.getLogger("fuserec.serving")

MAX_K = 100
LOW_RATINGS_IMPORTED = "training_low_ratings_imported"  # store note: its training import has low ratings
MAX_HISTORY_REQUEST = 10_000  # ids in one explicit history (longer is a client error, not a model limit)
MAX_EVENTS_REQUEST = 1_000
MAX_GENRES = 50
EXPLAIN_DRIVERS = 50  # latest history items tried one by one when explaining a score
DRIVERS_SHOWN = 3
RECENT_SHOWN = 5  # recent items listed for the sequence model
KG, SEQUENCE = "kg", "sasrec"  # the components /explain has a section for
NO_HISTORY = "no history: cold-start rules scored this item, not the model"

RETRY_AFTER_S = 1  # what a 503 tells a client to wait before retrying
EventKind = Literal["view", "click", "like", "purchase", "interaction", "rating", "dislike"]
EVENT_KINDS = (
    "view, click, like, purchase and interaction are positives; rating is a positive when its rating "
    "reaches the training's implicit threshold (and needs a rating); dislike never is. Any event, "
    "whatever its kind, marks the item as seen, so it is not recommended again."
)

Id = Annotated[str, Field(min_length=1, max_length=128)]
Genre = Annotated[str, Field(min_length=1, max_length=64)]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id
    kind: EventKind = Field("interaction", description=EVENT_KINDS)
    rating: float | None = Field(
        None, ge=-1e6, le=1e6, allow_inf_nan=False, description="within the run's validated rating range"
    )
    timestamp: int | None = Field(
        None,
        ge=0,
        le=2**40,
        description="unix seconds (0 is a time, not 'missing'); absent: now; "
        "later than now + serve.clock_skew_s: 422",
    )


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_REQUEST)


class Onboarding(BaseModel):
    """What a new user told us before any event: liked genres and/or liked items."""

    model_config = ConfigDict(extra="forbid")
    genres: list[Genre] = Field(default_factory=list, max_length=MAX_GENRES)
    items: list[Id] = Field(default_factory=list, max_length=MAX_HISTORY_REQUEST)


class Attributes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    age: int | None = Field(None, ge=0, le=130)
    gender: Annotated[str, Field(min_length=1, max_length=16)] | None = None
    occupation: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class ItemFilter(BaseModel):
    """Only items with at least one of ``genres`` (case-insensitive)."""

    model_config = ConfigDict(extra="forbid")
    genres: list[Genre] = Field(min_length=1, max_length=MAX_GENRES)


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id | None = None
    history: list[Id] | None = Field(None, max_length=MAX_HISTORY_REQUEST)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_HISTORY_REQUEST)
    time: int | None = Field(
        None,
        ge=0,
        le=2**40,
        description="unix seconds of the request (only events by then are read); default now",
    )
    filter: ItemFilter | None = None
    diversity: float | None = Field(None, ge=0.0, lt=1.0, description="MMR weight of dissimilarity")
    onboarding: Onboarding | None = None
    attributes: Attributes | None = None


@dataclass(frozen=True)
class LeaveOneOut:
    """A history's scores, and its scores with each of ``positions`` left out (one batched run)."""

    items: list[int]
    positions: list[int]
    full: Scored
    without: list[Scored]


@dataclass(frozen=True)
class Plan:
    request: RecommendIn
    items: list[int]
    last: int
    blocked: np.ndarray
    source: str
    features: np.ndarray | None = None  # the graph's user_features row (None: attributes unknown)
    side: list[int] = field(default_factory=list)  # the history with added items (the side scorer's)
    seen: np.ndarray | None = None  # bool [n_items + added]: every item the user has an event for


def _client_error(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def unavailable(detail: str) -> HTTPException:
    """503 with ``Retry-After``: the service is fine but cannot take this request now."""
    return HTTPException(status_code=503, detail=detail, headers={"Retry-After": str(RETRY_AFTER_S)})


def timed_out(seconds: float) -> HTTPException:
    return HTTPException(
        status_code=504,
        detail=f"the model did not answer within {seconds:g} s (serve.request_timeout_s); retry later",
    )


def default_store(settings: ServeConfig, served_dir: str | Path = "served") -> Path:
    """``serve.store``, else ``<promote.served_dir>/events.sqlite``: never inside a model's folder, so
    promotions and re-exports leave it alone."""
    return Path(settings.store) if settings.store else Path(served_dir) / "events.sqlite"


def check_provider(requested: list[str], running: list[str]) -> None:
    """No silent fallback: a session that runs on another provider than the first asked for (CUDA asked,
    CPU given after a failed CUDA start) is an error, not a slower service."""
    if running[0] != requested[0]:
        raise RuntimeError(
            f"asked onnxruntime for {requested[0]} but the session runs on {running[0]}; "
            "check the CUDA/cuDNN install or serve with --provider CPUExecutionProvider"
        )


def catalogue_indices(index: dict[str, int], ids: list[str], what: str, remedy: str) -> list[int]:
    """The catalogue rows of item ``ids``; a 422 naming the first unknown ones (``what``: whose ids) and
    how to fix it (``remedy``) when any is not in the exported catalogue."""
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise _client_error(
            f"unknown {what} item ids {unknown[:5]}: they are not in the exported catalogue "
            f"(outputs/model/catalog.parquet); {remedy}, or leave them out"
        )
    return [index[i] for i in ids]


def events_document(store: SQLiteEventStore, user_id: str, limit: int) -> dict[str, Any]:
    """``GET /events``' body: the user's latest ``limit`` stored events, oldest first, as stored."""
    return {
        "user_id": user_id,
        "events": [
            {"item_id": e.item_id, "timestamp": e.timestamp, "kind": e.kind, "rating": e.rating}
            for e in store.events(user_id, limit)
        ],
    }


def verify_model(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a model file whose bytes are not the ones the export checked and recorded."""
    for name, key in ((MODEL_FILE, "sha256"), (f"{MODEL_FILE}.data", "external_data_sha256")):
        expected = manifest.get(key)
        if not expected:
            if key == "sha256":
                raise RuntimeError(
                    f"{folder / 'manifest.json'} records no sha256 of {name}; re-export the model"
                )
            continue
        actual = file_sha256(folder / name)
        if actual != expected:
            raise RuntimeError(
                f"{folder / name} has sha256 {actual[:12]}..., but its manifest records "
                f"{str(expected)[:12]}...: "
                "the file changed after export (a partial copy, a manual edit); re-export or restore it"
            )


class Service:
    """Model, catalogue, store and cold-start priors, loaded once; what every request reads."""

    def __init__(
        self,
        outputs: Path,
        store: Path | SQLiteEventStore | None = None,
        providers: list[str] | None = None,
        max_batch: int | None = None,
        threads: int | None = None,
        settings: ServeConfig | None = None,
    ) -> None:
        """``store``: a path, or an open store shared with other Services (a reload keeps it)."""
        self.settings = settings = settings or ServeConfig()
        max_batch = settings.max_batch if max_batch is None else max_batch
        threads = settings.threads if threads is None else threads
        layout = Layout(Path(outputs))
        self.manifest = read_json(layout.export / "manifest.json")
        verify_model(layout.export, self.manifest)
        requested = list(providers or self.manifest["providers"])
        self.model = OnnxRecommender(
            layout.export / MODEL_FILE,
            requested,
            threads,
            spinning=False,
            prepack=self.manifest.get("prepack", False),
        )
        check_provider(requested, self.model.providers)
        log.info("serving %s on %s", self.manifest["algorithm"]["name"], self.model.providers[0])
        self.catalog = pd.read_parquet(layout.export / CATALOG_FILE)
        self.item_ids = self.catalog["item_id"].astype(str).to_numpy()
        self.titles = catalog_titles(self.catalog).tolist()
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.n_items = len(self.item_ids)
        self.max_history = int(self.manifest["max_history"])
        self.threshold = self.manifest.get("implicit_threshold")
        self.components: list[str] = self.manifest.get("components") or [self.manifest["algorithm"]["name"]]
        # components that explain here from the state the export saved (kg's graph walks), and why not
        self.explainers: dict[str, Algorithm]
        self.explainers, self.explain_missing = load_explainers(
            layout.export, self.manifest.get("explain_states") or {}
        )
        self.genres = genre_sets(self.catalog)
        self.vectors = torch.from_numpy(unit_vectors(item_content_vectors(self.catalog)))
        # A request's diversity re-ranks with the export's pool, head and order, so it moves along the
        # same curve as the served graph's own re-ranking (manifests from before these keys: defaults).
        shape, default = self.manifest.get("rerank") or {}, Rerank()
        self.rerank_shape: dict[str, Any] = {
            "depth": int(shape.get("depth", default.depth)),
            "keep": int(shape.get("keep", default.keep)),
            "order": str(shape.get("order", default.order)),
        }
        rating_range = self.manifest.get("rating_range")
        self.rating_range: tuple[float, float] | None = (
            (float(rating_range[0]), float(rating_range[1])) if rating_range else None
        )
        self.owns_store = not isinstance(store, SQLiteEventStore)
        if isinstance(store, SQLiteEventStore):
            self.store = store
        else:
            self.store = SQLiteEventStore(store or default_store(settings), settings.history_cap)
        self.cold = ColdStart(layout, self.n_items, self.genres)
        self.new_items = NewItems(layout.export, self.manifest, self.catalog, self.store)
        self.attributes = UserAttributes.load(
            layout, self.manifest, self.model.feature_names, self.cold.age_band
        )
        self._import_training(layout)
        self.batcher = Batcher(
            self.model, max_batch, settings.queue_size, settings.max_queue_wait_ms / 1000, self._merge_batch
        )

    # -- loading ------------------------------------------------------------------------------------
    def _import_training(self, layout: Layout) -> None:
        """On first start, the training positives and the low ratings before each user's test period
        (``training_events``): everybody's history, and what they have seen.

        A store whose import predates the low ratings (no ``LOW_RATINGS_IMPORTED`` note) gets them once.
        """
        if self.store.meta(LOW_RATINGS_IMPORTED) is not None:
            return
        train_file, users_file = layout.split_file("train"), layout.clean / "users.parquet"
        fresh = self.store.count() == 0
        if not (train_file.exists() and users_file.exists()):
            self.store.set_meta(LOW_RATINGS_IMPORTED, "nothing to import")
            return
        events, users = training_events(layout), pd.read_parquet(users_file)
        if not fresh:  # the positives are there from the earlier import, with whatever came since
            events = events[~events["positive"].to_numpy(bool)]
        frame = events.merge(users[["user", "user_id"]], on="user", sort=False)
        frame["item_id"] = self.item_ids[frame["item"].to_numpy()]
        frame["user_id"] = frame["user_id"].astype(str)
        frame["rating"] = frame["rating"].astype(object).where(frame["rating"].notna(), None)
        self.store.import_frame(frame[["user_id", "item_id", "timestamp", "rating"]])
        self.store.set_meta(LOW_RATINGS_IMPORTED, "1")

    # -- requests -----------------------------------------------------------------------------------
    def indices(self, ids: list[str], what: str) -> list[int]:
        return catalogue_indices(self.index, ids, what, "add the items and re-export")

    def history(self, user_id: str, now: int) -> tuple[list[int], int]:
        """The user's latest positive events as catalogue indices, and the time of the latest one."""
        items, last, _ = indexed_history(
            self.store, user_id, self.index, self.max_history, self.threshold, now
        )
        return items, last

    def plan(self, req: RecommendIn) -> Plan:
        """Everything about a request but the model run: validated ids, history, what may not be listed."""
        if (req.user_id is None) == (req.history is None):
            raise _client_error("give exactly one of user_id or history")
        now = req.time if req.time is not None else int(time.time())
        seen: list[int] = []
        if req.user_id is not None:  # seen: low ratings and older positives too
            items, last, side, seen = self.user_items(req.user_id, now)
        else:
            side = self.known(list(req.history or [])[-self.max_history :], "history")
            items, last = [i for i in side if i < self.n_items], now
        excluded = self.known(req.exclude, "excluded")
        source = "history"
        if not items and req.onboarding and req.onboarding.items:
            side = self.known(req.onboarding.items[-self.max_history :], "onboarding")
            items, last, source = [i for i in side if i < self.n_items], now, "onboarding"
        size = self.new_items.size
        own = np.zeros(size, dtype=bool)
        own[side + seen] = True
        blocked = own.copy()
        blocked[excluded] = True
        if req.filter is not None:
            blocked |= ~self.genre_mask(req.filter.genres, size)
        a = req.attributes
        features = self.attributes.row(
            req.user_id, *((a.age, a.gender, a.occupation) if a else (None, None, None))
        )
        return Plan(req, items, last, blocked, source, features, side, own)

    def finish(self, plan: Plan, scored: Scored | None) -> dict[str, Any]:
        """The ranked response from the model's scores (or the cold-start rules when there are none)."""
        req = plan.request
        size = self.new_items.size
        if scored is not None and scored.names is not None:  # merged by the worker with its batch
            scores, parts, names, strategy = scored.scores, scored.contributions, scored.names, plan.source
        elif scored is not None:  # the graph's scores, and the side scorer's items without interactions
            seen = _sized(plan.seen if plan.seen is not None else plan.blocked, size)
            scores, parts, names = self.new_items.merge(
                scored.scores, scored.contributions, self.components, plan.side, seen
            )
            strategy = plan.source
        else:
            scores, parts, names, strategy = self.cold_scores(req)
            scores, parts = _after_all(scores, parts, size)
        top = self.rank(scores, _sized(plan.blocked, len(scores)), req.k, req.diversity)
        return {
            "user_id": req.user_id,
            "history_length": len(plan.items),
            "model": self.manifest["algorithm"]["name"],
            "strategy": strategy,
            "items": [self._item(i, scores, parts, names) for i in top],
        }

    def _merge_batch(
        self, scores: np.ndarray, parts: np.ndarray, contexts: list[Any]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The worker's batch hook: the side scorer's merge of a whole batch (contexts: each request's
        side history and seen items), as :meth:`finish` would merge each request alone."""
        size = self.new_items.size
        seen = np.stack([_sized(np.asarray(c[1], dtype=bool), size) for c in contexts])
        return self.new_items.merge_many(scores, parts, self.components, [c[0] for c in contexts], seen)

    def recommend(self, req: RecommendIn) -> dict[str, Any]:
        plan = self.plan(req)
        return self.finish(plan, self.score(plan.items, plan.last, plan.features) if plan.items else None)

    async def recommend_async(self, req: RecommendIn) -> dict[str, Any]:
        """:meth:`recommend` without holding a worker thread while the batcher scores."""
        plan = self.plan(req)
        if not plan.items:
            return self.finish(plan, None)
        timeout = self.settings.request_timeout_s
        try:
            context = (plan.side, plan.seen if plan.seen is not None else plan.blocked)
            waiting = self.batcher.submit(plan.items, plan.last, plan.features, context)
            # wait_for cancels the wrapped future on timeout; the batcher then skips it (or, mid-run,
            # answers into the void): neither harms the worker
            scored = await asyncio.wait_for(asyncio.wrap_future(waiting), timeout)
        except Overloaded as exc:  # a full queue, or shed after waiting too long
            raise unavailable(f"overloaded: {exc}; retry after {RETRY_AFTER_S} s") from None
        except TimeoutError:
            raise timed_out(timeout) from None
        return self.finish(plan, scored)

    def score(self, items: list[int], last: int, features: np.ndarray | None = None) -> Scored:
        """One history through the batcher, with the request timeout and overload mapped to 504 / 503."""
        return self.score_many([items], [last], alone=False, features=features)[0]

    def score_many(
        self,
        histories: list[list[int]],
        last: list[int],
        alone: bool = True,
        features: np.ndarray | None = None,
    ) -> list[Scored]:
        """Histories through the batcher (``alone``: as one run of their own), overload and the request
        timeout mapped to 503 / 504. ``features``: the one user's attribute row, for every history."""
        timeout = self.settings.request_timeout_s
        try:
            if alone:
                return self.batcher.score_many(histories, last, timeout=timeout, features=features)
            return [self.batcher.score(histories[0], last[0], timeout=timeout, features=features)]
        except Overloaded as exc:
            raise unavailable(f"overloaded: {exc}; retry after {RETRY_AFTER_S} s") from None
        except TimeoutError:
            raise timed_out(self.settings.request_timeout_s) from None

    def cold_scores(self, req: RecommendIn) -> tuple[np.ndarray, np.ndarray, list[str], str]:
        """A user with no usable history: onboarding genres, else attributes, else popularity."""
        a = req.attributes
        cold = self.cold.scores(
            req.user_id,
            attribute_values(a.age, a.gender, a.occupation) if a else None,
            req.onboarding.genres if req.onboarding else None,
        )
        return cold.scores, cold.parts, cold.names, cold.strategy

    def rank(self, scores: np.ndarray, blocked: np.ndarray, k: int, diversity: float | None) -> list[int]:
        """Top ``k`` unblocked items: by score (ties to the lower index), or diversified by MMR."""
        n = len(scores)
        if diversity:
            rerank = Rerank(diversity=diversity, **self.rerank_shape)
            vectors = self.vectors
            added = self.new_items.refresh().diversity
            if n > self.n_items:  # items added after the export, in the same TF-IDF space
                vectors = torch.cat([vectors, torch.from_numpy(added[: n - self.n_items])])
            with torch.no_grad():
                picked = mmr_top_k(
                    torch.from_numpy(scores.astype(np.float32))[None],
                    torch.from_numpy(blocked)[None],
                    vectors,
                    torch.zeros(n),
                    k,
                    rerank,
                )[0].numpy()
            return [int(i) for i in picked if i >= 0]
        # a partial sort (the protocol's top_k), not a sort of the whole catalogue per request
        picked = top_k(scores[None], k, exclude=blocked[None])[0]
        return picked[picked >= 0].tolist()

    def _item(self, i: int, scores: np.ndarray, parts: np.ndarray, names: list[str]) -> dict[str, Any]:
        item_id, title, genres = self._describe(i)
        out = {
            "item_id": item_id,
            "title": title,
            "genres": genres,
            "score": float(scores[i]),
            "contributions": _shares(parts[:, i], names),
        }
        return out if i < self.n_items else out | {"added": True}

    def _describe(self, i: int) -> tuple[str, str, list[str]]:
        """Id, title and genres of a catalogue item, or of an added one (indices after the catalogue)."""
        if i < self.n_items:
            return str(self.item_ids[i]), self.titles[i], sorted(self.genres[i])
        record = self.new_items.record(i)
        return record.item_id, record.title, genres_text(record.genres)

    def explain(self, user_id: str, item_id: str, now: int | None = None) -> dict[str, Any]:
        """Why ``item_id`` scores what it does for ``user_id``: each model's share, the history items
        whose removal lowers the score most ("because you liked"), what they share with it, the kg
        plugin's own graph paths and the recent items that mattered to sasrec, when they are fused."""
        (target,) = self.known([item_id], "explained")
        now = now if now is not None else int(time.time())
        items, last, side, seen = self.user_items(user_id, now)
        size = max(self.new_items.size, target + 1)
        own = np.zeros(size, dtype=bool)
        own[side + seen] = True
        loo: LeaveOneOut | None = None
        drivers: list[dict[str, Any]] = []
        if not items:
            cold = self.cold.scores(user_id)
            scores, parts = _after_all(cold.scores, cold.parts, size)
            names, strategy = cold.names, cold.strategy
        else:
            features = self.attributes.row(user_id, None, None, None)  # as /recommend scores this user
            scored = self.score(items, last, features)
            scores, parts, names = self.new_items.merge(
                scored.scores, scored.contributions, self.components, side, _sized(own, size)
            )
            strategy = "history"
            loo = self._leave_one_out(items, last, scored, features)
            drivers = self._drivers(loo, target) if target < self.n_items else []
        contributions = _shares(parts[:, target], names)
        score = float(scores[target])
        # the item's place in /recommend's list for the same user and time: the same items are left out
        # (the history and everything else seen by then) and ties go to the lower index, as rank() orders
        size = len(scores)
        unblocked = ~_sized(own, size)
        ahead = (scores > score) | ((scores == score) & (np.arange(size) < target))
        rank = int((ahead & unblocked).sum()) + 1 if unblocked[target] else None
        _, title, _ = self._describe(target)
        added = {"available": False, "reason": ADDED_REASON}
        out = {
            "user_id": user_id,
            "item_id": item_id,
            "title": title,
            "model": self.manifest["algorithm"]["name"],
            "strategy": strategy,
            "score": score,
            "rank": rank,
            "in_history": target in side,
            "seen": bool(not unblocked[target]),
            "contributions": contributions,
            "unexplained": score - float(sum(contributions.values())),
            "because_you_liked": drivers,
            "kg": self._kg(user_id, items, target, contributions) if target < self.n_items else added,
            "sequence": self._sequence(loo, target) if target < self.n_items else added,
        }
        if self.new_items.is_candidate(target):  # an item the side scorer handles: say how
            out["new_item"] = self.new_items.explanation(target, side, _sized(own, size))
        return out

    def _leave_one_out(
        self, items: list[int], last: int, full: Scored, features: np.ndarray | None = None
    ) -> LeaveOneOut:
        """The history scored with each of its latest ``EXPLAIN_DRIVERS`` items left out, in one run."""
        positions = list(range(max(0, len(items) - EXPLAIN_DRIVERS), len(items)))
        without = [items[:p] + items[p + 1 :] for p in positions]
        scored = self.score_many(without, [last] * len(without), features=features)
        return LeaveOneOut(items, positions, full, scored)

    def _drivers(self, loo: LeaveOneOut, target: int) -> list[dict[str, Any]]:
        """The history items whose removal lowers the served score most: the model says what drove it."""
        score = float(loo.full.scores[target])
        drops = [
            (score - float(s.scores[target]), loo.items[p])
            for s, p in zip(loo.without, loo.positions, strict=True)
        ]
        drops.sort(key=lambda d: -d[0])
        return [
            {
                "item_id": str(self.item_ids[i]),
                "title": self.titles[i],
                "score_drop_without_it": drop,
                "shared_genres": sorted(self.genres[i] & self.genres[target]),
            }
            for drop, i in drops[:DRIVERS_SHOWN]
            if drop > 0
        ]

    def _kg(
        self, user_id: str, items: list[int], target: int, contributions: dict[str, float]
    ) -> dict[str, Any]:
        """The kg plugin's own paths user -> liked item -> entity (or co-users) -> item, with weights.

        A path's weight is its part of kg's own score ``u(h) . V_item`` (the plugin's units, before any
        fusion); the paths are listed only when kg's share of the served score is positive.
        """
        if KG not in self.components:
            return {"available": False, "reason": f"{KG} is not part of the served model"}
        explainer = self.explainers.get(KG)
        if explainer is None:
            why = self.explain_missing.get(
                KG, "the export saved no explain state for it; re-export the model"
            )
            return {"available": False, "reason": f"{KG}'s paths cannot be computed here: {why}"}
        if not items:
            return {"available": False, "reason": NO_HISTORY}
        share = contributions[KG]
        out: dict[str, Any] = {"available": True, "component": KG, "contribution": share}
        if share <= 0:
            return out | {
                "supports_item": False,
                "reason": f"{KG}'s share of this item's score is {share:.4g}, not positive: "
                "its graph paths do not support the item",
                "paths": [],
            }
        own = explainer.explain(np.asarray(items, dtype=np.int64), target) or {}
        return out | {
            "supports_item": True,
            "kg_score": own.get("score"),
            "tail_lift": own.get("tail_lift"),
            "paths": [self._kg_path(user_id, p, target) for p in own.get("paths", [])],
        }

    def _kg_path(self, user_id: str, path: dict[str, Any], target: int) -> dict[str, Any]:
        """One of kg's paths with catalogue ids and titles (the plugin's explain state has no names)."""
        liked, through = int(path["from_item"]), str(path["path"][1])
        out = {
            "path": [f"user {user_id}", self.titles[liked], through, self.titles[target]],
            "liked_item_id": str(self.item_ids[liked]),
            "via": path["via"],
            "through": through,
            "weight": float(path["weight"]),
            "walk_share": float(path["walk_share"]),
        }
        if "n_users" in path:
            out["n_users"] = int(path["n_users"])
        return out

    def _sequence(self, loo: LeaveOneOut | None, target: int) -> dict[str, Any]:
        """Which recent items mattered to sasrec: how much removing each lowers sasrec's share of the
        score, read from the leave-one-out run already made (no other model run)."""
        if SEQUENCE not in self.components:
            return {"available": False, "reason": f"{SEQUENCE} is not part of the served model"}
        if loo is None:
            return {"available": False, "reason": NO_HISTORY}
        m = self.components.index(SEQUENCE)
        share = float(loo.full.contributions[m, target])
        drops: dict[int, float] = {}
        newest_first = zip(reversed(loo.without), reversed(loo.positions), strict=True)  # ties: the newer
        for s, p in newest_first:
            item, drop = loo.items[p], share - float(s.contributions[m, target])
            drops[item] = max(drops.get(item, -np.inf), drop)  # a repeated item: its largest effect
        ranked = sorted(drops.items(), key=lambda kv: -kv[1])[:RECENT_SHOWN]
        return {
            "available": True,
            "component": SEQUENCE,
            "method": "leave_one_out",
            "contribution": share,
            "items_tried": len(loo.positions),
            "recent_items": [
                {"item_id": str(self.item_ids[i]), "title": self.titles[i], "contribution_drop": drop}
                for i, drop in ranked
            ],
        }

    def add_events(self, req: EventsIn) -> dict[str, Any]:
        """Check every event, then store them all in one transaction (all or none)."""
        self.known([e.item_id for e in req.events], "event")  # catalogue or added items
        now = int(time.time())
        latest = now + self.settings.clock_skew_s
        for n, e in enumerate(req.events):
            if e.timestamp is not None and e.timestamp > latest:
                raise _client_error(
                    f"events[{n}].timestamp is {e.timestamp - now} s in the future; events may be dated at "
                    f"most serve.clock_skew_s={self.settings.clock_skew_s} s after the server's clock"
                )
            if e.kind == "rating" and e.rating is None:
                raise _client_error(f"events[{n}] is of kind 'rating' but has no rating")
            if e.rating is not None and self.rating_range is not None:
                low, high = self.rating_range
                if not low <= e.rating <= high:
                    raise _client_error(
                        f"events[{n}].rating is outside the run's validated range [{low:g}, {high:g}] "
                        "(validate.rating_min / rating_max)"
                    )
        events = [
            Event(e.user_id, e.item_id, now if e.timestamp is None else e.timestamp, e.kind, e.rating)
            for e in req.events
        ]
        try:
            stored = self.store.append(events)
        except sqlite3.Error as exc:  # disk full, read-only file, locked too long: nothing was stored
            log.error("event store cannot write (%s): %d events refused", type(exc).__name__, len(events))
            raise unavailable(
                f"the event store cannot write ({exc}); nothing was stored, retry later"
            ) from None
        self.new_items.saw_events([e.item_id for e in events])
        return {"stored": stored}

    # -- items added after the export (fuserec.serving.new_items) ------------------------------------------
    def known(self, ids: list[str], what: str) -> list[int]:
        """Indices of catalogue items, or of items added since the export (after the catalogue's)."""
        out: list[int] = []
        unknown: list[str] = []
        for item_id in ids:
            at = self.index.get(item_id)
            if at is None:
                at = self.new_items.position(item_id)
            if at is None:
                unknown.append(item_id)
            else:
                out.append(at)
        if unknown:
            raise _client_error(
                f"unknown {what} item ids {unknown[:5]}: they are neither in the exported catalogue "
                "(outputs/model/catalog.parquet) nor added (POST /items); add them, or leave them out"
            )
        return out

    def user_items(self, user_id: str, now: int) -> tuple[list[int], int, list[int], list[int]]:
        """From one read of the store: the user's latest positives as the graph reads them (catalogue
        indices), the latest one's time, the same positives with added items (the side scorer's
        profile), and every item the user has any event for by ``now``."""
        events = self.store.history(user_id, self.max_history, self.threshold, until=now)
        side = [at for item_id, _ in events if (at := self._position(item_id)) is not None]
        last = max((ts for _, ts in events), default=now)
        seen = [
            at
            for item_id in self.store.seen(user_id, until=now)
            if (at := self._position(item_id)) is not None
        ]
        return [i for i in side if i < self.n_items], last, side, seen

    def _position(self, item_id: str) -> int | None:
        at = self.index.get(item_id)
        return at if at is not None else self.new_items.position(item_id)

    def genre_mask(self, wanted: list[str], size: int) -> np.ndarray:
        """Catalogue and added items with at least one of ``wanted`` genres (case-insensitive)."""
        keys = {g.strip().lower() for g in wanted}
        added = self.new_items.refresh().genres
        extra = np.fromiter((bool(g & keys) for g in added), dtype=bool, count=len(added))
        return _sized(np.concatenate([self.cold.genre_mask(wanted), extra]), size)

    def add_items(self, req: ItemsIn) -> dict[str, Any]:
        """Store added items (all or none); 409 for an id of the trained catalogue, 503 when the store
        cannot write."""
        try:
            return self.new_items.add(req.items, self.index, int(time.time()))
        except sqlite3.Error as exc:
            log.error("event store cannot write (%s): %d items refused", type(exc).__name__, len(req.items))
            raise unavailable(
                f"the event store cannot write ({exc}); nothing was stored, retry later"
            ) from None

    def item(self, item_id: str) -> dict[str, Any]:
        """An item of the trained catalogue or an added one, with its metadata; 404 when neither."""
        side = self.new_items.side
        at = self.index.get(item_id)
        if at is not None:
            row = self.catalog.iloc[at]
            scored = bool(self.manifest.get("cold_items"))
            return {
                "item_id": item_id,
                "source": "trained",
                "title": self.titles[at],
                "genres": _terms(row.get("genres")),
                "tags": _terms(row.get("tags")),
                "year": _year(row.get("year")),
                "text": "" if pd.isna(row.get("text", "")) else str(row.get("text", "")),
                "training_interactions": int(side.popularity[at]) if scored else None,
                "scored_by": "the served model, and the side scorer (no training interactions)"
                if scored and side.cold[at]
                else "the served model",
            }
        position = self.new_items.position(item_id)
        if position is None:
            raise HTTPException(
                status_code=404,
                detail="no such item: it is neither in the exported catalogue nor added (POST /items)",
            )
        record = self.new_items.record(position)
        return {
            "item_id": item_id,
            "source": "added",
            "title": record.title,
            "genres": list(record.genres),
            "tags": list(record.tags),
            "year": record.year,
            "text": record.text,
            "added_at": record.added_at,
            "updated_at": record.updated_at,
            "events": int(self.new_items.refresh().exposure[position - self.n_items]),
            "scored_by": "the side scorer (content), until the next retrain puts it in the catalogue",
        }

    def events(self, user_id: str, limit: int) -> dict[str, Any]:
        return events_document(self.store, user_id, limit)

    def close(self) -> None:
        self.batcher.close()
        if self.owns_store:
            self.store.close()


def _sized(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask over ``size`` items: cut, or extended with False (items added since it was made)."""
    out = np.zeros(size, dtype=bool)
    out[: min(size, len(mask))] = mask[:size]
    return out


def _after_all(scores: np.ndarray, parts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cold-start scores over the catalogue, extended to ``size`` items: added ones after every other
    (the cold-start rules know nothing of them)."""
    n = len(scores)
    if size <= n:
        return scores, parts
    low = float(np.min(scores)) - 1.0 if n else 0.0
    out = np.concatenate([np.asarray(scores, dtype=np.float64), np.full(size - n, low)])
    out_parts = np.zeros((parts.shape[0], size), dtype=np.float64)
    out_parts[:, :n] = parts
    out_parts[-1, n:] = low
    return out, out_parts


def _shares(column: np.ndarray, names: list[str]) -> dict[str, float]:
    """Each component's share of one item's score; the side scorer's only where it changed the score."""
    return {n: float(column[m]) for m, n in enumerate(names) if n != NEW_ITEMS or column[m] != 0}


def _terms(value: object) -> list[str]:
    return [t.strip() for t in value.split("|") if t.strip()] if isinstance(value, str) else []


def _year(value: object) -> int | None:
    try:
        return None if value is None or pd.isna(value) else int(float(str(value)))
    except ValueError:
        return None
