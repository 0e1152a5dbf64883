"""Replace a folder or a pointer so that a reader sees the old version or the new one, never a mix or a gap.

A stage that rewrote its output folder in place, and then failed, would leave old and new files side by
side. Instead a writer fills a *staging* folder beside the target (same parent, so same filesystem), and
only when it is complete and checked puts it into place with :func:`replace_dir`:

* on Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two directory entries in one atomic step, so the
  target path always names a complete folder; the old content ends up under the staging name and is
  deleted afterwards;
* elsewhere (or on a filesystem that refuses the exchange), the old folder is renamed aside and the new one
  renamed into place: two renames, with a short window in which the target is missing.

A pointer that moves between complete versions (the served model's ``current``) is a relative symlink,
moved with :func:`point_symlink`: a new link under a temporary name renamed over the old one, one atomic
rename. :func:`exchange` swaps two entries (e.g. the ``current`` and ``previous`` links) in one step.

Files and directories are flushed (``fsync``) before they are put into place, so a power cut cannot leave
a renamed folder whose files are still empty.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
# errno values meaning "this kernel / filesystem cannot exchange": fall back to two renames
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """libc's ``renameat2`` (glibc 2.28+), or None where there is none (not Linux, older or other libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return cast("Callable[[int, bytes, int, bytes, int], int]", func)


_RENAMEAT2 = _renameat2()


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist; any kind: folder, file, link).

    Returns False, having changed nothing, where the platform or filesystem cannot exchange; raises
    ``OSError`` for any other failure (e.g. one of them missing, or on another filesystem).
    """
    if _RENAMEAT2 is None:
        return False
    old, new = os.fsencode(a), os.fsencode(b)
    if _RENAMEAT2(_AT_FDCWD, old, _AT_FDCWD, new, _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(
        code, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(code)}", os.fspath(a), None, os.fspath(b)
    )


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename inside it) to disk; a no-op where a folder cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every regular file and folder under ``root``, ``root`` included (symlinks are not followed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a folder tree, a file or a symlink (never what a symlink points to); nothing if absent."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def staging_path(target: str | os.PathLike[str]) -> Path:
    """Where this process builds the next version of ``target``: ``.<name>-staging-<pid>`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}-staging-{os.getpid()}"


def remove_stale_staging(target: str | os.PathLike[str]) -> list[Path]:
    """Delete staging folders of ``target`` left by processes that no longer run (a killed export).

    Another live process's staging folder is left alone. Returns what was deleted.
    """
    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefix = f".{target.name}-staging-"
    for path in target.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :]
        if pid.isdigit() and not pid_alive(int(pid)):
            remove(path)
            removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (ours included); True when unsure, so its files are kept."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is another user's (PermissionError), or unsure
        return True
    return True


def replace_dir(
    staging: str | os.PathLike[str], target: str | os.PathLike[str], durable: bool = True
) -> None:
    """Put the complete folder ``staging`` in place of ``target``, then delete the old ``target``.

    ``staging`` must be beside ``target`` (on the same filesystem; a sibling name is simplest). It may also
    be a symlink to a folder, which then replaces a real ``target`` folder. With no ``target`` yet this is
    one rename. Otherwise, where ``renameat2(RENAME_EXCHANGE)`` is available (Linux), the two entries are
    swapped atomically and the old content, now under the staging name, is deleted: ``target`` always
    names a complete folder. Elsewhere the old folder is renamed aside first (a brief window with no
    ``target``), and renamed back if the second rename fails. ``durable`` flushes the new files and the
    parent directory to disk first. A failure to delete the old content only warns: the replace is done.
    """
    staging, target = Path(staging), Path(target)
    if not staging.is_dir():
        raise NotADirectoryError(f"{staging} is not a folder; nothing to put in place of {target}")
    if durable and not staging.is_symlink():
        fsync_tree(staging)
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif exchange(staging, target):
        _discard(staging)  # the old content, under the staging name
    else:
        # No atomic exchange here: rename the old folder aside, then the new one into place. Between the two
        # renames there is no ``target``; a reader then sees it missing (never half-written), and if the
        # second rename fails the old folder is put back.
        aside = parent / f".{target.name}-old-{os.getpid()}"
        remove(aside)
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _discard(aside)
    if durable:
        fsync_dir(parent)


def _discard(path: Path) -> None:
    try:
        remove(path)
    except OSError as exc:
        warnings.warn(f"replaced, but could not delete the old content at {path}: {exc}", stacklevel=3)


def point_symlink(link: str | os.PathLike[str], dest: str | os.PathLike[str], durable: bool = True) -> None:
    """Make ``link`` a symlink to ``dest`` (stored as given: pass a relative path for a movable tree).

    A new link is made under a temporary name beside ``link`` and renamed over it: one atomic rename, so a
    reader finds the old target or the new one. ``link`` must not be a real folder (a rename cannot replace
    one by a link; see :func:`replace_dir`).
    """
    link = Path(link)
    if link.is_dir() and not link.is_symlink():
        raise IsADirectoryError(f"{link} is a real folder, not a link; replace it with replace_dir")
    tmp = link.parent / f".{link.name}-link-{os.getpid()}"
    remove(tmp)
    os.symlink(dest, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(link.parent)
