"""The HTTP API over :class:`~fuserec.serving.service.Service`: keys, limits, routing, status codes.

``POST /recommend`` (a stored user, an explicit history, or a cold start; ``POST /predict`` instead when
the served run is of the rating task, :mod:`fuserec.serving.rating`), ``POST /events`` and
``GET /events`` (append and read back), ``POST /items`` and ``GET /items/{id}`` (items added after the
export, listed by content without retraining), ``GET /explain``, ``POST /admin/reload``, ``GET /health``,
``GET /ready`` and Prometheus ``GET /metrics``. Every bad input is a 4xx that says why without echoing the
input; overload is a 503 with ``Retry-After``, a model that does not answer in time a 504, never a 500.

Health, readiness and metrics stay outside the admission limit and never queue behind scoring, so a load
balancer sees a busy service as alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fuserec.config import ServeConfig
from fuserec.serving.admission import Admission
from fuserec.serving.auth import HEADER, KeyRing, check_open
from fuserec.serving.deployment import Deployment
from fuserec.serving.metrics import METRICS_PATH, install_metrics
from fuserec.serving.new_items import ItemsIn
from fuserec.serving.privacy import UserPrivacy
from fuserec.serving.rating import PredictIn, RatingService, is_rating_model
from fuserec.serving.service import (
    MAX_HISTORY_REQUEST,
    RETRY_AFTER_S,
    EventsIn,
    RecommendIn,
    Service,
    default_store,
)
from fuserec.serving.store import SQLiteEventStore

__all__ = ["create_app"]


class ListResponse(JSONResponse):
    """A ``/recommend`` body written by orjson: the largest body the service writes on every request, and
    the standard library's encoder was a twentieth of the server's Python time under load (py-spy)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


log = logging.getLogger("fuserec.serving")

