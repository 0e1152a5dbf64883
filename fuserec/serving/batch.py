"""Offline top-k for many users at once: the same model, histories and ranking as ``POST /recommend``.

Batch jobs (e-mails, caches, offline evaluation) must not disagree with the live service, so this module
reuses the service's rules rather than the training code: histories from the same event store (or from
the training split, which is what the service imports on first start), the latest ``max_history`` items,
the one exported ONNX graph under :class:`OnnxRecommender`, every item the user has an event for excluded
(low ratings and positives older than the history window too), ties to the lower index, and the side
scorer's catalogue items without training interactions merged in as ``/recommend`` merges them
(:mod:`fuserec.cold_items`). Items added to the service after the export (``POST /items``) are the
service's alone: a batch run neither lists them nor reads them in a history.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuserec.cold_items import ColdItems
from fuserec.histories import PAD, Histories
from fuserec.layout import CATALOG_FILE, MODEL_FILE, RATINGS_FILE, Layout
from fuserec.manifest import read_json
from fuserec.onnx_model import OnnxRecommender
from fuserec.serving.coldstart import ColdStart, genre_sets
from fuserec.serving.store import SQLiteEventStore

OUTPUT_COLUMNS = ["user_id", "rank", "item_id", "title", "score"]
OUTPUT_TYPES = ("string", "int64", "string", "string", "float64")  # Arrow types of the Parquet output
OUTPUT_SUFFIXES = (".parquet", ".csv")
EXAMPLES = 5  # unknown user ids quoted in the summary


@dataclass(frozen=True)
class UserHistories:
    """Each requested user's served history (item indices, oldest first) and latest event time."""

    user_ids: list[str]
    items: list[list[int]]
    last_time: np.ndarray  # int64 [n_users]
    unknown: list[str]  # ids the history source has never seen (scored from an empty history)
    source: str
    seen: list[list[int]]  # every item each user has an event for: never recommended to them


@dataclass(frozen=True)
class BatchSummary:
    """What a batch run did: enough for the CLI to report, and for callers to check."""

    out: Path
    users: int
    rows: int
    empty_histories: int
    unknown: int
    unknown_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    source: str = ""


def read_user_ids(path: str | Path) -> tuple[list[str], int]:
    """Raw user ids from a .txt (one per line), .csv or .parquet (column ``user_id``) file.

    Ids are kept as strings (a CSV id ``007`` stays ``007``), blanks are dropped and repeats are kept once,
    in first-seen order; returns the ids and how many repeats were dropped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise FileNotFoundError(f"users file {path} does not exist")
    if suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix in (".txt", ""):
        frame = pd.DataFrame({"user_id": path.read_text().splitlines()})
    else:
        raise ValueError(f"users file {path}: use .txt (one id per line), .csv or .parquet (column user_id)")
    if "user_id" not in frame.columns:
        raise ValueError(f"users file {path} has no user_id column (columns: {list(frame.columns)})")
    raw = [str(x).strip() for x in frame["user_id"].tolist() if x is not None and not pd.isna(x)]
    ids = [x for x in raw if x]
    unique = list(dict.fromkeys(ids))
    return unique, len(ids) - len(unique)


def catalog_titles(catalog: pd.DataFrame) -> np.ndarray:
    """Each item's title as text, ``""`` when missing: what ``/recommend`` and batch rows both show."""
    if "title" not in catalog:
        return np.full(len(catalog), "", dtype=object)
    return catalog["title"].fillna("").astype(str).to_numpy()


def indexed_history(
    store: SQLiteEventStore,
    user_id: str,
    index: dict[str, int],
    max_history: int,
    min_rating: float | None,
    now: int,
) -> tuple[list[int], int, bool]:
    """One user's latest positive events by ``now`` as catalogue indices (items not in it dropped), the time
    of the latest (``now`` if none), and whether the store had any; the one reading the service and batch
    share."""
    events = store.history(user_id, max_history, min_rating, until=now)
    items = [index[i] for i, _ in events if i in index]
    return items, max((ts for _, ts in events), default=now), bool(events)


def indexed_seen(
    store: SQLiteEventStore, user_id: str, index: dict[str, int], now: int | None = None
) -> list[int]:
    """Catalogue indices of every item the user has an event for by ``now``: what is never listed."""
    return [index[i] for i in store.seen(user_id, until=now) if i in index]


