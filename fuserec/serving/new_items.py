"""Items added to the service after the export, listed by ``/recommend`` without retraining.

``POST /items`` stores an item's metadata (title, genres, tags, free text, year) in the event store's
``items`` table; from then on the side scorer of :mod:`fuserec.cold_items` scores it, with the catalogue's
items that have no training interaction, against each user's history and merges it into the served list
at the place its validation-calibrated hit probability earns (see that module for the design). Events on
added items are accepted: they join the user's history for the side scorer's profile (the ONNX graph is
never sent an id it does not know, so it scores the catalogue part of the history as before) and mark the
item as seen.

Rules:

- an added item's id is what the pipeline's validate stage accepts as an item id (a non-negative
  integer, written without leading zeros), so it can join the catalogue at the next retrain under the
  id its events name (``fuserec store export-items``);
- an id in the trained catalogue cannot be added (409): its metadata is the catalogue's until the next
  retrain; an id added before is updated (its metadata replaced, its first-added time kept), so a client
  can retry or correct an item;
- added items get indices after the catalogue's (``n_items + position in the order first added``), in
  this process only: they never reach the graph;
- in a response's ``contributions`` what the side scorer added to a score is the content-aware part's:
  the ``content`` component's share when ``content`` is fused, else a share named ``new_items``; so the
  shares still add up to the score, and ``/explain`` says in ``new_item`` how such an item was scored;
- the cache of added items (vectors, genres, exposure) is rebuilt when the store's items change
  (``items_version``, in-process) and its exposure (events stored for each added item) grows with every
  event this service stores; a second process writing the same store is seen at its next restart.

An export without a side scorer (from before ``cold_items``) still takes added items: they are embedded in
a vocabulary fitted on its catalogue and listed after the served list's top items, never promoted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Self

import numpy as np
import pandas as pd
from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fuserec.cold_items import ColdItems
from fuserec.features import TfidfVocabulary
from fuserec.histories import Histories
from fuserec.rerank import unit_vectors
from fuserec.serving.store import LIST_SEPARATOR, ItemRecord, SQLiteEventStore

MAX_ITEMS_REQUEST = 1_000
MAX_TITLE = 512
MAX_TEXT = 20_000
MAX_TERMS = 50  # genres or tags per item
NEW_ITEMS = "new_items"  # the side scorer's share in a response's contributions (no content component)
CONTENT = "content"  # the component whose share the side scorer's joins when it is fused
ADDED_REASON = (
    "added item, scored by content: it is not in the trained model, so the side scorer placed it by its "
    "similarity to the history, calibrated onto the served list (fuserec.cold_items)"
)
COLD_REASON = (
    "no training interactions: the side scorer raised it to the place its content similarity to the "
    "history earns in the served list (fuserec.cold_items)"
)
_NO_CONTROL = r"^[^\x00-\x1f\x7f|]*$"  # no control characters, no '|' (the items table's list separator)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# What the pipeline's validate stage accepts as an item id (a non-negative integer, at most 18 digits),
# written canonically (no leading zero) so the id the service's events name is the one the next retrain's
# catalogue holds: an added item must be able to join it.
ItemId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=18,
        pattern=r"^(0|[1-9][0-9]{0,17})$",
        description="a non-negative integer without leading zeros, as the data source's item ids are",
    ),
]
Term = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f|]+$")]


class ItemIn(BaseModel):
    """One item's metadata, in the items table's terms; at least one content field is needed."""

    model_config = ConfigDict(extra="forbid")
    item_id: ItemId
    title: str = Field("", max_length=MAX_TITLE, pattern=_NO_CONTROL, description="e.g. 'Heat (1995)'")
    genres: list[Term] = Field(default_factory=list, max_length=MAX_TERMS, description="e.g. ['Crime']")
    tags: list[Term] = Field(default_factory=list, max_length=MAX_TERMS)
    year: int | None = Field(None, ge=1000, le=3000, description="release year")
    text: str = Field("", max_length=MAX_TEXT, description="free text (a description, a plot)")

    @model_validator(mode="after")
    def has_content(self) -> Self:
        if _CONTROL.search(self.text):
            raise ValueError("text may not hold control characters (new lines and tabs are fine)")
        if not (self.title.strip() or self.genres or self.tags or self.text.strip() or self.year is not None):
            raise ValueError(
                "give at least one of title, genres, tags, text or year: "
                "an added item is scored by its content"
            )
        return self


class ItemsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS_REQUEST)


def records_frame(records: list[ItemRecord]) -> pd.DataFrame:
    """Added items as rows of the items table (``item_id, title, genres, tags, text, year``)."""
    return pd.DataFrame(
        {
            "item_id": [r.item_id for r in records],
            "title": [r.title for r in records],
            "genres": [LIST_SEPARATOR.join(r.genres) for r in records],
            "tags": [LIST_SEPARATOR.join(r.tags) for r in records],
            "text": [r.text for r in records],
            "year": pd.array([r.year for r in records], dtype="Int64"),
        }
    )


@dataclass
class AddedItems:
    """The added items as the side scorer and the responses read them (rebuilt when the store changes)."""

    records: list[ItemRecord] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)  # item id -> position (its index: n_items + it)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.float32))
    diversity: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.float32))
    genres: list[frozenset[str]] = field(default_factory=list)
    exposure: np.ndarray = field(default_factory=lambda: np.zeros(0))
    version: int = -1


class NewItems:
    """The side scorer of one served export, the store's added items, and the merge a response uses."""

    def __init__(
        self, folder: Path, manifest: dict[str, Any], catalog: pd.DataFrame, store: SQLiteEventStore
    ):
        entry = manifest.get("cold_items")
        self.catalog = catalog
        self.n_items = len(catalog)
        if entry:
            self.side = ColdItems.load(folder, entry)
        else:  # an export from before the side scorer: added items are embedded, never promoted
            self.side = ColdItems.from_catalog(catalog, np.ones(self.n_items))
        if len(self.side.popularity) != self.n_items:
            raise RuntimeError(
                f"{folder}: cold_items covers {len(self.side.popularity)} items, the catalogue "
                f"{self.n_items}; re-export the model"
            )
        self.diversity_vocabulary = TfidfVocabulary.fit(catalog)  # the space of the API's diversity
        self.store = store
        self.added = AddedItems()
        self.refresh()

    # -- the added items ---------------------------------------------------------------------------------
    def refresh(self) -> AddedItems:
        """The added items, rebuilt from the store when its items changed since the last look."""
        if self.added.version == self.store.items_version:
            return self.added
        version = self.store.items_version
        records = self.store.items()
        frame = records_frame(records)
        counts = self.store.event_counts([r.item_id for r in records])
        d = self.side.vectors.shape[1]
        self.added = AddedItems(
            records,
            {r.item_id: i for i, r in enumerate(records)},
            self.side.embed(frame) if records else np.zeros((0, d), dtype=np.float32),
            unit_vectors(self.diversity_vocabulary.embed(frame))
            if records
            else np.zeros((0, self.diversity_vocabulary.item_vectors.shape[1]), dtype=np.float32),
            [frozenset(g.strip().lower() for g in r.genres if g.strip()) for r in records],
            np.asarray([counts.get(r.item_id, 0) for r in records], dtype=np.float64),
            version,
        )
        return self.added

    @property
    def size(self) -> int:
        """Catalogue plus added items: the length of a merged score vector."""
        return self.n_items + len(self.refresh().records)

    def position(self, item_id: str) -> int | None:
        """An added item's index (after the catalogue's), None when it was never added."""
        added = self.refresh()
        at = added.index.get(item_id)
        return None if at is None else self.n_items + at

    def record(self, index: int) -> ItemRecord:
        return self.refresh().records[index - self.n_items]

    def saw_events(self, item_ids: list[str]) -> None:
        """Stored events on added items raise their exposure (what the side scorer reads) at once."""
        added = self.refresh()
        for item_id in item_ids:
            at = added.index.get(item_id)
            if at is not None:
                added.exposure[at] += 1.0

    def add(self, items: list[ItemIn], known: dict[str, int], now: int) -> dict[str, Any]:
        """Store ``items`` (new ids added, added ids updated); ``known``: the trained catalogue's ids.

        422 for an id twice in one request, 409 for an id of the trained catalogue.
        """
        ids = [i.item_id for i in items]
        if len(set(ids)) != len(ids):
            raise HTTPException(status_code=422, detail="an item id appears more than once in the request")
        trained = [n for n, i in enumerate(ids) if i in known]
        if trained:
            raise HTTPException(
                status_code=409,
                detail=f"items[{trained[0]}] has the id of an item of the trained catalogue "
                f"({len(trained)} such ids in all): its metadata changes at the next retrain, not here",
            )
        records = [
            ItemRecord(
                i.item_id,
                i.title.strip(),
                tuple(g.strip() for g in i.genres),
                tuple(t.strip() for t in i.tags),
                i.text.strip(),
                i.year,
            )
            for i in items
        ]
        added, updated = self.store.upsert_items(records, now)
        return {"added": added, "updated": updated, "items": len(records)}

    # -- scoring -----------------------------------------------------------------------------------------
    def merge(
        self,
        scores: np.ndarray,
        parts: np.ndarray,
        names: list[str],
        history: list[int],
        seen: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The served ``scores [n]`` and each component's share ``parts [M, n]`` (``names``) merged with
        the side scorer: ``[n + A]`` scores, their shares and the shares' names (:meth:`merge_many`'s
        one-user case)."""
        merged, shares, out_names = self.merge_many(
            scores[None], parts[:, None], names, [history], seen[None]
        )
        return merged[0], shares[:, 0], out_names

    def merge_many(
        self,
        scores: np.ndarray,
        parts: np.ndarray,
        names: list[str],
        histories: list[list[int]],
        seen: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """A batch at once (the scoring worker merges each batch it ran: one pass of array work for all
        its users, not one per request): ``scores [B, n]``, ``parts [M, B, n]``, ``seen`` bool
        ``[B, >= n + A]`` -> ``[B, n + A]`` scores, ``[M', B, n + A]`` shares and their names.

        What the side scorer adds to an item's score is the content-aware part's: it joins the
        ``content`` component's share when ``content`` is fused (its vocabulary is the side scorer's),
        else it is a share of its own, :data:`NEW_ITEMS`. Either way the shares still add up to the score.
        ``histories``: each user's positives over the catalogue and the added items, oldest first (the
        profile); ``seen``: everything each user has an event for.
        """
        added = self.refresh()
        if not added.records and not self.side.calibration.active:
            return scores, parts, list(names)  # nothing to place or promote: the merge would change nothing
        size = self.n_items + len(added.records)
        b = len(histories)
        hist = Histories.from_lists(histories, size)
        wide = np.zeros((b, size), dtype=bool)
        wide[:, : min(size, seen.shape[1])] = seen[:, :size]
        merged = self.side.merge(scores, wide, hist, added.vectors, added.exposure)
        base = np.zeros((b, size), dtype=np.float32)
        base[:, : self.n_items] = scores
        own = CONTENT not in names
        out_names = [*names, NEW_ITEMS] if own else list(names)
        out_parts = np.zeros((len(out_names), b, size), dtype=np.float32)
        out_parts[: len(names), :, : self.n_items] = parts
        out_parts[-1 if own else names.index(CONTENT)] += merged - base
        return merged, out_parts, out_names

    def explanation(self, index: int, history: list[int], seen: np.ndarray) -> dict[str, Any]:
        """What ``/explain`` says of an item the side scorer handles (``new_item``): added or cold, its
        content similarity to the history, and how it is scored."""
        added = self.refresh()
        size = self.n_items + len(added.records)
        hist = Histories.from_lists([history], size)
        profile = self.side.profiles(hist, added.vectors)[0] if history else None
        vector = self.side.vectors[index] if index < self.n_items else added.vectors[index - self.n_items]
        similarity = float(profile @ vector) if profile is not None else None
        if index >= self.n_items:
            return {"added": True, "trained": False, "similarity": similarity, "reason": ADDED_REASON}
        return {"added": False, "trained": True, "similarity": similarity, "reason": COLD_REASON}

    def is_candidate(self, index: int) -> bool:
        return index >= self.n_items or bool(self.side.cold[index])


def genres_text(genres: tuple[str, ...]) -> list[str]:
    return sorted({g.strip().lower() for g in genres if g.strip()})


def items_table(
    store: Path, out: Path, merge: Path | None = None, separator: str = ","
) -> tuple[int, int, int]:
    """Write the store's added items as an items table to ``out`` (.parquet or .csv), after the rows of
    ``merge`` when given (an added item whose id is there already is left out: the file's row wins).

    Returns (rows written, added items among them, rows of ``merge``). Why a file: a csv or parquet data
    source reads its items from ``data.files.items``, so the next retrain's catalogue gains the added
    items with their metadata, and their ids stay the ones the service's events name.
    """
    if not Path(store).exists():
        raise FileNotFoundError(f"event store {store} does not exist (the service creates it on start)")
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"output {out}: use a .parquet or .csv file name")
    if suffix == ".csv" and len(separator) != 1:
        raise ValueError(f"the CSV separator must be one character, got {separator!r}")
    db = SQLiteEventStore(store)
    try:
        added = records_frame(db.items())
    finally:
        db.close()
    base = pd.DataFrame(columns=list(added.columns))
    if merge is not None:
        if not merge.exists():
            raise FileNotFoundError(f"items file {merge} does not exist")
        if merge.suffix.lower() == ".parquet":
            base = pd.read_parquet(merge)
        else:
            base = pd.read_csv(merge, sep=separator, dtype=str, keep_default_na=False)
        if "item_id" not in base.columns:
            raise ValueError(f"items file {merge} has no item_id column (columns: {list(base.columns)})")
    known = set(base["item_id"].astype(str))
    fresh = added[~added["item_id"].isin(known)].copy()
    for column in fresh.columns:  # a table read as text (a CSV) gets the added rows as text too
        if column in base.columns and not pd.api.types.is_numeric_dtype(base[column].dtype):
            fresh[column] = ["" if pd.isna(v) else str(v) for v in fresh[column]]
    frame = pd.concat([base, fresh], ignore_index=True) if len(base) else fresh.reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        for column in frame.columns:
            if frame[column].dtype == object:
                frame[column] = frame[column].astype("string")
        frame.to_parquet(out, index=False)
    else:
        _write_plain_csv(frame, out, separator)
    return len(frame), len(fresh), len(base)


def _write_plain_csv(frame: pd.DataFrame, out: Path, separator: str) -> None:
    """A CSV the generic loader reads: no quoting, so a value may hold neither the separator nor a line
    break (such an item is refused, by id: write .parquet instead)."""
    lines = [separator.join(str(c) for c in frame.columns)]
    for row in frame.itertuples(index=False):
        values = ["" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v) for v in row]
        bad = [v for v in values if separator in v or "\n" in v or "\r" in v]
        if bad:
            raise ValueError(
                f"item {values[list(frame.columns).index('item_id')]!r} has a value holding the separator "
                f"{separator!r} or a line break, which a CSV data source cannot read: write a .parquet file"
            )
        lines.append(separator.join(values))
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
