"""Data minimisation: keep only the user attributes something reads, ages as groups, and train on recent
interactions only.

Which attributes are read is declared, not guessed: each algorithm plugin lists the users-table columns it
may use (``Algorithm.user_attributes``), the service's cold-start rule those in
``privacy.cold_start_attributes``; whatever none of them names, and whatever ``privacy.drop_user_columns``
names, never leaves validate. Exact ages are replaced by groups (``privacy.age_buckets``), which every
reader of ages needs no finer: the encoders band them anyway.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

USER_ID = "user_id"
USER_INDEX = "user"
AGE = "age"
SECONDS_PER_DAY = 86_400
_ASCII_NUMBER = r"[0-9]+(?:\.[0-9]*)?"
_LABEL = re.compile(r"^(?:<(?P<below>[0-9]+)|(?P<low>[0-9]+)(?:-(?P<high>[0-9]+)|\+))$")


# -- which attributes are kept ----------------------------------------------------------------------------
def declared_user_attributes(algorithms: Iterable[str]) -> dict[str, frozenset[str]]:
    """Per algorithm plugin, the user attributes it declares it reads (none when it declares nothing)."""
    from fuserec.registry import get_algorithm  # lazy: imports the named plugins only

    return {
        name: frozenset(getattr(get_algorithm(name), "user_attributes", frozenset())) for name in algorithms
    }


def kept_user_columns(
    algorithms: Iterable[str], cold_start: Iterable[str], drop: Iterable[str]
) -> frozenset[str]:
    """Attributes some plugin or the cold-start rule reads, less the ones never kept (case-insensitive)."""
    used = set(cold_start).union(*declared_user_attributes(algorithms).values())
    never = {d.lower() for d in drop}
    return frozenset(c for c in used if c.lower() not in never)


# -- ages as groups ---------------------------------------------------------------------------------------
def age_labels(edges: Sequence[int]) -> list[str]:
    """Group names for lower ``edges``: ``[18, 25, 56]`` -> ``<18``, ``18-24``, ``25-55``, ``56+``.

    Always a range, never a bare number, so a label is never mistaken for an exact age.
    """
    labels = [f"<{edges[0]}"]
    for low, high in itertools.pairwise(edges):
        labels.append(f"{low}-{high - 1}")
    labels.append(f"{edges[-1]}+")
    return labels


def age_group(age: float, edges: Sequence[int]) -> str:
    """The group label of one age."""
    return age_labels(edges)[int(np.searchsorted(np.asarray(edges), age, side="right"))]


def age_groups(values: pd.Series, edges: Sequence[int]) -> tuple[pd.Series, int]:
    """Each age as its group label (missing when missing or not a number) and how many were not numbers.

    Text is read as a number only when it is ASCII digits (as validate reads numbers).
    """
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        numbers = pd.to_numeric(values, errors="coerce").astype("float64")
        unparsed = 0
    else:
        text = values.astype("string").str.strip()
        numeric = text.str.fullmatch(_ASCII_NUMBER).fillna(False).astype(bool)
        numbers = pd.Series(np.nan, index=values.index, dtype="float64")
        numbers[numeric] = text[numeric].astype("float64")
        unparsed = int((text.notna() & (text != "") & ~numeric).sum())
    labels = np.asarray(age_labels(edges), dtype=object)
    known = numbers.notna().to_numpy()
    out = np.full(len(values), None, dtype=object)
    out[known] = labels[np.searchsorted(np.asarray(edges), numbers.to_numpy()[known], side="right")]
    return pd.Series(out, index=values.index, dtype=object), unparsed


def edges_from_labels(labels: Iterable[Any]) -> tuple[int, ...] | None:
    """Edges behind a column of group labels (``<18``, ``18-24``, ``56+``); None if any value is not such a
    label (e.g. exact ages).

    Both ends of a range count (``18-24``: 18 and 25), so an age banded with these edges gets exactly the
    label the column holds for its group, even when the groups around it are absent from the column.
    """
    edges: set[int] = set()
    for label in labels:
        if label is None or (not isinstance(label, str) and pd.isna(label)):
            continue
        match = _LABEL.match(str(label))
        if match is None:
            return None
        edges.add(int(match["below"] or match["low"]))
        if match["high"] is not None:
            edges.add(int(match["high"]) + 1)
    return tuple(sorted(edges)) or None


def minimise_users(
    users: pd.DataFrame, keep: Collection[str], age_buckets: Sequence[int] | None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The users table with only the ``keep`` attributes (ids always) and ages as groups; and a record
    of what was kept, dropped and grouped (column names and counts, no values)."""
    ids = [c for c in users.columns if c in (USER_ID, USER_INDEX)]
    kept = [c for c in users.columns if c not in ids and c in keep]
    dropped = [c for c in users.columns if c not in ids and c not in keep]
    out = users[[*ids, *kept]].copy()
    record: dict[str, Any] = {"user_columns_kept": kept, "user_columns_dropped": dropped}
    if AGE in out and age_buckets:
        out[AGE], unparsed = age_groups(out[AGE], age_buckets)
        record["age_groups"] = age_labels(age_buckets)
        record["ages_not_numbers"] = unparsed
    return out, record


# -- retention for training -------------------------------------------------------------------------------
def apply_retention(interactions: pd.DataFrame, days: float | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Drop interactions dated more than ``days`` before the newest one in ``interactions``.

    Measured from the data's newest timestamp, not from today, so rerunning the pipeline on the same data
    trains on the same rows. Returns the rows kept and the counts (nothing when ``days`` is None).
    """
    if days is None or len(interactions) == 0:
        return interactions, {}
    times = interactions["timestamp"].to_numpy(np.int64)
    newest = int(times.max())
    cutoff = newest - round(days * SECONDS_PER_DAY)
    keep = times >= cutoff
    return interactions[keep], {
        "retention_days": days,
        "retention_newest": newest,
        "retention_cutoff": cutoff,
        "retention_dropped": int((~keep).sum()),
    }
