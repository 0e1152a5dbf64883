"""Cache keys of pipeline stages: what a stage reads decides whether its last result still holds.

A stage's key is the SHA-256 of (1) the bytes of every file it reads, (2) the params sections it reads and
(3) the distribution versions of the code that computes it (its plugins, and fuserec for the stage
itself). Nothing else enters: not paths, times, the task runner or params of other stages. So editing one
plugin's config re-keys that plugin's train task only, and a stage whose inputs come out byte-identical
after an upstream rerun stays cached.

Outputs are files on disk, not the value Prefect stores (a path), so a key alone is not enough for a hit:
after a stage runs, :func:`write_record` notes the SHA-256 of every file it wrote, and
:func:`outputs_intact` checks them before a cached result is used.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuserec.manifest import file_sha256

KEY_VERSION = 1  # bump when the meaning of a key changes: every old entry then misses
MISSING = "missing"
DIRECTORY = "directory"

_hash_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def _file_hash(path: Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime): a stage's inputs are hashed by several keys."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _memo_lock:
        known = _hash_memo.get(memo)
    if known is None:
        known = file_sha256(path)
        with _memo_lock:
            _hash_memo[memo] = known
    return known


def tree_hashes(path: str | Path) -> dict[str, str] | str:
    """``{relative path: sha256}`` of every file under ``path`` (a file: its own name), or ``"missing"``.

    Relative to ``path`` so the key depends on content, not on where the project lives.
    """
    path = Path(path)
    if path.is_file():
        return {path.name: _file_hash(path)}
    if not path.is_dir():
        return MISSING
    return {p.relative_to(path).as_posix(): _file_hash(p) for p in sorted(path.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class StageSpec:
    """What one stage run reads and writes, as the cache sees it.

    ``inputs`` maps a label (e.g. ``split/train.parquet``) to a file or folder; ``params`` maps dotted
    params keys to their values; ``code`` maps plugin (or ``fuserec``) to ``distribution==version``;
    ``outputs`` are the files or folders the stage writes, relative to ``root`` (the outputs folder).
    """

    stage: str
    inputs: Mapping[str, Path] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    code: Mapping[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    root: Path = Path(".")


def key_payload(spec: StageSpec) -> dict[str, Any]:
    """Everything the key hashes, as JSON-able data (handy to see why two keys differ)."""
    return {
        "key_version": KEY_VERSION,
        "stage": spec.stage,
        "inputs": {label: tree_hashes(path) for label, path in sorted(spec.inputs.items())},
        "params": dict(sorted(spec.params.items())),
        "code": dict(sorted(spec.code.items())),
    }


def cache_key(spec: StageSpec) -> str:
    """SHA-256 hex digest of :func:`key_payload` (canonical JSON)."""
    text = json.dumps(key_payload(spec), sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj, key=str) if isinstance(obj, set | frozenset) else list(obj)
    raise TypeError(
        f"params value {obj!r} ({type(obj).__name__}) cannot enter a cache key; pass plain JSON values"
    )


# --------------------------------------------------------------------------------------------------
# Output records


def output_hashes(root: Path, outputs: Iterable[str]) -> dict[str, str]:
    """``{path relative to root: sha256}`` of every file that exists under the given outputs."""
    found: dict[str, str] = {}
    for rel in outputs:
        hashes = tree_hashes(root / rel)
        if hashes == MISSING:
            continue
        assert isinstance(hashes, dict)
        target = root / rel
        if target.is_dir():
            found[f"{target.relative_to(root).as_posix()}/"] = DIRECTORY  # an empty folder is an output too
        for name, digest in hashes.items():
            full = target if target.is_file() else target / name
            found[full.relative_to(root).as_posix()] = digest
    return dict(sorted(found.items()))


def record_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "records" / f"{key}.json"


def write_record(cache_dir: Path, key: str, spec: StageSpec) -> Path:
    """Note the files ``spec``'s stage just wrote, so a later hit can check they are still there."""
    path = record_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"stage": spec.stage, "outputs": output_hashes(spec.root, spec.outputs)}
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)  # atomic: a concurrent reader sees the old record or the new one
    return path


def outputs_intact(cache_dir: Path, key: str, root: Path) -> bool:
    """True when the run recorded under ``key`` left outputs that are all still on disk, byte for byte.

    False without a record (e.g. it was written by an older fuserec or deleted): the stage must rerun.
    """
    path = record_path(cache_dir, key)
    if not path.exists():
        return False
    try:
        recorded: dict[str, str] = json.loads(path.read_text())["outputs"]
    except (ValueError, KeyError):
        return False
    for rel, digest in recorded.items():
        file = root / rel
        if digest == DIRECTORY:
            if not file.is_dir():
                return False
        elif not file.is_file() or _file_hash(file) != digest:
            return False
    return bool(recorded)
