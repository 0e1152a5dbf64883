"""Loaders for the GroupLens MovieLens releases: 100K, the ``::`` releases (1M, 10M) and "latest".

Every loader returns a :class:`~fuserec.data.raw.RawSource` of untouched strings: ids, ratings and
timestamps are not parsed here, so that validation can name the file and line of a bad value. Only the
columns that have to be *derived* from the file layout are computed (``genres`` from 100K's flag
columns, ``year`` from a date or title, ``tags`` aggregated from a tags file); they are strings too.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from fuserec.data.delimited import read_delimited
from fuserec.data.raw import LINE_COL, MALFORMED_COLUMNS, SOURCE_COL, RawSource, empty_malformed

# Genre flag columns of ML-100K's u.item, in u.genre order. "unknown" flags a movie whose genre
# GroupLens did not know: it is not a genre, so it is left out of ``genres`` (such a movie gets "",
# the same as "(no genres listed)" in the newer releases).
GENRES_100K = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
NO_GENRES = "(no genres listed)"
INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
USER_COLUMNS = ["user_id", "age", "gender", "occupation", "zip"]
# A trailing "(1995)" (or "(2006-2007)", as some newer titles have) in a title is the release year.
_TITLE_YEAR = r"\((\d{4})(?:\s*[-–]\s*\d{0,4})?\)\s*$"


def load_movielens_100k(path: str | Path) -> RawSource:
    """Read ML-100K's u.data, u.item and u.user as strings (u.item is latin-1).

    ``items`` gets ``item_id, title, genres, year, url``: ``genres`` joins with ``|`` the names of the
    flags that are exactly "1" (without "unknown", see ``GENRES_100K``) and ``year`` is the year of the
    release date ("01-Jan-1995" -> "1995", "" when there is none). A flag that is neither "0" nor "1" is
    not a genre; the flags themselves are not kept.
    """
    path = Path(path)
    interactions, bad_i = read_delimited(path / "u.data", "\t", INTERACTION_COLUMNS, "interactions")
    flags = [f"genre_{i}" for i in range(len(GENRES_100K))]
    columns = ["item_id", "title", "release_date", "video_release_date", "url", *flags]
    raw_items, bad_m = read_delimited(path / "u.item", "|", columns, "items", encoding="latin-1")
    users, bad_u = read_delimited(path / "u.user", "|", USER_COLUMNS, "users", encoding="latin-1")

    is_set = raw_items[flags[1:]].apply(lambda col: col.str.strip() == "1").to_numpy(dtype=bool)
    items = raw_items[["item_id", "title"]].copy()
    items["genres"] = _join_flags(is_set, GENRES_100K[1:])
    items["year"] = _strings(raw_items["release_date"].str.extract(r"(\d{4})\s*$", expand=False))
    items["url"] = raw_items["url"]
    items[[SOURCE_COL, LINE_COL]] = raw_items[[SOURCE_COL, LINE_COL]]
    return RawSource(
        interactions=interactions,
        items=items,
        users=users,
        malformed=_concat_malformed(bad_i, bad_m, bad_u),
        files={
            "interactions": str(path / "u.data"),
            "items": str(path / "u.item"),
            "users": str(path / "u.user"),
        },
    )


def load_movielens_dat(path: str | Path) -> RawSource:
    """Read the ``::``-separated ML-1M / ML-10M files as strings.

    ratings.dat and movies.dat are required; users.dat (1M only) and tags.dat (10M only) are optional:
    without them ``users`` is None / ``items`` has no ``tags`` column. ML-1M keeps its occupation codes
    and age-group codes as given. Encodings differ between releases (1M is latin-1, 10M utf-8), so each
    text file's encoding is detected (see ``_encoding``). ``files`` also maps ``tags`` to tags.dat when
    it was read; malformed tag lines are reported under table ``items``.
    """
    path = Path(path)
    ratings_file = path / "ratings.dat"
    # Ratings are ASCII digits: latin-1 decodes any byte, so nothing is lost whatever the release.
    interactions, bad_i = read_delimited(
        ratings_file, "::", INTERACTION_COLUMNS, "interactions", encoding="latin-1"
    )
    movies_file = path / "movies.dat"
    items, bad_m = read_delimited(
        movies_file, "::", ["item_id", "title", "genres"], "items", encoding=_encoding(movies_file)
    )
    items = _movie_columns(items)
    malformed = [bad_i, bad_m]
    files = {"interactions": str(ratings_file), "items": str(movies_file)}

    users = None
    users_file = path / "users.dat"
    if users_file.is_file():
        users, bad_u = read_delimited(
            users_file,
            "::",
            ["user_id", "gender", "age", "occupation", "zip"],
            "users",
            encoding=_encoding(users_file),
        )
        users = users[[*USER_COLUMNS, SOURCE_COL, LINE_COL]]
        malformed.append(bad_u)
        files["users"] = str(users_file)

    tags_file = path / "tags.dat"
    if tags_file.is_file():
        tags, bad_t = read_delimited(
            tags_file,
            "::",
            ["user_id", "item_id", "tag", "timestamp"],
            "items",
            encoding=_encoding(tags_file),
        )
        items = _with_tags(items, tags)
        malformed.append(bad_t)
        files["tags"] = str(tags_file)

    return RawSource(interactions, items, users, _concat_malformed(*malformed), files)


def load_movielens_latest(path: str | Path) -> RawSource:
    """Read ml-latest / ml-latest-small (ratings.csv, movies.csv, optional tags.csv) as strings.

    ratings.csv never quotes, so it goes through ``read_delimited`` (malformed lines kept). movies.csv
    and tags.csv quote fields that hold commas ("American President, The (1995)"), so they are parsed
    with the csv module, which also yields the physical line number of every record and lets a record
    with the wrong number of fields go to ``malformed`` instead of failing the whole file.
    """
    path = Path(path)
    ratings_file = path / "ratings.csv"
    interactions, bad_i = read_delimited(
        ratings_file, ",", ["userId", "movieId", "rating", "timestamp"], "interactions", header=True
    )
    interactions = interactions.rename(columns={"userId": "user_id", "movieId": "item_id"})
    movies_file = path / "movies.csv"
    items, bad_m = read_quoted_csv(movies_file, ["movieId", "title", "genres"], "items")
    items = _movie_columns(items.rename(columns={"movieId": "item_id"}))
    malformed = [bad_i, bad_m]
    files = {"interactions": str(ratings_file), "items": str(movies_file)}

    tags_file = path / "tags.csv"
    if tags_file.is_file():
        tags, bad_t = read_quoted_csv(tags_file, ["userId", "movieId", "tag", "timestamp"], "items")
        items = _with_tags(items, tags.rename(columns={"movieId": "item_id"}))
        malformed.append(bad_t)
        files["tags"] = str(tags_file)

    return RawSource(interactions, items, None, _concat_malformed(*malformed), files)


def read_quoted_csv(
    path: str | Path, columns: list[str], table: str, *, encoding: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Like ``read_delimited(path, ",", columns, table, header=True)`` but honouring CSV quoting.

    Why not ``pandas.read_csv``: it cannot report the line number of a row nor keep a row with the
    wrong field count aside. ``_line`` is the physical line on which a record starts (a quoted field
    may span lines); ``raw`` of a malformed record is its text. The encoding defaults to a detected one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{table} file not found: {path}. Check data.path in params.yaml.")
    text = path.read_bytes().decode(encoding or _encoding(path), errors="replace")
    # Physical lines as the csv module counts them (\n, \r, \r\n; not str.splitlines' \u2028 etc.).
    physical = [line.rstrip("\r\n") for line in io.StringIO(text, newline="")]
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return _empty_frame(columns), empty_malformed()
    names = [c.strip() for c in header]
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(
            f"{path}: header {names} lacks column(s) {missing} (rule: missing_column); "
            f"map the file's columns to these names in params.yaml under data.columns"
        )
    rows: list[list[str]] = []
    lines: list[int] = []
    bad_lines: list[int] = []
    bad_raw: list[str] = []
    end = reader.line_num
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line
            if len(record) == len(names):
                rows.append(record)
                lines.append(start)
            else:
                bad_lines.append(start)
                bad_raw.append("\n".join(physical[start - 1 : end]))
    except csv.Error as err:  # e.g. an unterminated quote swallowing the rest of the file
        start = end + 1
        bad_lines.append(start)
        bad_raw.append(f"{chr(10).join(physical[start - 1 : start + 4])} ({err})")
    frame = pd.DataFrame(rows, columns=names, dtype=object)[columns] if rows else _empty_frame(columns)
    frame = frame.reset_index(drop=True)
    frame[SOURCE_COL] = str(path)
    frame[LINE_COL] = np.asarray(lines, dtype=np.int64)
    bad = pd.DataFrame(
        {
            "table": table,
            SOURCE_COL: str(path),
            LINE_COL: np.asarray(bad_lines, dtype=np.int64),
            "raw": pd.Series(bad_raw, dtype=object),
            "rule": f"malformed_line: expected {len(names)} comma-separated fields",
        },
        columns=list(MALFORMED_COLUMNS),
    )
    return frame, bad


def _encoding(path: Path) -> str:
    """utf-8 if the file decodes as utf-8, else latin-1 (ML-1M); latin-1 text is almost never valid utf-8."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    except FileNotFoundError:
        return "utf-8"  # let the reader raise its own message naming the file
    return "utf-8"


