"""benchmarks/serving.py's capacity figure: the most requests/s of a load level that kept its p99."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _serving() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_benchmark", ROOT / "benchmarks" / "serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _level(rate: float, p99: float, errors: int = 0) -> dict:
    return {"requests_per_s": rate, "p99_ms": p99, "p50_ms": p99 / 2, "errors": errors}


def test_within_slo_takes_the_fastest_level_that_held_the_latency_and_had_no_errors() -> None:
    within_slo = _serving().within_slo
    levels = {
        "clients_1": _level(200.0, 8.0),
        "clients_8": _level(450.0, 30.0),
        "clients_16": _level(500.0, 50.5),  # faster, but its p99 is over 50 ms
        "clients_32": _level(480.0, 45.0, errors=3),  # errors disqualify
        "server_batches": {"runs": 10, "histories": 40},  # not a level
    }
    assert within_slo(levels) == {"p99_ms_at_most": 50.0, "requests_per_s": 450.0, "level": "clients_8"}
    assert within_slo(levels, p99_ms=60.0)["level"] == "clients_16"
    assert within_slo({"clients_1": _level(100.0, 80.0)}) == {
        "p99_ms_at_most": 50.0,
        "requests_per_s": 0.0,
        "level": None,
    }
