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

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fuserec.serving.metrics import install_metrics
from fuserec.serving.service import MAX_HISTORY_REQUEST, EventsIn, RecommendIn, Service

__all__ = ["create_app"]

QueryId = Annotated[str, Query(min_length=1, max_length=128)]
MAX_BODY_BYTES = 2_000_000  # a 10,000-id history is ~200 kB; anything far larger is not a request


class BodyLimit:
    """413 for a request body over ``max_bytes``, declared or streamed, before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # the app's exception handling turns this into the 413 response
                raise HTTPException(status_code=413, detail=self.detail)
            return message

        await self.app(scope, limited, send)

    @property
    def detail(self) -> str:
        return f"request body over {self.max_bytes} bytes: send fewer ids per request"

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(status_code=413, content={"detail": self.detail})
        await response({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


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
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
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
        """Liveness: the process answers. Load balancers poll it; it touches no model or store."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, Any]:
        """Readiness: the served model (name, components, sha256, providers), catalogue and store sizes."""
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
        """Top-k items for a history, or for a user's stored events, scored by the exported graph.

        Each item comes with its score and every component model's share of it. Seen items are left
        out; cold users get the onboarding or attribute-based fallback; ``filter`` and ``diversity``
        re-rank the list.
        """
        # async: a request waits on the batcher without holding a thread; plain JSON, no re-encoding pass
        return JSONResponse(await service.recommend_async(req))

    @app.get("/explain")
    def explain(user_id: QueryId, item_id: QueryId) -> dict[str, Any]:
        """Why ``item_id`` ranks where it does for ``user_id``: its rank, each model's contribution, and
        the history items and shared attributes behind it."""
        return service.explain(user_id, item_id)

    @app.post("/events")
    def add_events(req: EventsIn) -> dict[str, Any]:
        """Append interactions to the event store; the next ``/recommend`` of those users reads them."""
        return service.add_events(req)

    @app.get("/events")
    def read_events(
        user_id: QueryId, limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_REQUEST)] = 100
    ) -> dict[str, Any]:
        """A user's latest ``limit`` stored events (oldest first), as they were stored."""
        return service.events(user_id, limit)

    return app
