"""The served graph's ``user_features`` input, from what the service knows of a person.

Two-tower and kg read user attributes (age group, gender, occupation) when they are fitted and measured,
so the exported graph takes them as an optional input (:data:`fuserec.api.USER_FEATURES`). The export
records how they were encoded (the manifest's ``features_input``); here the same encoder turns a known
user's users-table row, or the ``attributes`` a request sends, into that input. Anyone else gets no row
(zeros in the graph), which scores exactly as a history-only graph does.

Request attributes replace the table's for that request (a person may state them afresh); an exact age is
put into the users table's age groups first, as the cold-start rules do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

from fuserec.features import AttributeEncoder
from fuserec.layout import Layout


class UserAttributes:
    """``user_features`` rows for known users and for request attributes; empty when the graph reads none."""

    def __init__(
        self,
        encoder: AttributeEncoder | None,
        columns: tuple[str, ...],
        rows: dict[str, np.ndarray],
        age_band: Callable[[float], str],
    ) -> None:
        self.encoder = encoder
        self.columns = columns
        self.rows = rows
        self.age_band = age_band
        self.numeric_age = encoder is not None and any(
            c.column == "age" and c.edges is not None for c in encoder.columns
        )

    @classmethod
    def load(
        cls,
        layout: Layout,
        manifest: dict[str, Any],
        columns: tuple[str, ...],
        age_band: Callable[[float], str],
    ) -> UserAttributes:
        """From the export's encoder and the run's users table (``clean/users.parquet``), when present."""
        spec = manifest.get("features_input")
        if not columns or not spec:
            return cls(None, (), {}, age_band)
        encoder = AttributeEncoder.from_json(spec["encoder"])
        rows: dict[str, np.ndarray] = {}
        users_file = layout.clean / "users.parquet"
        if users_file.exists():
            users = pd.read_parquet(users_file)
            table = encoder.table(users, columns)
            rows = {str(u): table[i] for i, u in enumerate(users["user_id"].astype(str))}
        return cls(encoder, columns, rows, age_band)

    @property
    def active(self) -> bool:
        return self.encoder is not None

    def row(
        self, user_id: str | None, age: int | None, gender: str | None, occupation: str | None
    ) -> np.ndarray | None:
        """The request's attributes if it sends any, else the known user's; None when neither is known."""
        if self.encoder is None:
            return None
        if age is not None or gender is not None or occupation is not None:
            values: dict[str, str] = {}
            if gender is not None:
                values["gender"] = gender
            if occupation is not None:
                values["occupation"] = occupation
            if age is not None:
                values["age"] = str(age) if self.numeric_age else self.age_band(float(age))
            return self.encoder.encode(values, self.columns)
        return self.rows.get(user_id) if user_id is not None else None

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop erased people's rows from memory (their table rows are erased on disk)."""
        for user_id in user_ids:
            self.rows.pop(str(user_id), None)
