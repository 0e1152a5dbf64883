"""Erasure: remove a person's data from everything fuserec wrote, and keep a record that holds no id.

A user's rows live in three kinds of places, each handled its own way:

- **tables** (Parquet / CSV under the outputs tree, the served releases, batch outputs): rows whose
  ``user_id`` is the user's stored id are dropped, and so are rows keyed by the user's index (``user``)
  in the same tree, found through the tables that map ``user`` to ``user_id`` (``clean/users.parquet``).
  A file is rewritten beside itself and renamed into place, so a crash leaves the old or the new file;
- **the event store** (SQLite): the rows are deleted with ``secure_delete`` on and the WAL checkpointed
  and truncated, so the bytes are overwritten, not merely unlinked from the b-tree;
- **derived state** (trained models, fusers, the stage cache): learned from everyone at once, it cannot
  drop one person's share. The stage cache is deleted (a cached result would bring the rows back), and
  the erasure register (``privacy.erasures``) changes, which DVC sees as a changed input of validate: the
  next ``dvc repro`` / ``fuserec run`` retrains without the user, whose rows validate drops from the raw
  data (:func:`erased_subjects`).

The register is also the audit log: one JSON line per erasure with a keyed hash of the id (HMAC-SHA-256,
domain-separated from the pseudonym, so the register names no pseudonym either), the time and what was
removed. After scrubbing, :func:`residue` searches every file for the id and the stored id, as text and
as little-endian int64; anything it finds is reported, never hidden.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from fuserec.privacy.pseudonyms import canonical_id

AUDIT_DOMAIN = b"fuserec-erasure\x00"
TABLE_SUFFIXES = (".parquet", ".csv")
USER_ID = "user_id"
USER_INDEX = "user"
SKIP_DIRS = frozenset({".git"})  # git history is the operator's to rewrite (docs/privacy.md)
INT_NEEDLE_MIN = 10**9  # smaller ids as int64 bytes occur by chance in any binary file


def subject_hash(key: bytes, raw_id: str) -> str:
    """The register's name for a person: a keyed hash that is not the pseudonym (another domain)."""
    text = canonical_id(raw_id)  # "007" and 7 are one person, as for the pseudonym
    return hmac.new(key, AUDIT_DOMAIN + text.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Subject:
    """One person to forget: the id a client knows, the id fuserec stores, and the register's hash."""

    raw: str
    stored: str  # the pseudonym when ids are pseudonymised, else the raw id
    audit: str

    def needles(self) -> list[bytes]:
        """What a byte search looks for: both ids as text, and as int64 when they are integers."""
        found = {self.raw.encode(), self.stored.encode()}
        for text in (self.raw, self.stored):
            if text.isascii() and text.isdigit() and INT_NEEDLE_MIN <= int(text) < 2**63:
                found.add(int(text).to_bytes(8, "little"))
        return sorted(found)


@dataclass
class ErasureReport:
    """What one erasure removed, by place; written (with the subject's hash only) to the register."""

    tables: dict[str, int] = field(default_factory=dict)  # relative path -> rows removed
    store_events: int = 0
    texts: list[str] = field(default_factory=list)  # reports whose mentions were replaced
    cleared: list[str] = field(default_factory=list)  # derived state deleted (the stage cache)
    retrain: bool = False  # trained state still reflects the user until the next run
    residue: list[str] = field(default_factory=list)  # files where a search still finds an id

    def as_dict(self) -> dict[str, Any]:
        return {
            "tables": dict(sorted(self.tables.items())),
            "rows": sum(self.tables.values()),
            "store_events": self.store_events,
            "texts_redacted": self.texts,
            "cleared": self.cleared,
            "retrain_required": self.retrain,
            "residue": self.residue,
        }


# -- tables -------------------------------------------------------------------------------------------
def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _write_beside(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to a temporary file beside ``path`` and rename it over ``path`` (atomic)."""
    tmp = path.with_name(f".{path.name}.erasing-{os.getpid()}")
    if path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        return handle.readline().strip().split(",")


def _tables(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in TABLE_SUFFIXES and not SKIP_DIRS.intersection(p.parts)
    )


def scrub_tables(root: Path, stored_ids: set[str]) -> dict[str, int]:
    """Drop the users' rows from every table under ``root``; returns rows removed per relative path.

    First the tables with a ``user_id`` column (the index of each dropped row is noted where the table
    also has ``user``), then the tables keyed by ``user`` alone (clean ratings, the split), which share
    that index space within one outputs tree.
    """
    removed: dict[str, int] = {}
    indices: set[int] = set()
    tables = _tables(root)
    by_index: list[Path] = []
    for path in tables:
        columns = _columns(path)
        if USER_ID in columns:
            frame = _read(path)
            hit = frame[USER_ID].astype(str).str.strip().isin(stored_ids).to_numpy()
            if USER_INDEX in columns and hit.any():
                indices.update(int(u) for u in frame.loc[hit, USER_INDEX])
            if hit.any():
                _write_beside(frame.loc[~hit], path)
                removed[path.relative_to(root).as_posix()] = int(hit.sum())
        elif USER_INDEX in columns:
            by_index.append(path)
    for path in by_index if indices else []:
        frame = _read(path)
        hit = pd.to_numeric(frame[USER_INDEX], errors="coerce").isin(indices).to_numpy()
        if hit.any():
            _write_beside(frame.loc[~hit], path)
            removed[path.relative_to(root).as_posix()] = int(hit.sum())
    return removed


TEXT_SUFFIXES = (".json", ".html", ".txt", ".md", ".log")
ERASED = "<erased>"


def _redact(value: Any, ids: set[str]) -> Any:
    """``value`` (parsed JSON) with every id, as a whole value or inside a string, replaced."""
    if isinstance(value, dict):
        return {k: _redact(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, ids) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and str(value) in ids:
        return ERASED
    if isinstance(value, str):
        for found in ids:
            value = value.replace(found, ERASED)
    return value


def scrub_text(root: Path, ids: set[str]) -> dict[str, int]:
    """Replace the ids in reports and other text files under ``root`` (a validation report's samples, the
    HTML report); returns the files changed, each with 1. Ids shorter than six characters are left: as
    text they match unrelated numbers."""
    ids = {i for i in ids if len(i) >= 6}
    changed: dict[str, int] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
        if SKIP_DIRS.intersection(path.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if not any(i in text for i in ids):
            continue
        if path.suffix == ".json":
            new = json.dumps(_redact(json.loads(text), ids), indent=2)
        else:
            new = text
            for found in ids:
                new = new.replace(found, ERASED)
        tmp = path.with_name(f".{path.name}.erasing-{os.getpid()}")
        tmp.write_text(new, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)
        changed[path.relative_to(root).as_posix()] = 1
    return changed


# -- the event store ----------------------------------------------------------------------------------
def secure_delete_users(db: sqlite3.Connection, user_ids: Iterable[str]) -> int:
    """Delete the users' rows of an event store's ``events`` table so the bytes are gone from the file.

    ``secure_delete`` zeroes freed content; the TRUNCATE checkpoints move the zeroed pages into the
    database file and empty the WAL (which would still hold older page images); VACUUM rebuilds the file
    so no free page keeps a copy. ``db`` must be in autocommit mode (VACUUM cannot run in a transaction).
    """
    ids = sorted(set(user_ids))
    if not ids:
        return 0
    db.execute("PRAGMA secure_delete = ON")
    marks = ",".join("?" * len(ids))
    gone = db.execute(f"DELETE FROM events WHERE user_id IN ({marks})", ids).rowcount
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("VACUUM")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return int(gone)


def forget_in_store(path: Path, stored_ids: Iterable[str]) -> int:
    """Erase the users' events from the SQLite event store at ``path`` (no service holds it open)."""
    if not path.exists():
        return 0
    db = sqlite3.connect(path, isolation_level=None)
    try:
        return secure_delete_users(db, stored_ids)
    finally:
        db.close()


class LiveStore(Protocol):
    """An event store a running service holds open (``SQLiteEventStore``): it erases under its own lock."""

    def forget(self, user_ids: list[str]) -> int: ...


# -- searching for what is left -----------------------------------------------------------------------
def residue(roots: Iterable[Path], subjects: list[Subject]) -> list[str]:
    """Files under ``roots`` whose bytes, or whose tables' id columns, still hold a subject's id.

    Parquet is compressed, so a byte search alone could miss an id in it: tables are also read and
    their ``user_id`` values compared.
    """
    needles = [n for s in subjects for n in s.needles() if len(n) >= 6]  # shorter ones match anywhere
    stored = {s.stored for s in subjects} | {s.raw for s in subjects}
    found: list[str] = []
    for root in roots:
        if not root.exists():
            continue
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if SKIP_DIRS.intersection(path.parts):
                continue
            data = path.read_bytes()
            hit = any(n in data for n in needles)
            if not hit and data[:4] == PARQUET_MAGIC:  # also a content-addressed copy (DVC's cache)
                hit = _parquet_holds(path, stored)
            elif not hit and path.suffix == ".csv" and USER_ID in _columns(path):
                hit = bool(_read(path)[USER_ID].astype(str).str.strip().isin(stored).any())
            if hit:
                found.append(str(path))
    return sorted(found)


PARQUET_MAGIC = b"PAR1"


def _parquet_holds(path: Path, ids: set[str]) -> bool:
    """Whether a Parquet file's ``user_id`` column holds one of ``ids`` (compression hides the bytes)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if USER_ID not in names:
            return False
        column = pq.read_table(path, columns=[USER_ID]).column(0).to_pandas()
    except Exception:  # not Parquet after all: the byte search has spoken
        return False
    return bool(column.astype(str).str.strip().isin(ids).any())


# -- the register -------------------------------------------------------------------------------------
def erased_subjects(register: Path) -> set[str]:
    """The keyed hashes of every person erased so far (validate drops their rows from the raw data)."""
    if not register.exists():
        return set()
    out = set()
    for line in register.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.add(str(json.loads(line)["subject"]))
    return out


def record(register: Path, subject: Subject, report: ErasureReport, where: str) -> None:
    """Append one audit line (no raw id, no pseudonym) and fsync it: the proof that erasure happened."""
    entry = {
        "subject": subject.audit,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": where,
        **report.as_dict(),
    }
    register.parent.mkdir(parents=True, exist_ok=True)
    with register.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class Places:
    """Where one project keeps user data: scrubbed in this order, then searched."""

    tables: list[Path]  # outputs tree, served folder, batch outputs
    stores: list[Path]  # SQLite event stores
    caches: list[Path]  # derived state deleted outright
    register: Path


def erase(
    subjects: list[Subject], places: Places, where: str = "cli", live: LiveStore | None = None
) -> ErasureReport:
    """Remove ``subjects`` from ``places`` (and ``live``, a store a running service holds), search for
    what is left, and append one audit line each to the register."""
    report = ErasureReport()
    stored = {s.stored for s in subjects}
    for cache in places.caches:  # first: a cache may sit inside an outputs tree
        if cache.exists():
            shutil.rmtree(cache)
            report.cleared.append(str(cache))
    for root in places.tables:
        if root.is_dir():
            for rel, n in scrub_tables(root, stored).items():
                report.tables[f"{root.name}/{rel}"] = report.tables.get(f"{root.name}/{rel}", 0) + n
            texts = scrub_text(root, stored | {s.raw for s in subjects})
            report.texts.extend(f"{root.name}/{rel}" for rel in texts)
    if live is not None:
        report.store_events += live.forget(sorted(stored))
    for store in places.stores:
        report.store_events += forget_in_store(store, stored)
    report.retrain = bool(report.tables)
    report.residue = residue([*places.tables, *places.stores, *places.caches], subjects)
    for subject in subjects:
        record(places.register, subject, report, where)
    return report


def subjects_for(raw_ids: Iterable[str], key: bytes, pseudonym: Callable[[str], int] | None) -> list[Subject]:
    """The subjects for the ids a client knows: ``pseudonym`` maps one to the stored id (None: ids are
    stored as given)."""
    out = []
    for raw in raw_ids:
        text = canonical_id(raw) if pseudonym is not None else str(raw).strip()
        stored = str(pseudonym(text)) if pseudonym is not None else text
        out.append(Subject(raw=text, stored=stored, audit=subject_hash(key, text)))
    return out


def rows_about(roots: Iterable[Path], stored_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Every table row under ``roots`` whose ``user_id`` is one of ``stored_ids``, by file: what a person
    may ask to see (attributes, rejected lines, batch outputs), read with the same search erasure uses."""
    found: dict[str, list[dict[str, Any]]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for path in _tables(root):
            if USER_ID not in _columns(path):
                continue
            frame = _read(path)
            hit = frame[USER_ID].astype(str).str.strip().isin(stored_ids).to_numpy()
            if hit.any():
                rows = json.loads(frame.loc[hit].to_json(orient="records", date_format="iso"))
                found[f"{root.name}/{path.relative_to(root).as_posix()}"] = rows
    return found
