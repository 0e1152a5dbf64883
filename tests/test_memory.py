from __future__ import annotations

import ctypes.util

import numpy as np
import pytest

from fuserec import memory


def test_release_runs_after_many_small_arrays_are_freed() -> None:
    arrays = [np.ones(4096) for _ in range(2000)]  # below glibc's mmap threshold: heap pages
    del arrays
    assert isinstance(memory.release_freed_memory(), bool)


def test_without_a_c_library_it_only_collects_garbage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert memory.release_freed_memory() is False


def test_a_libc_without_malloc_trim_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoTrim:
        def __init__(self, name: str) -> None:
            pass

    monkeypatch.setattr(memory.ctypes, "CDLL", NoTrim)
    assert memory.release_freed_memory() is False
