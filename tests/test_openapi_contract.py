"""Schemathesis against the service's own OpenAPI document: generated requests (valid and invalid) to
every operation, with an admin key, never get a 5xx, and every response matches its documented schema
and status codes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fuserec.config import ServeConfig
from fuserec.privacy.erasure import Places
from fuserec.serving.app import create_app
from fuserec.serving.auth import HEADER, KeyRing
from fuserec.serving.privacy import UserPrivacy

KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def service(serving_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    folder = tmp_path_factory.mktemp("contract")
    ring = KeyRing.load(folder / "keys.json")
    KEY["value"] = ring.add("fuzzer", ["read", "write", "admin"])
    places = Places(tables=[folder / "outputs"], stores=[], caches=[], register=folder / "erasures.jsonl")
    privacy = UserPrivacy(b"f" * 32, None, places)
    app = create_app(
        serving_run, folder / "e.sqlite", settings=ServeConfig(watch_s=0), keys=ring, privacy=privacy
    )
    # schemathesis opens a fresh ASGI client per call, which would run the lifespan (and close the
    # store) every time: one lifespan for the whole module, ended here
    app.router.lifespan_context = _no_lifespan
    yield app
    app.state.deployment.close()


@asynccontextmanager
async def _no_lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield


OPERATIONS = [("POST", "/recommend"), ("GET", "/explain"), ("POST", "/events"), ("GET", "/events")]
OPERATIONS += [("POST", "/admin/reload"), ("GET", "/health"), ("GET", "/ready")]
OPERATIONS += [("DELETE", "/users/{user_id}"), ("GET", "/admin/users/{user_id}")]
OPERATIONS += [("POST", "/items"), ("GET", "/items/{item_id}"), ("POST", "/predict")]
#: What a service over a rating-task run answers besides 409s (fuzzed there too).
RATING_OPERATIONS = [("POST", "/predict"), ("POST", "/events"), ("GET", "/events"), ("GET", "/ready")]


NO_INPUT = {"/health", "/ready"}  # nothing to send them that could be invalid
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in schemathesis.GenerationMode
    if not (path in NO_INPUT and mode is schemathesis.GenerationMode.NEGATIVE)
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_every_operation_keeps_its_contract(
    service: FastAPI, method: str, path: str, mode: schemathesis.GenerationMode
) -> None:
    """Valid (positive) and invalid (negative) requests: no 5xx, documented codes, conforming bodies."""
    api = schemathesis.openapi.from_asgi("/openapi.json", service)
    operation = api[path][method]
    headers = {HEADER: KEY["value"]}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        case.validate_response(
            response,
            checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
        )

    check()


def test_the_document_lists_every_route(service: FastAPI) -> None:
    """The fuzzed operations are all there are: a new route must join OPERATIONS."""
    api = schemathesis.openapi.from_asgi("/openapi.json", service)
    found = {(r.ok().method.upper(), r.ok().path) for r in api.get_all_operations()}
    assert found == set(OPERATIONS) | {("GET", "/metrics")} or found == set(OPERATIONS)


@pytest.fixture(scope="module")
def rating_service(rating_run: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    from fuserec.layout import Layout

    folder = tmp_path_factory.mktemp("rating-contract")
    ring = KeyRing.load(folder / "keys.json")
    KEY["rating"] = ring.add("fuzzer", ["read", "write", "admin"])
    root = Layout(rating_run.outputs_dir).root  # type: ignore[attr-defined]
    app = create_app(root, folder / "e.sqlite", settings=ServeConfig(watch_s=0), keys=ring)
    app.router.lifespan_context = _no_lifespan
    yield app
    app.state.deployment.close()


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        pytest.param(method, path, mode, id=f"rating {method} {path} {mode.value}")
        for method, path in RATING_OPERATIONS
        for mode in schemathesis.GenerationMode
        if not (path in NO_INPUT and mode is schemathesis.GenerationMode.NEGATIVE)
    ],
)
def test_a_rating_service_keeps_the_contract(
    rating_service: FastAPI, method: str, path: str, mode: schemathesis.GenerationMode
) -> None:
    """The same fuzzing against a service of the rating task: /predict, events and readiness."""
    api = schemathesis.openapi.from_asgi("/openapi.json", rating_service)
    operation = api[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers={HEADER: KEY["rating"]})
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        case.validate_response(
            response,
            checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
        )

    check()
