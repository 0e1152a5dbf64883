"""Give freed memory back to the operating system between the large steps of one process."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_freed_memory() -> bool:
    """Collect garbage, then ask glibc to return its free heap pages; True when glibc did trim.

    Why: the fuse stage fits fusers one after another in one process. Each builds many mid-sized arrays
    (LightGBM rows, per-user slices) below glibc's mmap threshold; once freed, they stay in the heap and in
    the resident set, under the next fuser's own peak. Elsewhere than glibc this only collects garbage.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return False
    return bool(trim(0))
