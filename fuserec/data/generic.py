"""Loader for a generic CSV or Parquet source: files and column names come from ``params.yaml``.

``data.files`` names the interactions file (and optional items / users files) relative to ``data.path``;
``data.columns`` maps the canonical interaction columns to the file's names, ``data.files.item_columns``
and ``data.files.user_columns`` do the same for items and users (canonical -> source name).

Nothing is coerced: CSV values stay strings (``read_delimited``: no quoting, so a field may not contain
the separator; a line with the wrong number of fields goes to ``malformed``), Parquet values keep the
types they were written with. Validation names the file, line and rule of every bad value.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import pandas as pd

from fuserec.config import DataConfig, GenericFiles
from fuserec.data.delimited import read_delimited, split_lines
from fuserec.data.raw import (
    LINE_COL,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SOURCE_COL,
    RawSource,
    empty_malformed,
)

FORMATS = ("csv", "parquet")


def load_generic(path: str | Path, data_cfg: DataConfig) -> RawSource:
    """Read the files of a ``data.source: csv`` / ``parquet`` source under the folder ``path``.

    Interactions keep ``user_id, item_id`` and ``rating`` / ``timestamp`` when the file has them; items
    and users keep every column of their file (mapped ones under their canonical names). ``_line`` is the
    line number in a CSV file (the header is line 1) and the 1-based row number in a Parquet file.

    Raises FileNotFoundError naming a missing file, and ValueError (rule ``missing_column``) naming the
    file, the missing column(s), the columns found and the params.yaml key that maps them. An optional
    interaction column (rating, timestamp) that is absent is only an error when ``data.columns`` names
    it explicitly. An empty file is not an error here: validation reports it (rule ``empty_file``).
    """
    fmt = data_cfg.source
    if fmt not in FORMATS:
        raise ValueError(f"load_generic reads data.source 'csv' or 'parquet', not {fmt!r}")
    folder = Path(path).expanduser()
    files = data_cfg.files
    columns = data_cfg.columns

    # Interactions: canonical -> source name, from data.columns (an unset optional column may be absent).
    explicit = columns.model_fields_set
    mapping = {"user_id": columns.user_id, "item_id": columns.item_id}
    optional: dict[str, str] = {}
    for name in ("rating", "timestamp"):
        source_name = getattr(columns, name)
        if source_name is None:
            continue
        if name in explicit:
            mapping[name] = source_name
        else:
            optional[name] = source_name
    interactions = _read_table(
        folder,
        files.interactions,
        fmt,
        files.separator,
        "interactions",
        mapping,
        optional,
        keep_extra=False,
        key="data.columns",
    )
    tables = {"interactions": interactions}
    for table, file_name, cmap, key in (
        ("items", files.items, files.item_columns, "data.files.item_columns"),
        ("users", files.users, files.user_columns, "data.files.user_columns"),
    ):
        if file_name is None:
            continue
        required = {c: cmap.get(c, c) for c in REQUIRED_COLUMNS[table]}
        mapped = {c: s for c, s in cmap.items() if c not in required}
        defaults = {c: c for c in OPTIONAL_COLUMNS[table] if c not in cmap}
        tables[table] = _read_table(
            folder,
            file_name,
            fmt,
            files.separator,
            table,
            {**required, **mapped},
            defaults,
            keep_extra=True,
            key=key,
        )

    malformed = [m for _, m in tables.values() if len(m)]
    return RawSource(
        interactions=tables["interactions"][0],
        items=tables["items"][0] if "items" in tables else None,
        users=tables["users"][0] if "users" in tables else None,
        malformed=pd.concat(malformed, ignore_index=True) if malformed else empty_malformed(),
        files={t: str(folder / name) for t, name in _file_names(files).items()},
    )


def _file_names(files: GenericFiles) -> dict[str, str]:
    names = {"interactions": files.interactions}
    if files.items is not None:
        names["items"] = files.items
    if files.users is not None:
        names["users"] = files.users
    return names


def _read_table(
    folder: Path,
    file_name: str,
    fmt: str,
    sep: str,
    table: str,
    mapping: dict[str, str],
    optional: dict[str, str],
    *,
    keep_extra: bool,
    key: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One file -> (frame with canonical column names + provenance, malformed lines).

    ``mapping`` (canonical -> source) must all be present; ``optional`` ones are taken when present.
    With ``keep_extra`` every other column of the file is kept under its own name.
    """
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{table} file not found: {path} (data.path={str(folder)!r}, data.files.{table}={file_name!r}); "
            f"check these keys in params.yaml"
        )
    names = _parquet_columns(path) if fmt == "parquet" else _csv_header(path, sep)
    if names is None:  # a CSV file without even a header line: an empty table, validation reports it
        empty = {c: pd.Series(dtype=object) for c in [*mapping, SOURCE_COL, LINE_COL]}
        return pd.DataFrame(empty), empty_malformed()
    found = [n.lstrip("\ufeff") for n in names]  # a UTF-8 byte-order mark sticks to the first name
    duplicated = sorted({n for n in found if found.count(n) > 1})
    if duplicated:
        raise ValueError(f"{path}: column name(s) {duplicated} appear more than once in the header")
    missing = [c for c in mapping if mapping[c] not in found]
    if missing:
        raise ValueError(_missing_message(path, table, missing, mapping, found, key))

    if fmt == "parquet":
        import pyarrow.parquet as pq

        # Only the columns the table uses (a wide export can carry many others): less to read and hold.
        wanted = {*mapping.values(), *optional.values()}
        keep = [i for i, n in enumerate(found) if keep_extra or n in wanted]
        raw = pq.read_table(path, columns=[names[i] for i in keep]).to_pandas()
        raw.columns = [found[i] for i in keep]
        raw = raw.reset_index(drop=True)
        raw[SOURCE_COL] = str(path)
        raw[LINE_COL] = np.arange(1, len(raw) + 1, dtype=np.int64)
        malformed = empty_malformed()
    else:
        raw, malformed = read_delimited(path, sep, list(names), table, header=True)
        raw.columns = [*found, SOURCE_COL, LINE_COL]

    taken = {**mapping, **{c: s for c, s in optional.items() if s in found}}
    out = pd.DataFrame({c: raw[s] for c, s in taken.items()}, index=raw.index)
    if keep_extra:
        used = set(taken.values())
        for name in found:
            if name not in used and name not in out.columns:
                out[name] = raw[name]
    out[SOURCE_COL] = raw[SOURCE_COL].to_numpy()
    out[LINE_COL] = raw[LINE_COL].to_numpy(dtype=np.int64)
    return out, malformed


