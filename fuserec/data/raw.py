"""What a loader hands to validation: raw tables, untrusted, with where each row came from.

Loaders do not coerce or drop anything: a value that is not what it should be stays as it was read
(a string) so that validation can name the file, the line and the rule that it breaks. Lines that could
not even be split into fields are kept in ``malformed`` with their raw text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

TABLES = ("interactions", "items", "users")

# Canonical columns per table. Optional columns may be absent from a source.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "interactions": ("user_id", "item_id"),
    "items": ("item_id",),
    "users": ("user_id",),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "interactions": ("rating", "timestamp"),
    "items": ("title", "genres", "tags", "text", "year"),
    "users": ("age", "gender", "occupation", "zip"),
}
# Provenance columns every raw frame carries.
SOURCE_COL = "_source"  # file the row was read from (or "synthetic")
LINE_COL = "_line"  # 1-based line number in that file (data row number for Parquet)
MALFORMED_COLUMNS = ("table", SOURCE_COL, LINE_COL, "raw", "rule")


@dataclass
class RawSource:
    """Raw tables of one source. ``items``/``users`` are None when the source has no such table.

    Multi-valued attributes (genres, tags) are joined with ``|``. ``files`` maps table -> file path(s)
    read, for error messages and the validation report.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    malformed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(MALFORMED_COLUMNS)))
    files: dict[str, str] = field(default_factory=dict)

    def table(self, name: str) -> pd.DataFrame | None:
        return getattr(self, name)


def empty_malformed() -> pd.DataFrame:
    return pd.DataFrame(columns=list(MALFORMED_COLUMNS))
