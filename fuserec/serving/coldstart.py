"""Cold start: scores for a user with no usable history, shared by the service and the batch path.

The exported graph scores histories, so a user with none needs explicit rules, each named in the
response: onboarding genres (every matching item above every other, ordered by the prior), else
popularity among training users who share the user's attributes (gender, occupation, age band: summed
log counts), else plain training popularity. Any request filter applies on top.

An age band is the age group the users table stores (``privacy.age_buckets``: ``25-34``), or the decade
where the table holds exact ages; a request's exact age is banded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fuserec.layout import Layout
from fuserec.privacy.minimise import age_group, edges_from_labels

ATTRIBUTES = ("gender", "occupation", "age_band")
GENRE_BOOST = 1000.0


@dataclass(frozen=True)
class ColdScores:
    """Scores ``[n]``, their named parts ``[P, n]`` (they sum to the scores) and the rule that made them."""

    scores: np.ndarray
    parts: np.ndarray
    names: list[str]
    strategy: str


class ColdStart:
    """Priors from the training split and the users table of a finished run."""

    def __init__(self, layout: Layout, n_items: int, genres: list[frozenset[str]]) -> None:
        self.n_items = n_items
        self.genres = genres
        self.popularity = np.zeros(n_items)
        self.by_attribute: dict[tuple[str, str], np.ndarray] = {}
        self.user_attributes: dict[str, dict[str, str]] = {}
        self.age_edges: tuple[int, ...] | None = None  # the groups the users table stores ages as
        train_file, users_file = layout.split_file("train"), layout.clean / "users.parquet"
        if not (train_file.exists() and users_file.exists()):
            return
        train, users = pd.read_parquet(train_file), pd.read_parquet(users_file)
        self.popularity = np.bincount(train["item"], minlength=n_items).astype(np.float64)
        users = users.assign(user_id=users["user_id"].astype(str))
        if "age" in users:
            numeric = pd.api.types.is_numeric_dtype(users["age"].dtype)
            self.age_edges = None if numeric else edges_from_labels(users["age"].tolist())
            if self.age_edges is not None:
                users["age_band"] = users["age"]
            else:
                users["age_band"] = (pd.to_numeric(users["age"], errors="coerce") // 10 * 10).astype("Int64")
        present = [a for a in ATTRIBUTES if a in users]
        for row in users[["user_id", *present]].itertuples(index=False):
            values = {a: str(getattr(row, a)) for a in present if not pd.isna(getattr(row, a))}
            self.user_attributes[str(row.user_id)] = values
        frame = train.merge(users[["user", *present]], on="user")
        for attribute in present:
            for value, group in frame.groupby(attribute):
                counts = np.bincount(group["item"], minlength=n_items).astype(np.float64)
                self.by_attribute[(attribute, str(value))] = counts

    def age_band(self, age: float) -> str:
        """An exact age in the users table's terms: its stored group, else its decade (``"30"``)."""
        if self.age_edges is not None:
            return age_group(age, self.age_edges)
        return str(int(age // 10 * 10))

    def genre_mask(self, wanted: list[str]) -> np.ndarray:
        """Items with at least one of ``wanted`` genres (case-insensitive)."""
        keys = {g.strip().lower() for g in wanted}
        return np.fromiter((bool(g & keys) for g in self.genres), dtype=bool, count=self.n_items)

    def scores(
        self,
        user_id: str | None = None,
        attributes: dict[str, str] | None = None,
        genres: list[str] | None = None,
    ) -> ColdScores:
        """The cold-start rule for this user: ``attributes`` given, else the users table's, else none."""
        if attributes is None and user_id is not None:
            attributes = self.user_attributes.get(user_id)
        if attributes and "age" in attributes:  # an exact age, from a request
            banded = {"age_band": self.age_band(float(attributes["age"]))}
            attributes = {a: v for a, v in attributes.items() if a != "age"} | banded
        known = [
            self.by_attribute[(a, v)] for a, v in (attributes or {}).items() if (a, v) in self.by_attribute
        ]
        if known:
            prior, name = sum(np.log1p(c) for c in known) + 1e-3 * np.log1p(self.popularity), "attributes"
        else:
            prior, name = np.log1p(self.popularity), "popularity"
        if genres:
            boost = self.genre_mask(genres).astype(np.float64) * GENRE_BOOST
            return ColdScores(
                prior + boost, np.stack([boost, prior]), ["onboarding_genres", name], "onboarding"
            )
        return ColdScores(prior, prior[None], [name], name)


def genre_sets(catalog: pd.DataFrame) -> list[frozenset[str]]:
    """Each catalogue item's genres, lower-cased (``"Action|Comedy"`` -> {"action", "comedy"})."""
    column = catalog["genres"] if "genres" in catalog else pd.Series([""] * len(catalog))
    return [
        frozenset(g.strip().lower() for g in v.split("|") if g.strip()) if isinstance(v, str) else frozenset()
        for v in column
    ]


def attribute_values(age: int | None, gender: str | None, occupation: str | None) -> dict[str, str]:
    """A request's attributes; :meth:`ColdStart.scores` bands the exact ``age`` as the users table's."""
    values = {"gender": gender, "occupation": occupation, "age": None if age is None else str(age)}
    return {k: v for k, v in values.items() if v is not None}