def _movie_columns(items: pd.DataFrame) -> pd.DataFrame:
    """``item_id, title, genres, year`` from a movies table whose title ends in "(1995)"."""
    out = items[["item_id", "title"]].copy()
    genres = items["genres"].str.strip()
    out["genres"] = genres.where(genres != NO_GENRES, "").astype(object)
    out["year"] = _strings(items["title"].str.extract(_TITLE_YEAR, expand=False))
    out[[SOURCE_COL, LINE_COL]] = items[[SOURCE_COL, LINE_COL]]
    return out


def _with_tags(items: pd.DataFrame, tags: pd.DataFrame) -> pd.DataFrame:
    """Add ``tags``: each item's distinct tags, lower-cased, sorted, ``|``-joined ("" when none).

    A ``|`` inside a tag would read as a separator, so it becomes a space. Tags of items missing from
    the movies file have no row to go to and are not kept.
    """
    tag = tags["tag"].str.replace("|", " ", regex=False).str.strip().str.lower()
    pairs = pd.DataFrame({"item_id": tags["item_id"].str.strip(), "tag": tag}, dtype=object)
    pairs = pairs[pairs["tag"] != ""].drop_duplicates().sort_values(["item_id", "tag"])
    joined = pairs.groupby("item_id", sort=False)["tag"].agg("|".join)
    out = items.copy()
    tags_column = _strings(out["item_id"].str.strip().map(joined))
    out.insert(out.columns.get_loc("year") + 1, "tags", tags_column)
    return out


def _join_flags(is_set: np.ndarray, names: tuple[str, ...]) -> pd.Series:
    """Rows of a boolean flag matrix -> ``|``-joined names; each distinct flag pattern is joined once."""
    if is_set.shape[0] == 0:
        return pd.Series([], dtype=object)
    codes, inverse = np.unique(is_set, axis=0, return_inverse=True)
    labels = np.array(
        ["|".join(n for n, on in zip(names, row, strict=True) if on) for row in codes], dtype=object
    )
    return pd.Series(labels[inverse.reshape(-1)], dtype=object)


def _strings(values: pd.Series) -> pd.Series:
    """Missing -> "" and object dtype, so derived columns look like the read ones."""
    return values.fillna("").astype(object)


def _empty_frame(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in [*columns, SOURCE_COL, LINE_COL]})


def _concat_malformed(*frames: pd.DataFrame) -> pd.DataFrame:
    parts = [f for f in frames if len(f)]
    if not parts:
        return empty_malformed()
    return pd.concat(parts, ignore_index=True)