def _csv_header(path: Path, sep: str) -> list[str] | None:
    """The header's names exactly as ``read_delimited`` splits them; None when the file has no lines."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    lines = split_lines(head.decode("utf-8", errors="replace"))
    if not lines and not head:
        return None
    if not "".join(lines).strip():
        with open(path, "rb") as fh:  # the first 64 KiB are blank: is anything after them?
            if not fh.read().decode("utf-8", errors="replace").strip():
                return None
    return [c.strip() for c in (lines[0] if lines else "").split(sep)]


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as err:  # pyarrow's own errors do not name the file
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from err


def _missing_message(
    path: Path, table: str, missing: list[str], mapping: dict[str, str], found: list[str], key: str
) -> str:
    lines = [
        f"{path}: {table} column(s) {[mapping[c] for c in missing]} not found (rule: missing_column). "
        f"Columns found: {found}.",
        "Map the file's columns to the canonical names in params.yaml, e.g.:",
    ]
    parts = key.split(".")
    indent = ""
    for part in parts:
        lines.append(f"  {indent}{part}:")
        indent += "  "
    for canonical in missing:
        guess = difflib.get_close_matches(mapping[canonical], found, n=1, cutoff=0.5)
        if not guess:
            guess = [n for n in found if canonical.replace("_", "") in n.lower().replace("_", "")][:1]
        hint = guess[0] if guess else "<column name in the file>"
        lines.append(f"  {indent}{canonical}: {hint}")
    return "\n".join(lines)
