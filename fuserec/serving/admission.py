"""Admission control: how many requests the service works on at once, and how it tells a flood apart.

Past its capacity a service can queue (every answer gets later, without bound) or refuse (a quick ``503``
with ``Retry-After``). :class:`Admission` refuses past ``limit`` requests in progress. That alone bounds
memory but not latency: with 64 admitted and the model scoring a few hundred a second, each admitted
request waits a few hundred milliseconds. Closed-loop clients (each waits for its answer before asking
again) produce exactly that queue and ask no faster than they are served, so it is their normal state. A
flood is different: requests arrive faster than they complete, window after window. Then the service
admits only ``flood_limit`` at once, so the requests it does answer keep close to unloaded latency, and
returns to ``limit`` as soon as arrivals fall back to what it completes.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

WINDOW_S = 1.0
FLOOD_RATIO = 1.5  # arrivals / completions over a window that counts as a flooded window
CALM_RATIO = 1.1  # ... and one that ends a flood
FLOOD_WINDOWS = 2  # flooded windows in a row before the limit drops (a start-up burst is one)


class Admission:
    """Pure ASGI middleware: ``503`` + ``Retry-After`` past the current limit; ``exempt`` paths pass."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        flood_limit: int,
        retry_after_s: int,
        exempt: frozenset[str],
    ) -> None:
        self.app = app
        self.limit = limit
        self.flood_limit = min(flood_limit, limit)
        self.retry_after = str(retry_after_s)
        self.exempt = exempt
        self.inflight = 0
        self.refused = 0
        self.flooded = False
        self._arrived = self._completed = self._streak = 0
        self._window_start = time.monotonic()

    @property
    def current_limit(self) -> int:
        return self.flood_limit if self.flooded else self.limit

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._window_start < WINDOW_S:
            return
        ratio = self._arrived / max(self._completed, 1)
        if ratio >= FLOOD_RATIO:
            self._streak += 1
            self.flooded = self.flooded or self._streak >= FLOOD_WINDOWS
        else:
            self._streak = 0
            if ratio <= CALM_RATIO:
                self.flooded = False
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