def training_events(layout: Layout) -> pd.DataFrame:
    """``user, item, timestamp, rating, positive`` rows the service imports on first start, in import order.

    The training split's positives in file order, then each user's ratings below the implicit threshold
    dated before their first test positive (all of them for a user without one): the same side
    information the protocol lets a model read, so the store knows a user already rated those films.
    The test period stays out, as its positives do. A run without ``clean/ratings.parquet`` gives the
    positives alone; one without a test split (a served folder promoted before it kept one), every low rating.
    """
    train = pd.read_parquet(layout.split_file("train"))
    columns = ["user", "item", "timestamp", "rating", "positive"]
    train = train.assign(rating=train.get("rating", np.nan), positive=True)[columns]
    ratings_file = layout.clean / RATINGS_FILE
    if not ratings_file.exists():
        return train.reset_index(drop=True)
    ratings = pd.read_parquet(ratings_file)
    low = ratings[~ratings["positive"].to_numpy(bool)] if "positive" in ratings else ratings.iloc[:0]
    test_file = layout.split_file("test")
    test = pd.read_parquet(test_file, columns=["user", "timestamp"]) if test_file.exists() else None
    first_test = pd.Series(dtype=np.float64) if test is None else test.groupby("user")["timestamp"].min()
    cutoff = first_test.reindex(low["user"]).to_numpy(np.float64)
    before = np.isnan(cutoff) | (low["timestamp"].to_numpy(np.float64) < cutoff)
    return pd.concat([train, low.loc[before, columns].assign(positive=False)], ignore_index=True)


def store_histories(
    store: SQLiteEventStore,
    user_ids: Sequence[str],
    index: dict[str, int],
    max_history: int,
    now: int,
    min_rating: float | None = None,
) -> UserHistories:
    """Histories exactly as :meth:`Service.recommend` reads them: latest events, unknown items dropped."""
    items: list[list[int]] = []
    last = np.full(len(user_ids), now, dtype=np.int64)
    unknown: list[str] = []
    seen: list[list[int]] = []
    for row, user in enumerate(user_ids):
        history, last[row], found = indexed_history(store, user, index, max_history, min_rating, now)
        if not found:
            unknown.append(user)
        items.append(history)
        seen.append(indexed_seen(store, user, index, now))
    return UserHistories(list(user_ids), items, last, unknown, f"event store {store.path}", seen)


def training_histories(layout: Layout, user_ids: Sequence[str], max_history: int, now: int) -> UserHistories:
    """Histories from what the service's first-start import stores (:func:`training_events`), in its order.

    The store orders a user's events by (timestamp, insertion order) and the import inserts the rows in
    file order, so a stable sort on (user, timestamp) of the positives reproduces the service's history;
    every imported row, positive or not, is seen.
    """
    train_file = layout.split_file("train")
    users_file = layout.clean / "users.parquet"
    for needed in (train_file, users_file):
        if not needed.exists():
            raise FileNotFoundError(
                f"{needed} is missing: pass --store with the service's event store, or run the pipeline"
            )
    events = training_events(layout)
    train = events[events["positive"].to_numpy(bool)]
    users = pd.read_parquet(users_file, columns=["user", "user_id"])
    row_of = dict(zip(users["user_id"].astype(str), users["user"].astype(np.int64), strict=True))
    seen_of = events.groupby("user", sort=False)["item"].unique()
    user_col = train["user"].to_numpy(np.int64)
    ts_col = train["timestamp"].to_numpy(np.int64)
    order = np.lexsort((np.arange(len(train)), ts_col, user_col))
    sorted_users, sorted_items, sorted_ts = (
        user_col[order],
        train["item"].to_numpy(np.int64)[order],
        ts_col[order],
    )
    starts = np.searchsorted(sorted_users, np.arange(len(users)), side="left")
    ends = np.searchsorted(sorted_users, np.arange(len(users)), side="right")
    items: list[list[int]] = []
    last = np.full(len(user_ids), now, dtype=np.int64)
    unknown: list[str] = []
    seen: list[list[int]] = []
    for row, user_id in enumerate(user_ids):
        user = row_of.get(user_id)
        if user is None or not 0 <= user < len(users):
            unknown.append(user_id)
            items.append([])
            seen.append([])
            continue
        lo, hi = int(starts[user]), int(ends[user])
        items.append(sorted_items[max(lo, hi - max_history) : hi].tolist())
        seen.append([int(i) for i in seen_of.get(user, [])])
        if hi > lo:
            last[row] = int(sorted_ts[hi - 1])
    return UserHistories(list(user_ids), items, last, unknown, f"training split {train_file}", seen)


