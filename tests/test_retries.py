"""Transient I/O errors are retried with backoff; errors a wait cannot fix fail at once."""

from __future__ import annotations

import pytest
from prefect import task

from fuserec.config import Params, RetriesConfig
from fuserec.flows.retries import RemoteCommandError, is_transient, with_io_retries


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError("peer reset"), True),
        (TimeoutError("read timed out"), True),
        (OSError(5, "Input/output error"), True),
        (RemoteCommandError("`dvc push` failed (1)"), True),
        (FileNotFoundError("data/ratings.csv"), False),
        (PermissionError("served/current"), False),
        (ValueError("rating out of range"), False),
        (KeyError("user_id"), False),
    ],
)
def test_only_io_failures_that_can_pass_are_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def _flaky(failures: list[BaseException]):
    calls: list[int] = []

    @task(name="flaky-io")
    def flaky() -> str:
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "read"

    return flaky, calls


def test_a_transient_error_is_retried_until_it_passes(prefect_harness: None) -> None:
    flaky, calls = _flaky([ConnectionResetError("blip"), TimeoutError("slow mount")])
    retried = with_io_retries(flaky, RetriesConfig(attempts=3, delay_s=0.0, jitter=0.0))
    assert retried() == "read" and len(calls) == 3


def test_retries_stop_at_the_limit_and_raise_the_last_error(prefect_harness: None) -> None:
    flaky, calls = _flaky([ConnectionResetError("down")] * 5)
    retried = with_io_retries(flaky, RetriesConfig(attempts=2, delay_s=0.0, jitter=0.0))
    with pytest.raises(ConnectionResetError):
        retried()
    assert len(calls) == 3  # the first try and two retries


def test_a_permanent_error_fails_at_once(prefect_harness: None) -> None:
    flaky, calls = _flaky([FileNotFoundError("no such file: ratings.csv")])
    retried = with_io_retries(flaky, RetriesConfig(attempts=3, delay_s=0.0, jitter=0.0))
    with pytest.raises(FileNotFoundError):
        retried()
    assert len(calls) == 1


def test_backoff_doubles_and_the_validate_stage_uses_it(tmp_path) -> None:
    from fuserec.flows.stages import stage_task

    params = Params.model_validate(
        {"outputs": str(tmp_path / "out"), "retries": {"attempts": 3, "delay_s": 2.0}}
    )
    validate = stage_task("validate", params)
    assert validate.retries == 3 and validate.retry_delay_seconds == [2.0, 4.0, 8.0]
    assert validate.retry_condition_fn is not None
    assert stage_task("train-plugin", params).retries == 0  # fitting is not I/O: a failure is a bug
    off = Params.model_validate({"outputs": str(tmp_path / "out"), "retries": {"attempts": 0}})
    assert stage_task("validate", off).retries == 0