QueryId = Annotated[str, Query(min_length=1, max_length=128)]
PathId = Annotated[str, PathParam(min_length=1, max_length=128)]
UNLIMITED = frozenset({"/health", "/ready", METRICS_PATH})  # never refused by the admission limit
PRUNE_EVERY_S = 3600.0
# every error body is {"detail": ...}: a sentence, or (request validation) a list of {type, loc, msg}
_DETAIL = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
_ERROR = {
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"detail": _DETAIL}, "required": ["detail"]}
        }
    }
}
GUARDED: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not parseable JSON", **_ERROR},
    422: {"description": "the request is invalid: what and where, never the value", **_ERROR},
    401: {"description": "missing or unknown API key", **_ERROR},
    403: {"description": "the key lacks this route's scope", **_ERROR},
    413: {"description": "request body too large", **_ERROR},
    503: {"description": "overloaded (retry after Retry-After seconds)", **_ERROR},
}
SCORED: dict[int | str, dict[str, Any]] = {
    **GUARDED,
    504: {"description": "the model did not answer within serve.request_timeout_s", **_ERROR},
}
# module level: route signatures are resolved from the module's globals (postponed annotations)
API_KEY = APIKeyHeader(
    name=HEADER,
    auto_error=False,
    description="an API key from `fuserec keys add`; its scopes (read, write, admin) decide the routes",
)
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
    max_batch: int | None = None,
    threads: int | None = None,
    *,
    settings: ServeConfig | None = None,
    keys: KeyRing | None = None,
    host: str = "127.0.0.1",
    privacy: UserPrivacy | None = None,
) -> FastAPI:
    """The FastAPI app over ``outputs`` (a finished run, or ``served/current``: ``model/`` and the splits).

    ``store``: the SQLite event store (default :func:`default_store`). ``keys``: the API keys (none: open
    access, refused unless ``host`` is a loopback address). ``max_batch``/``threads`` override ``settings``.
    ``privacy``: maps client ids to stored ids (pseudonyms) and answers erasure and access requests; None:
    ids are stored as sent, and those two routes answer 501.
    """
    settings = settings or ServeConfig()
    keys = keys if keys is not None else KeyRing()
    check_open(keys, host)
    if not keys:
        log.warning("no API keys configured: serving with open access, on loopback (%s) only", host)
    events = SQLiteEventStore(Path(store) if store else default_store(settings), settings.history_cap)

    def load(root: Path, shared: SQLiteEventStore) -> Service | RatingService:
        if is_rating_model(root):  # a run of the rating task: POST /predict instead of /recommend
            return RatingService(root, shared, providers, threads, settings)
        return Service(root, shared, providers, max_batch, threads, settings)

    deployment = Deployment(Path(outputs), events, settings, load)

    def stored(user_id: str) -> str:
        return user_id if privacy is None else privacy.stored(user_id)

    gc.freeze()  # the catalogue, store and tables live for the process: keep them out of every GC pass

    async def watch() -> None:
        """Reload a promoted or re-exported model; apply the retention window hourly."""
        pruned_at = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(settings.watch_s or PRUNE_EVERY_S)
            try:
                if settings.watch_s and await asyncio.to_thread(deployment.changed):
                    await asyncio.to_thread(deployment.reload)
                if asyncio.get_running_loop().time() - pruned_at >= PRUNE_EVERY_S:
                    await asyncio.to_thread(deployment.prune)
                    pruned_at = asyncio.get_running_loop().time()
            except Exception:  # a model that fails to load: the old one goes on serving
                log.exception("watch: the new model could not be loaded; still serving %s", deployment.loaded)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch())
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        deployment.close()

    first = deployment.current
    version = str(first.manifest.get("sha256", ""))[:12]
    app = FastAPI(title="fuserec", version=version, lifespan=lifespan)
    app.state.deployment = deployment
    flooded = [False]

    def queue_wait(service: Service) -> None:
        """The scoring queue's wait bound follows the flood state (and a reloaded service inherits it)."""
        wait_ms = settings.max_queue_wait_ms
        if flooded[0] and settings.flood_queue_wait_ms > 0:
            wait_ms = settings.flood_queue_wait_ms
        service.batcher.max_wait = wait_ms / 1000

    def on_flood(now: bool) -> None:
        flooded[0] = now
        queue_wait(deployment.current)
        log.warning("flood %s", "recognised: admission limit lowered" if now else "over: limit restored")

    app.state.on_flood = on_flood  # what the admission middleware calls; tests call it too

    app.add_middleware(
        Admission,
        limit=settings.max_inflight,
        flood_limit=settings.flood_inflight,
        retry_after_s=RETRY_AFTER_S,
        exempt=UNLIMITED,
        on_flood=on_flood,
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    install_metrics(app, model_version=version, model_name=first.manifest["algorithm"]["name"])

    def relabel(service: Service) -> None:
        sha, name = str(service.manifest.get("sha256", ""))[:12], service.manifest["algorithm"]["name"]
        app.state.model_info.info({"version": sha, "name": name})

    deployment.listeners.append(relabel)
    deployment.listeners.append(queue_wait)

    def scope(name: str) -> Any:
        async def check(key: Annotated[str | None, Security(API_KEY)] = None) -> None:
            if not keys:
                return  # open access: allowed on loopback only (checked above)
            found = keys.find(key)
            if found is None:
                raise HTTPException(
                    status_code=401,
                    detail=f"missing or unknown API key: send one in the {HEADER} header",
                    headers={"WWW-Authenticate": "ApiKey"},
                )
            if name not in found.scopes:
                raise HTTPException(status_code=403, detail=f"this API key lacks the {name!r} scope")

        return Depends(check)

    def task(name: str) -> Any:
        """A route of one task: 409 when the served run is of the other (ranking or rating)."""

        async def check() -> None:
            rating = isinstance(deployment.current, RatingService)
            if (name == "rating") != rating:
                other = "POST /predict" if rating else "POST /recommend"
                raise HTTPException(
                    status_code=409,
                    detail=f"this service serves a {'rating' if rating else 'ranking'} model "
                    f"(task: {'rating' if rating else 'ranking'}); use {other}",
                )

        return Depends(check)

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
    async def health() -> dict[str, str]:
        """Liveness: the process answers. On the event loop itself: it never waits for a worker thread."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "the scoring worker is not running"}})
    def ready() -> JSONResponse:
        """Readiness: the served model (name, components, sha256, providers), catalogue and store sizes;
        503 when the scoring worker is not alive."""
        service = deployment.current
        alive = service.batcher.alive
        body = {
            "ready": alive,
            "task": "rating" if isinstance(service, RatingService) else "ranking",
            "model": service.manifest["algorithm"]["name"],
            "components": service.components,
            "sha256": service.manifest.get("sha256"),
            "providers": list(service.model.providers),
            "items": service.n_items,
            "events": service.store.count(),
            "batches": {"runs": service.batcher.runs, "histories": service.batcher.scored},
            "queue": service.batcher.waiting,
            "reloads": deployment.reloads,
            "auth": "api-keys" if keys else "open (loopback only)",
        }
        if not alive:
            body["reason"] = "the scoring worker is not running; restart the service"
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.post("/recommend", dependencies=[scope("read"), task("ranking")], responses=SCORED)
    async def recommend(req: RecommendIn) -> JSONResponse:
        """Top-k items for a history, or for a user's stored events, scored by the exported graph.

        Each item comes with its score and every component model's share of it. Seen items are left
        out; cold users get the onboarding or attribute-based fallback; ``filter`` and ``diversity``
        re-rank the list. 503 when overloaded, 504 when the model does not answer in time.
        """
        # async: a request waits on the batcher without holding a thread; plain JSON, no re-encoding pass
        if privacy is None or req.user_id is None:
            return ListResponse(await deployment.call_async("recommend_async", req))
        raw, req = req.user_id, req.model_copy(update={"user_id": privacy.stored(req.user_id)})
        result = await deployment.call_async("recommend_async", req)
        result["user_id"] = raw
        return ListResponse(result)

    @app.get("/explain", dependencies=[scope("read"), task("ranking")], responses=SCORED)
    def explain(user_id: QueryId, item_id: QueryId) -> dict[str, Any]:
        """Why ``item_id`` ranks where it does for ``user_id``: its rank, each model's contribution, the
        history items and shared attributes behind it, the kg plugin's own graph paths (``kg``) and the
        recent items that mattered to sasrec (``sequence``), each saying when it is not available."""
        result: dict[str, Any] = deployment.call("explain", stored(user_id), item_id)
        result["user_id"] = user_id
        return result

    @app.post(
        "/predict",
        dependencies=[scope("read"), task("rating")],
        responses={**SCORED, 409: {"description": "the served run is of the ranking task", **_ERROR}},
    )
    async def predict(req: PredictIn) -> JSONResponse:
        """Predicted ratings of ``items`` for a stored user or a rated history (rating task only).

        Each prediction comes with every model's own prediction and the parts of the fused one. A user
        with no ratings gets the baselines' prediction, and ``strategy`` says so; unknown item ids: 422.
        """
        if privacy is None or req.user_id is None:
            return ListResponse(await deployment.call_async("predict_async", req))
        raw, req = req.user_id, req.model_copy(update={"user_id": privacy.stored(req.user_id)})
        result = await deployment.call_async("predict_async", req)
        result["user_id"] = raw
        return ListResponse(result)

    @app.post("/events", dependencies=[scope("write")], responses=GUARDED)
    def add_events(req: EventsIn) -> dict[str, Any]:
        """Append interactions to the event store; the next ``/recommend`` of those users reads them.

        All or none: one bad event refuses the request. 503 when the store cannot write (nothing stored).
        """
        if privacy is not None:
            events = [e.model_copy(update={"user_id": privacy.stored(e.user_id)}) for e in req.events]
            req = req.model_copy(update={"events": events})
        result: dict[str, Any] = deployment.call("add_events", req)
        return result

    @app.post(
        "/items",
        dependencies=[scope("write")],
        responses={**GUARDED, 409: {"description": "an id of the trained catalogue", **_ERROR}},
    )
    def add_items(req: ItemsIn) -> dict[str, Any]:
        """Add items with their metadata (title, genres, tags, text, year), or replace the metadata of
        items added before: from the next ``/recommend`` on, the side scorer lists them by content with no
        retraining. All or none; ``409`` for an id of the trained catalogue (its metadata is the
        catalogue's until the next retrain); ``503`` when the store cannot write."""
        result: dict[str, Any] = deployment.call("add_items", req)
        return result

    @app.get(
        "/items/{item_id}",
        dependencies=[scope("read")],
        responses={**GUARDED, 404: {"description": "neither in the catalogue nor added", **_ERROR}},
    )
    def read_item(item_id: PathId) -> dict[str, Any]:
        """An item of the trained catalogue or one added since (``source``), with its metadata and how
        it is scored."""
        result: dict[str, Any] = deployment.call("item", item_id)
        return result

    @app.get("/events", dependencies=[scope("admin")], responses=GUARDED)
    def read_events(
        user_id: QueryId, limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_REQUEST)] = 100
    ) -> dict[str, Any]:
        """A user's latest ``limit`` stored events (oldest first), as they were stored (admin scope:
        a history is personal data)."""
        result: dict[str, Any] = deployment.call("events", stored(user_id), limit)
        result["user_id"] = user_id
        return result

    def need_privacy() -> UserPrivacy:
        if privacy is None:
            raise HTTPException(
                status_code=501,
                detail="erasure and access need a privacy key: set privacy.key_file or the variable named "
                "by privacy.key_env (docs: privacy), then restart the service",
            )
        return privacy

    @app.delete(
        "/users/{user_id}",
        dependencies=[scope("admin")],
        responses={**GUARDED, 501: {"description": "no privacy key configured", **_ERROR}},
    )
    def forget_user(user_id: PathId) -> dict[str, Any]:
        """Erase a person: their events (the bytes too), their rows in every table the pipeline and
        the served releases hold, and the stage cache; one audit line (a keyed hash, never the id) goes
        to the erasure register, from which the next run drops them. Answers what was removed."""
        result = need_privacy().forget([user_id], deployment.current, where="api")
        return result

    @app.get(
        "/admin/users/{user_id}",
        dependencies=[scope("admin")],
        responses={**GUARDED, 501: {"description": "no privacy key configured", **_ERROR}},
    )
    def export_user(user_id: PathId) -> dict[str, Any]:
        """Everything held about a person as one document: stored events, table rows (attributes,
        rejected lines), current recommendations and the first one's explanation."""
        return need_privacy().export(user_id, deployment.current)

    @app.post(
        "/admin/reload",
        dependencies=[scope("admin")],
        responses={**GUARDED, 409: {"description": "the new model could not be loaded", **_ERROR}},
    )
    async def reload() -> JSONResponse:
        """Load the model the served path holds now (after a promotion or re-export) and swap it in with
        no failed request; on failure the old model keeps serving (409)."""
        try:
            return JSONResponse(await asyncio.to_thread(deployment.reload))
        except Exception as exc:
            log.exception("reload failed")
            return JSONResponse(
                status_code=409,
                content={
                    "detail": f"the model could not be loaded ({type(exc).__name__}: {exc}); "
                    f"still serving sha256 {deployment.loaded[1][:12]}"
                },
            )

    return app
