"""Retries with exponential backoff for the tasks that touch storage or a remote.

A nightly retrain reads its data from a network mount and pushes to a DVC remote; a blip there should
cost a wait, not a night. Bad data or a wrong path should not: retrying them only delays the error. So a
task retries (``retries`` in params.yaml) only when :func:`is_transient` says the failure can pass.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from prefect import Task
from prefect.tasks import exponential_backoff

from fuserec.config import RetriesConfig

T = TypeVar("T", bound=Task[..., Any])

# OSErrors that a retry cannot fix: the path, the permissions or the kind of file are wrong.
PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


class RemoteCommandError(OSError):
    """A command that talks to storage or a remote (``dvc push``) failed: retried as transient I/O."""


def is_transient(exc: BaseException) -> bool:
    """True for I/O failures that can pass: timeouts, dropped connections, a remote command's failure."""
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, OSError | TimeoutError)


def _retry_transient(task: Task[..., Any], task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry the failed run only when its exception is transient."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def with_io_retries(task: T, cfg: RetriesConfig) -> T:
    """``task`` retrying transient I/O errors ``cfg.attempts`` times, waits doubling from ``cfg.delay_s``."""
    if cfg.attempts == 0:
        return task
    delays = exponential_backoff(backoff_factor=cfg.delay_s)(cfg.attempts)
    # with_options returns a copy of the task (same function and signature) that prefect types Task[P, R]
    return cast(
        T,
        task.with_options(
            retries=cfg.attempts,
            retry_delay_seconds=delays,
            retry_jitter_factor=cfg.jitter,
            retry_condition_fn=_retry_transient,
        ),
    )
