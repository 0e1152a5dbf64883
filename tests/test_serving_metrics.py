"""Prometheus metrics: counts by route template and status, latency histograms, the model's identity,
one registry per app, and no label explosion from hostile paths or methods."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

from fuserec.serving.metrics import LATENCY_BUCKETS, install_metrics


def _app(version: str = "abc123", name: str = "stacking") -> FastAPI:
    """A tiny app with the service's shapes of route (no model needed)."""
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/recommend")
    def recommend(body: dict[str, int]) -> dict[str, int]:
        if body.get("k", 1) < 1:
            raise HTTPException(status_code=422, detail="k must be positive")
        return body

    @app.get("/items/{item_id}")
    def item(item_id: str) -> dict[str, str]:
        return {"item_id": item_id}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("bug")

    install_metrics(app, version, name)
    return app


def _value(text: str, metric: str, /, **labels: str) -> float:
    """The sample ``metric{labels}`` in exposition ``text`` (labels matched as a set, any order)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != metric:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    raise AssertionError(f"no sample {metric}{labels} in:\n{text}")


def test_requests_are_counted_by_route_template_and_status() -> None:
    with TestClient(_app(), raise_server_exceptions=False) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
        assert client.post("/recommend", json={"k": 5}).status_code == 200
        assert client.post("/recommend", json={"k": 0}).status_code == 422
        assert client.get("/items/42").status_code == 200
        assert client.get("/items/43").status_code == 200
        assert client.get("/boom").status_code == 500
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _value(text, "fuserec_requests_total", method="GET", route="/health", status="200") == 3
    assert _value(text, "fuserec_requests_total", method="POST", route="/recommend", status="200") == 1
    assert _value(text, "fuserec_requests_total", method="POST", route="/recommend", status="422") == 1
    assert _value(text, "fuserec_requests_total", method="GET", route="/items/{item_id}", status="200") == 2
    assert _value(text, "fuserec_requests_total", method="GET", route="/boom", status="500") == 1
    assert "/items/42" not in text


def test_latency_histogram_has_buckets_from_a_millisecond_to_two_seconds() -> None:
    with TestClient(_app()) as client:
        client.get("/health")
        client.get("/health")
        text = client.get("/metrics").text
    assert "# TYPE fuserec_request_seconds histogram" in text
    assert _value(text, "fuserec_request_seconds_count", method="GET", route="/health") == 2
    assert _value(text, "fuserec_request_seconds_sum", method="GET", route="/health") > 0
    assert _value(text, "fuserec_request_seconds_bucket", method="GET", route="/health", le="+Inf") == 2
    assert _value(text, "fuserec_request_seconds_bucket", method="GET", route="/health", le="0.001") >= 0
    assert _value(text, "fuserec_request_seconds_bucket", method="GET", route="/health", le="2.0") == 2
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 2.0


def test_the_model_is_identified() -> None:
    with TestClient(_app("deadbeef0001", "ease")) as client:
        text = client.get("/metrics").text
    assert _value(text, "fuserec_model_info", version="deadbeef0001", name="ease") == 1


def test_unknown_paths_and_methods_share_one_label() -> None:
    with TestClient(_app()) as client:
        for i in range(20):
            assert client.get(f"/wp-admin/{i}.php").status_code == 404
        assert client.request("BREW", "/health").status_code == 405
        assert client.delete("/health").status_code == 405
        text = client.get("/metrics").text
    assert _value(text, "fuserec_requests_total", method="GET", route="other", status="404") == 20
    assert _value(text, "fuserec_requests_total", method="other", route="/health", status="405") == 1
    assert _value(text, "fuserec_requests_total", method="DELETE", route="/health", status="405") == 1
    assert "wp-admin" not in text and "BREW" not in text


def test_each_app_has_its_own_registry() -> None:
    first, second = _app("v1", "a"), _app("v2", "b")
    with TestClient(first) as one, TestClient(second) as two:
        one.get("/health")
        one_text, two_text = one.get("/metrics").text, two.get("/metrics").text
    assert _value(one_text, "fuserec_requests_total", method="GET", route="/health", status="200") == 1
    assert 'route="/health"' not in two_text and 'version="v2"' in two_text and 'version="v1"' not in two_text
    assert b"fuserec_" not in generate_latest(REGISTRY)  # the process-wide registry is untouched


def test_installing_twice_is_refused() -> None:
    app = _app()
    with pytest.raises(RuntimeError, match="already called"):
        install_metrics(app, "x", "y")