def pad(histories: Sequence[Sequence[int]]) -> np.ndarray:
    """``int64 [B, L]`` right-padded with -1, L >= 1 (an empty history is ``[-1]``, as the service sends)."""
    width = max(1, max((len(h) for h in histories), default=0))
    out = np.full((len(histories), width), PAD, dtype=np.int64)
    for row, items in enumerate(histories):
        out[row, : len(items)] = items
    return out


def rank_unseen(scores: np.ndarray, seen: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` unseen item indices per row, ties to the lower index (the service's ``lexsort`` rule).

    Returns ``[B, k]`` indices and a ``[B, k]`` validity mask (a row with fewer than k unseen items).
    """
    n = scores.shape[1]
    k = min(k, n)
    index = np.broadcast_to(np.arange(n), scores.shape)
    order = np.lexsort((index, -scores, seen), axis=-1)[:, :k]  # last key first: unseen, score, index
    valid = ~np.take_along_axis(seen, order, axis=1)
    return order, valid


def score_batches(
    model: OnnxRecommender,
    histories: UserHistories,
    n_items: int,
    k: int,
    batch_size: int,
    cold: ColdStart | None = None,
    side: ColdItems | None = None,
) -> Iterator[tuple[int, pd.DataFrame]]:
    """Score ``batch_size`` users at a time; yields (users done, their rows) so callers can show progress.

    With ``cold``, users with an empty history get its cold-start scores, as ``POST /recommend`` does;
    with ``side``, the others get the side scorer's merge of items without training interactions.
    """
    for start in range(0, len(histories.user_ids), batch_size):
        stop = min(start + batch_size, len(histories.user_ids))
        batch = histories.items[start:stop]
        padded = pad(batch)
        scores = model.run(padded, histories.last_time[start:stop])[0].astype(np.float64)
        if scores.shape[1] != n_items:
            raise RuntimeError(
                f"model returned {scores.shape[1]} scores per user; the manifest says {n_items}"
            )
        if cold is not None:
            for row, items in enumerate(batch):
                if not items:
                    scores[row] = cold.scores(histories.user_ids[start + row]).scores
        blocked = [[*h, *s] for h, s in zip(batch, histories.seen[start:stop], strict=True)]
        seen = np.zeros(scores.shape, dtype=bool)
        rows = np.repeat(np.arange(len(batch)), [len(b) for b in blocked])
        seen[rows, np.concatenate([np.asarray(b, dtype=np.int64) for b in blocked])] = True
        warm = np.flatnonzero([len(items) > 0 for items in batch])
        if side is not None and len(warm):  # as /recommend: the graph's users get the side scorer's merge
            profiles = Histories.from_lists([batch[i] for i in warm], n_items)
            merged = side.merge(scores[warm].astype(np.float32), seen[warm], profiles)
            scores[warm] = merged[:, :n_items]
        top, valid = rank_unseen(scores, seen, k)
        user_rows, ranks = np.nonzero(valid)
        top_items = top[user_rows, ranks]
        frame = pd.DataFrame(
            {
                "user": user_rows + start,
                "rank": ranks.astype(np.int64) + 1,
                "item": top_items,
                "score": scores[user_rows, top_items],
            }
        )
        yield stop - start, frame


class RowWriter:
    """Writes result rows batch by batch (Parquet row groups, or CSV appends), so memory does not grow
    with the number of users; the file appears under its name only once complete (a temporary file is
    renamed), so a crashed job never leaves a truncated result for the next step to read."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.partial = out.with_name(f".{out.name}.partial")
        self.csv = out.suffix.lower() == ".csv"
        self._parquet: Any = None

    def __enter__(self) -> RowWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.partial.unlink(missing_ok=True)
        if self.csv:
            pd.DataFrame(columns=OUTPUT_COLUMNS).to_csv(self.partial, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema(
                [(c, pa.type_for_alias(t)) for c, t in zip(OUTPUT_COLUMNS, OUTPUT_TYPES, strict=True)]
            )
            self._parquet = pq.ParquetWriter(self.partial, schema)
        return self

    def write(self, frame: pd.DataFrame) -> None:
        if self.csv:
            frame.to_csv(self.partial, mode="a", header=False, index=False)
            return
        import pyarrow as pa

        self._parquet.write_table(
            pa.Table.from_pandas(frame, schema=self._parquet.schema, preserve_index=False)
        )

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if exc_type is None:
            self.partial.replace(self.out)
        else:
            self.partial.unlink(missing_ok=True)


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over users scored (``advance(n)``), or a no-op when ``enabled`` is false."""
    if not enabled:
        yield lambda _n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("scoring users"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("score", total=total)
        yield lambda n: bar.advance(task, n)


def recommend_batch(
    outputs: str | Path,
    users: str | Path,
    out: str | Path,
    k: int = 10,
    batch_size: int = 256,
    store: str | Path | None = None,
    providers: list[str] | None = None,
    now: int | None = None,
    progress: bool = True,
    pseudonym: Callable[[str], str] | None = None,
) -> BatchSummary:
    """Write top-``k`` rows (user_id, rank, item_id, title, score) for every user id in ``users`` to ``out``.

    Users without history get the service's cold-start scores (attributes from the users table, else
    popularity); unknown users are counted, never an error. ``pseudonym`` maps a listed id to the id the
    run stores (pseudonymised runs); the rows name the ids as listed.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch size must be at least 1 (got k={k}, batch size={batch_size})")
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {out}: use a .parquet or .csv file name")
    layout = Layout(Path(outputs))
    manifest = read_json(layout.export / "manifest.json")
    model = OnnxRecommender(
        layout.export / MODEL_FILE,
        providers or manifest["providers"],
        prepack=manifest.get("prepack", False),
    )
    catalog = pd.read_parquet(layout.export / CATALOG_FILE)
    item_ids = catalog["item_id"].astype(str).to_numpy()
    titles = catalog_titles(catalog)
    max_history = int(manifest["max_history"])
    listed, duplicates = read_user_ids(users)
    user_ids = [pseudonym(u) for u in listed] if pseudonym is not None else listed
    now = int(time.time()) if now is None else int(now)
    if store is not None:
        if not Path(store).exists():
            raise FileNotFoundError(f"event store {store} does not exist (the service creates it on start)")
        db = SQLiteEventStore(store)
        try:
            index = {item: i for i, item in enumerate(item_ids)}
            threshold = manifest.get("implicit_threshold")
            histories = store_histories(db, user_ids, index, max_history, now, threshold)
        finally:
            db.close()
    else:
        histories = training_histories(layout, user_ids, max_history, now)

    rows = 0
    with _progress(len(user_ids), progress) as advance, RowWriter(out) as writer:
        cold = ColdStart(layout, len(item_ids), genre_sets(catalog))
        entry = manifest.get("cold_items")
        side = ColdItems.load(layout.export, entry) if entry else None
        user_array = np.asarray(listed, dtype=object)
        for done, frame in score_batches(model, histories, len(item_ids), k, batch_size, cold, side):
            at_user, at_item = frame["user"].to_numpy(np.int64), frame["item"].to_numpy(np.int64)
            writer.write(
                pd.DataFrame(
                    {
                        "user_id": user_array[at_user],
                        "rank": frame["rank"].to_numpy(np.int64),
                        "item_id": item_ids[at_item],
                        "title": titles[at_item],
                        "score": frame["score"].to_numpy(np.float64),
                    },
                    columns=OUTPUT_COLUMNS,
                )
            )
            rows += len(frame)
            advance(done)
    return BatchSummary(
        out=out,
        users=len(user_ids),
        rows=rows,
        empty_histories=sum(1 for h in histories.items if not h),
        unknown=len(histories.unknown),
        unknown_examples=[listed[user_ids.index(u)] for u in histories.unknown[:EXAMPLES]],
        duplicates=duplicates,
        source=histories.source,
    )
