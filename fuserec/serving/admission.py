"""Admission control: how many requests the service works on at once, and how it tells a flood apart.

Past its capacity a service can queue (every answer gets later, without bound) or refuse (a quick ``503``
with ``Retry-After``). :class:`Admission` refuses past ``limit`` requests in progress. That alone bounds
memory but not latency: with 64 admitted and the model scoring a few hundred a second, each admitted
request waits a few hundred milliseconds. Closed-loop clients (each waits for its answer before asking
again) produce exactly that queue and ask no faster than they are served, so it is their normal state; they
never find the service full. A flood does: more requests arrive than ``limit`` can hold. From the first one
refused that way the service admits only ``flood_limit`` at once, so the requests it does answer keep close
to unloaded latency, and it returns to ``limit`` after a window (``WINDOW_S``) in which arrivals fell back
to what it completed, or no request came. Clients that retry at once instead of after ``Retry-After`` look
like a flood, and are one. ``on_flood`` hears each change, so the scoring queue can stop holding requests that
already waited too long: the flood's start leaves up to ``limit`` of them behind, each a late answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

WINDOW_S = 0.25  # how often a flood is checked for its end
CALM_RATIO = 1.1  # arrivals / completions over a window that ends a flood


class Admission:
    """Pure ASGI middleware: ``503`` + ``Retry-After`` past the current limit; ``exempt`` paths pass."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        flood_limit: int,
        retry_after_s: int,
        exempt: frozenset[str],
        on_flood: Callable[[bool], None] | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.flood_limit = min(flood_limit, limit)
        self.retry_after = str(retry_after_s)
        self.exempt = exempt
        self.on_flood = on_flood
        self.inflight = 0
        self.refused = 0
        self.flooded = False
        self._arrived = self._completed = 0
        self._window_start = time.monotonic()

    @property
    def current_limit(self) -> int:
        return self.flood_limit if self.flooded else self.limit

    def _flood(self, now: bool) -> None:
        if now != self.flooded:
            self.flooded = now
            self._arrived = self._completed = 0
            self._window_start = time.monotonic()
            if self.on_flood is not None:
                self.on_flood(now)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._window_start < WINDOW_S:
            return
        quiet = now - self._window_start >= 2 * WINDOW_S  # no request for a whole window
        if self.flooded and (quiet or self._arrived <= CALM_RATIO * self._completed):
            self._flood(False)
        self._arrived = self._completed = 0
        self._window_start = now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        self._tick()
        self._arrived += 1
        limit = self.current_limit
        if self.inflight >= limit:
            self.refused += 1
            self._flood(True)
            response = JSONResponse(
                status_code=503,
                content={"detail": f"overloaded: {limit} requests in progress; retry later"},
                headers={"Retry-After": self.retry_after},
            )
            await response(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            self._completed += 1
