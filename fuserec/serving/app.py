"""The HTTP API over :class:`~fuserec.serving.service.Service`: validation, routing, status codes.

``POST /recommend`` (a stored user, an explicit history, or a cold start), ``POST /events`` and
``GET /events`` (append and read back), ``GET /explain``, ``GET /health``, ``GET /ready`` and Prometheus
``GET /metrics``. Every bad input is a 4xx that says why without echoing the input.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fuserec.serving.metrics import install_metrics
from fuserec.serving.service import MAX_HISTORY_REQUEST, EventsIn, RecommendIn, Service

__all__ = ["create_app"]

QueryId = Annotated[str, Query(min_length=1, max_length=128)]


def create_app(
    outputs: str | Path,
    store: str | Path | None = None,
    providers: list[str] | None = None,
    max_batch: int = 32,
    threads: int = 0,
) -> FastAPI:
    """The FastAPI app over ``outputs`` (a finished pipeline run: ``outputs/model`` and the splits).

    ``threads``: onnxruntime intra-op threads (0 = one per core).
    """
    service = Service(Path(outputs), Path(store) if store else None, providers, max_batch, threads)
    gc.freeze()  # the catalogue, store and tables live for the process: keep them out of every GC pass

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    version = str(service.manifest.get("sha256", ""))[:12]
    app = FastAPI(title="fuserec", version=version, lifespan=lifespan)
    app.state.service = service
    install_metrics(app, model_version=version, model_name=service.manifest["algorithm"]["name"])

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
            "components": service.components,
            "sha256": service.manifest.get("sha256"),
            "providers": service.model.providers,
            "items": service.n_items,
            "events": service.store.count(),
            "batches": {"runs": service.batcher.runs, "histories": service.batcher.scored},
        }

    @app.post("/recommend")
    async def recommend(req: RecommendIn) -> JSONResponse:
        # async: a request waits on the batcher without holding a thread; plain JSON, no re-encoding pass
        return JSONResponse(await service.recommend_async(req))

    @app.get("/explain")
    def explain(user_id: QueryId, item_id: QueryId) -> dict[str, Any]:
        return service.explain(user_id, item_id)

    @app.post("/events")
    def add_events(req: EventsIn) -> dict[str, Any]:
        return service.add_events(req)

    @app.get("/events")
    def read_events(
        user_id: QueryId, limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_REQUEST)] = 100
    ) -> dict[str, Any]:
        return service.events(user_id, limit)

    return app
