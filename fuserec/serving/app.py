"""The HTTP API: recommend from a user's stored events or an explicit history, and record new events.

A request never touches training code: it maps raw ids to catalogue indices (unknown ids are refused
before anything reaches the ONNX graph's Gather), pads the history the way the export manifest says,
and runs the one exported model under onnxruntime. Events are appended to the store and read back by the
next request, so a fresh event changes recommendations at once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from fuserec.layout import Layout
from fuserec.manifest import read_json
from fuserec.onnx_model import OnnxRecommender
from fuserec.serving.store import Event, SQLiteEventStore
from fuserec.tasks.export import CATALOG_FILE, MODEL_FILE
from fuserec.tasks.split import SPLIT_FILES

MAX_K = 100
MAX_HISTORY_REQUEST = 10_000  # ids in one explicit history (longer is a client error, not a model limit)
MAX_EVENTS_REQUEST = 1_000

Id = Annotated[str, Field(min_length=1, max_length=128)]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id
    kind: Annotated[str, Field(min_length=1, max_length=32)] = "interaction"
    rating: float | None = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False)
    timestamp: int | None = Field(None, ge=0, le=2**40, description="unix seconds; default: now")


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_REQUEST)


class RecommendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id | None = None
    history: list[Id] | None = Field(None, max_length=MAX_HISTORY_REQUEST)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_HISTORY_REQUEST)
    time: int | None = Field(None, ge=0, le=2**40, description="unix seconds of the request; default now")


class Service:
    """Model, catalogue and store, loaded once; what every request reads."""

    def __init__(self, outputs: Path, store: Path | None = None, providers: list[str] | None = None) -> None:
        layout = Layout(Path(outputs))
        self.manifest = read_json(layout.export / "manifest.json")
        self.model = OnnxRecommender(layout.export / MODEL_FILE, providers or self.manifest["providers"])
        self.catalog = pd.read_parquet(layout.export / CATALOG_FILE)
        self.item_ids = self.catalog["item_id"].astype(str).to_numpy()
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.max_history = int(self.manifest["max_history"])
        self.store = SQLiteEventStore(store or layout.root / "events.sqlite")
        if self.store.count() == 0:  # first start: the training interactions are everybody's history
            self._import_training(layout)

    def _import_training(self, layout: Layout) -> None:
        train_file = layout.split / SPLIT_FILES["train"]
        if not train_file.exists():
            return
        train = pd.read_parquet(train_file)
        users = pd.read_parquet(layout.clean / "users.parquet")[["user", "user_id"]]
        frame = train.merge(users, on="user")
        frame["item_id"] = self.item_ids[frame["item"].to_numpy()]
        self.store.import_frame(frame[["user_id", "item_id", "timestamp", "rating"]])

    def indices(self, ids: list[str], what: str) -> list[int]:
        unknown = [i for i in ids if i not in self.index]
        if unknown:
            raise HTTPException(
                status_code=422,
                detail=f"unknown {what} item ids {unknown[:5]}: they are not in the exported catalogue "
                "(outputs/model/catalog.parquet); add the items and re-export, or leave them out",
            )
        return [self.index[i] for i in ids]

    def recommend(self, req: RecommendIn) -> dict[str, Any]:
        if (req.user_id is None) == (req.history is None):
            raise HTTPException(status_code=422, detail="give exactly one of user_id or history")
        now = req.time if req.time is not None else int(time.time())
        if req.user_id is not None:
            events = self.store.history(req.user_id, self.max_history)
            items = [self.index[i] for i, _ in events if i in self.index]
            last = max((ts for _, ts in events), default=now)
        else:
            items = self.indices(list(req.history or [])[-self.max_history :], "history")
            last = now
        excluded = self.indices(req.exclude, "excluded")
        padded = np.asarray([items or [-1]], dtype=np.int64)
        scores = self.model.run(padded, np.asarray([last], dtype=np.int64))[0][0].astype(np.float64)
        mask = np.zeros(len(scores), dtype=bool)
        mask[items + excluded] = True
        order = np.lexsort((np.arange(len(scores)), -scores))  # protocol ties: lower index first
        top = [int(i) for i in order if not mask[i]][: req.k]
        rows = self.catalog.iloc[top]
        return {
            "user_id": req.user_id,
            "history_length": len(items),
            "model": self.manifest["algorithm"]["name"],
            "items": [
                {"item_id": self.item_ids[i], "title": str(row.get("title", "")), "score": float(scores[i])}
                for i, (_, row) in zip(top, rows.iterrows(), strict=True)
            ],
        }

    def add_events(self, req: EventsIn) -> dict[str, Any]:
        self.indices([e.item_id for e in req.events], "event")
        now = int(time.time())
        events = [Event(e.user_id, e.item_id, e.timestamp or now, e.kind, e.rating) for e in req.events]
        return {"stored": self.store.append(events)}


def create_app(
    outputs: str | Path, store: str | Path | None = None, providers: list[str] | None = None
) -> FastAPI:
    """The FastAPI app over ``outputs`` (a finished pipeline run: ``outputs/model`` and the splits)."""
    service = Service(Path(outputs), Path(store) if store else None, providers)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.store.close()

    app = FastAPI(title="fuserec", version=str(service.manifest.get("sha256", ""))[:12], lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input, and a NaN there makes the 422 itself unserialisable
        # (a 500): say where and why, never echo the value.
        errors = [
            {k: str(e[k]) if k == "msg" else e[k] for k in ("type", "loc", "msg") if k in e}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, Any]:
        return {
            "ready": True,
            "model": service.manifest["algorithm"]["name"],
            "sha256": service.manifest.get("sha256"),
            "providers": service.model.providers,
            "items": len(service.item_ids),
            "events": service.store.count(),
        }

    @app.post("/recommend")
    def recommend(req: RecommendIn) -> dict[str, Any]:
        return service.recommend(req)

    @app.post("/events")
    def events(req: EventsIn) -> dict[str, Any]:
        return service.add_events(req)

    return app
