"""The event store: every interaction the service receives, so a user's next request sees it at once.

The model scores histories, so "real time" needs no retraining: only a durable, ordered log of events
per user. SQLite in WAL mode is one file, survives restarts (each append is a committed transaction) and
lets readers run while a writer appends. ``EventStore`` is the interface a server database would implement.

What counts as a positive is decided here, once, for the service and batch scoring alike: an event is a
positive unless its kind is ``dislike`` or its rating is under the training's implicit threshold. Every
event, positive or not, marks its item as seen. Reads take an ``until`` time so a request dated T sees
only what had happened by T. The store is bounded: ``history_cap`` events per user (the oldest go first)
and :meth:`SQLiteEventStore.prune` for a retention window.

The store also keeps the items added to the service after the export (``POST /items``, table ``items``:
their metadata, in the order they were first added), so they survive a restart and reach the next
retrain (``fuserec store export-items``). Every table is created with ``IF NOT EXISTS`` when the store
opens, so a store written before a table existed gains it, empty, and keeps everything else.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pandas as pd

from fuserec.privacy.erasure import secure_delete_users


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: int
    kind: str = "interaction"
    rating: float | None = None


@dataclass(frozen=True)
class ItemRecord:
    """An item added to the service: its id and metadata (the items table's columns), and when it was
    first added and last changed (unix seconds)."""

    item_id: str
    title: str = ""
    genres: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    text: str = ""
    year: int | None = None
    added_at: int = 0
    updated_at: int = 0


class EventStore(Protocol):
    def append(self, events: list[Event]) -> int: ...

    def history(
        self, user_id: str, limit: int, min_rating: float | None = None, until: int | None = None
    ) -> list[tuple[str, int]]: ...

    def events(self, user_id: str, limit: int) -> list[Event]: ...

    def seen(self, user_id: str, until: int | None = None) -> list[str]: ...

    def count(self) -> int: ...

    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    rating REAL,
    timestamp INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id, timestamp, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL DEFAULT '',
    genres TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL DEFAULT '',
    year INTEGER,
    added_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
"""
LIST_SEPARATOR = "|"  # genres and tags are stored as the items table holds them: "Action|Comedy"
NEVER_POSITIVE = "dislike"  # the one kind that is never a positive, whatever its rating
LATEST = 2**62  # "no time bound" in queries


class SQLiteEventStore:
    """Events in one SQLite file (WAL); safe to share between the server's worker threads."""

    def __init__(self, path: str | Path, history_cap: int | None = None) -> None:
        """``history_cap``: events kept per user, the oldest dropped when an append goes over it."""
        self.path = Path(path)
        self.history_cap = history_cap
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed event survives a crash
        self._db.executescript(SCHEMA)
        self.items_version = 0  # bumped by every write to the items table (in-process readers refresh)

    def append(self, events: list[Event]) -> int:
        rows = [(e.user_id, e.item_id, e.kind, e.rating, int(e.timestamp)) for e in events]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO events (user_id, item_id, kind, rating, timestamp) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                if self.history_cap is not None:
                    for user in {e.user_id for e in events}:
                        self._cap(user, self.history_cap)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (a full disk does)
                    self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def history(
        self, user_id: str, limit: int, min_rating: float | None = None, until: int | None = None
    ) -> list[tuple[str, int]]:
        """The user's latest ``limit`` positive (item id, timestamp) pairs dated at or before ``until``,
        oldest first.

        With ``min_rating`` (the training's implicit threshold), a rated event below it is not a positive,
        exactly as cleaning treated the training data; a dislike never is; other events always are.
        """
        floor = -1e308 if min_rating is None else float(min_rating)
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id, timestamp FROM events WHERE user_id = ? AND timestamp <= ? AND kind != ? "
                "AND (rating IS NULL OR rating >= ?) ORDER BY timestamp DESC, seq DESC LIMIT ?",
                (user_id, LATEST if until is None else int(until), NEVER_POSITIVE, floor, limit),
            ).fetchall()
        return [(str(item), int(ts)) for item, ts in reversed(rows)]

    def events(self, user_id: str, limit: int) -> list[Event]:
        """The user's latest ``limit`` events of any kind, oldest first: what was stored, read back."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id, timestamp, kind, rating FROM events WHERE user_id = ? "
                "ORDER BY timestamp DESC, seq DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return [Event(user_id, str(i), int(ts), str(kind), rating) for i, ts, kind, rating in reversed(rows)]

    def seen(self, user_id: str, until: int | None = None) -> list[str]:
        """Every item the user has any event for by ``until`` (any kind, any rating, however old), in
        first-seen order.

        Why not just the history: a film rated one star is no positive, and a positive older than the
        served history window is no longer scored, yet the user has seen both; neither may be recommended.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id FROM events WHERE user_id = ? AND timestamp <= ? GROUP BY item_id "
                "ORDER BY MIN(seq)",
                (user_id, LATEST if until is None else int(until)),
            ).fetchall()
        return [str(item) for (item,) in rows]

    def prune(self, before: int) -> int:
        """Delete every event dated before ``before`` (a retention window); returns how many went."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM events WHERE timestamp < ?", (int(before),))
        return int(cursor.rowcount)

    def forget(self, user_ids: list[str]) -> int:
        """Erase every event of ``user_ids``, bytes included (:func:`secure_delete_users`); how many went."""
        with self._lock:
            return secure_delete_users(self._db, user_ids)

    def _cap(self, user_id: str, cap: int) -> None:
        """Keep the user's latest ``cap`` events (inside the caller's transaction)."""
        self._db.execute(
            "DELETE FROM events WHERE user_id = ? AND seq NOT IN (SELECT seq FROM events WHERE user_id = ? "
            "ORDER BY timestamp DESC, seq DESC LIMIT ?)",
            (user_id, user_id, cap),
        )

    def meta(self, key: str) -> str | None:
        """A note the store keeps about itself (e.g. which imports it has had), None when unset."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def upsert_items(self, items: list[ItemRecord], now: int) -> tuple[int, int]:
        """Add ``items``, or replace the metadata of those added before (keeping when they were first
        added), in one transaction; returns how many were new and how many replaced."""
        rows = [
            (
                r.item_id,
                r.title,
                LIST_SEPARATOR.join(r.genres),
                LIST_SEPARATOR.join(r.tags),
                r.text,
                r.year,
                int(now),
                int(now),
            )
            for r in items
        ]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                marks = ",".join("?" * len(rows))
                known = self._db.execute(
                    f"SELECT COUNT(*) FROM items WHERE item_id IN ({marks})", [r[0] for r in rows]
                ).fetchone()[0]
                self._db.executemany(
                    "INSERT INTO items (item_id, title, genres, tags, text, year, added_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(item_id) DO UPDATE SET "
                    "title = excluded.title, genres = excluded.genres, tags = excluded.tags, "
                    "text = excluded.text, year = excluded.year, updated_at = excluded.updated_at",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self.items_version += 1
        return len(rows) - int(known), int(known)

    def items(self) -> list[ItemRecord]:
        """Every added item, in the order they were first added."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id, title, genres, tags, text, year, added_at, updated_at FROM items "
                "ORDER BY seq"
            ).fetchall()
        return [_item_record(row) for row in rows]

    def item(self, item_id: str) -> ItemRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT item_id, title, genres, tags, text, year, added_at, updated_at FROM items "
                "WHERE item_id = ?",
                (item_id,),
            ).fetchone()
        return None if row is None else _item_record(row)

    def event_counts(self, item_ids: list[str]) -> dict[str, int]:
        """Events of any kind stored for each of ``item_ids`` (one pass over the events)."""
        if not item_ids:
            return {}
        with self._lock:
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (item_id TEXT PRIMARY KEY)")
            self._db.execute("DELETE FROM wanted")
            self._db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", [(i,) for i in item_ids])
            rows = self._db.execute(
                "SELECT e.item_id, COUNT(*) FROM events e JOIN wanted w ON e.item_id = w.item_id "
                "GROUP BY e.item_id"
            ).fetchall()
        return {str(item): int(n) for item, n in rows}

    def import_frame(self, frame: pd.DataFrame) -> int:
        """Bulk-load (user_id, item_id, timestamp[, rating]) rows, e.g. the training interactions."""
        events = [
            Event(str(r.user_id), str(r.item_id), int(r.timestamp), "training", getattr(r, "rating", None))
            for r in frame.itertuples(index=False)
        ]
        return self.append(events)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _item_record(row: tuple[object, ...]) -> ItemRecord:
    item_id, title, genres, tags, text, year, added_at, updated_at = row
    return ItemRecord(
        str(item_id),
        str(title),
        tuple(g for g in str(genres).split(LIST_SEPARATOR) if g),
        tuple(t for t in str(tags).split(LIST_SEPARATOR) if t),
        str(text),
        None if year is None else int(str(year)),
        int(str(added_at)),
        int(str(updated_at)),
    )
