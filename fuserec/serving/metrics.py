"""Prometheus metrics for the HTTP service: request counts, latency per route, and which model is served.

Each app gets its own ``CollectorRegistry`` (never the process-wide default), so several apps in one
process (tests, a blue/green pair) keep separate counts and never clash on metric names. Labels are the
matched route *template* (``/recommend``) and a known HTTP method, never the raw path or method: a
client sending random paths or verbs must not be able to create unbounded time series.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access = logging.getLogger("fuserec.access")

METRICS_PATH = "/metrics"
OTHER = "other"  # the label of every path no route matches (404s, scanners, typos)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Latency buckets from 1 ms (a cached health check) to 2 s (a large batch of histories on a busy CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class _Metrics:
    """The collectors of one app, all registered on that app's own registry."""

    def __init__(self, registry: CollectorRegistry, model_version: str, model_name: str) -> None:
        self.registry = registry
        self.requests = Counter(
            "fuserec_requests_total",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "fuserec_request_seconds",
            "HTTP request latency in seconds, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model = Info("fuserec_model", "The exported model this app serves.", registry=registry)
        self.model.info({"version": model_version, "name": model_name})


class MetricsMiddleware:
    """Pure ASGI middleware (no request-body buffering) that times, counts and logs every HTTP request.

    It is also the access log (logger ``fuserec.access``, one INFO line per request), for the same reason
    the labels are route templates: uvicorn's own access log prints the request line, so
    ``GET /explain?user_id=...`` or ``DELETE /users/...`` would put ids in every log collector
    downstream. ``fuserec serve`` turns uvicorn's off. Client addresses are left out too: the reverse
    proxy in front decides how long to keep those.
    """

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before starting a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_label(scope)
            method = scope.get("method", "").upper()
            method = method if method in METHODS else OTHER
            seconds = time.perf_counter() - start
            self.metrics.latency.labels(method, route).observe(seconds)
            self.metrics.requests.labels(method, route, str(status)).inc()
            access.info('"%s %s" %d %.1f ms', method, route, status, seconds * 1000)


def route_label(scope: Scope) -> str:
    """The template of the route the router matched (set in the scope by Starlette), else ``other``."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else OTHER


def install_metrics(app: FastAPI, model_version: str, model_name: str) -> None:
    """Count and time every request of ``app`` and serve the numbers at ``GET /metrics``.

    Call before the app starts (middleware cannot be added later). The registry is kept on
    ``app.state.metrics_registry`` for callers that add their own collectors.
    """
    if getattr(app.state, "metrics_registry", None) is not None:
        raise RuntimeError("install_metrics was already called on this app: requests would count twice")
    metrics = _Metrics(CollectorRegistry(), model_version, model_name)
    app.state.metrics_registry = metrics.registry
    app.state.model_info = metrics.model  # a reload relabels it with the new model
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def prometheus(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(METRICS_PATH, prometheus, methods=["GET"], include_in_schema=False)
