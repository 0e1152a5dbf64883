"""The access log, without personal data: method, route template, status and time; never path or query.

uvicorn's own access log prints the request line, so ``GET /explain?user_id=...`` or
``DELETE /users/...`` would put ids in every log collector downstream. This middleware logs the matched
route's template (``/users/{user_id}``) instead, the same label ``/metrics`` uses, and ``fuserec serve``
turns uvicorn's access log off. Client addresses are left out too: they are personal data as well, and
the reverse proxy in front (docs: operate the service) is the place that decides how long to keep them.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fuserec.serving.metrics import METHODS, OTHER, route_label

log = logging.getLogger("fuserec.access")


class AccessLog:
    """Pure ASGI middleware: one INFO line per HTTP request, ``"POST /recommend" 200 12.3 ms``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            method = str(scope.get("method", "")).upper()
            log.info(
                '"%s %s" %d %.1f ms',
                method if method in METHODS else OTHER,
                route_label(scope),
                status,
                (time.perf_counter() - start) * 1000,
            )
