"""Side features shared by the models that read item content and user attributes.

One place turns a catalog row and a users-table row into numbers, so content, two-tower, the knowledge
graph and the fusers agree on what "genre" or "age band" means: TF-IDF per content field (each field
normalised on its own, then weighted), one-hot attribute bands, knowledge-graph entities, and a
deterministic low-rank reduction of such vectors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

FIELDS = ("genres", "tags", "title", "text", "year")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_REGION_COLUMNS = ("zip", "zipcode", "zip_code", "postcode", "postal_code")
_NON_ATTRIBUTES = ("user", "user_id")
_EPS = 1e-12
YearTokens = Literal["decade", "year", "both"]


class ContentSettings(Protocol):
    """What the encoders read from a config: the ``content`` plugin's config satisfies it."""

    @property
    def genre_weight(self) -> float: ...
    @property
    def tag_weight(self) -> float: ...
    @property
    def title_weight(self) -> float: ...
    @property
    def text_weight(self) -> float: ...
    @property
    def year_weight(self) -> float: ...
    @property
    def year_tokens(self) -> str: ...
    @property
    def min_df(self) -> int: ...
    @property
    def max_features(self) -> int: ...
    @property
    def sublinear_tf(self) -> bool: ...
    @property
    def attribute_min_count(self) -> int: ...
    @property
    def numeric_bins(self) -> int: ...


@dataclass(frozen=True)
class ContentFeatures:
    """The encoders' default settings (the ``content`` plugin's config takes its defaults from here)."""

    genre_weight: float = 1.0
    tag_weight: float = 1.0
    title_weight: float = 0.0
    text_weight: float = 0.5
    year_weight: float = 0.75
    year_tokens: YearTokens = "both"
    min_df: int = 2
    max_features: int = 4096
    sublinear_tf: bool = True
    attribute_min_count: int = 5
    numeric_bins: int = 5


DEFAULTS = ContentFeatures()

#: The user attributes the encoders here are written for (ages banded, zip codes cut to their region): what a
#: plugin reading attributes through them declares as ``user_attributes`` (validate keeps no others).
USER_ATTRIBUTES = frozenset({"age", "gender", "occupation", "zip"})

#: Item fields that become knowledge-graph entities (one entity per distinct token).
ENTITY_FIELDS = ("genres", "tags", "year")


def item_content_vectors(items: pd.DataFrame, config: ContentSettings | None = None) -> np.ndarray:
    """``float32 [n_items, d]`` L2-normalised TF-IDF vectors of the catalog (``d >= 1``).

    Rows of items with no content are zero. The vocabulary comes from ``items`` itself, so a model that
    must embed items added after fitting keeps its own :class:`TfidfVocabulary`.
    """
    _, _, _, vectors = fit_tfidf(items, config or DEFAULTS, len(items))
    return vectors


def user_attribute_matrix(
    users: pd.DataFrame, config: ContentSettings | None = None
) -> tuple[np.ndarray, list[str]]:
    """One-hot ``float32 [n_users, f]`` of the users table's attributes and each column's name.

    Names read ``"column:value"`` (``occupation:engineer``; numeric columns such as age become quantile
    bands ``age:0`` .. ``age:4``). ``f`` is 0 when the table has no attribute columns; values rarer than
    ``attribute_min_count`` and missing values get no column.
    """
    return encode_attributes_named(users, config or DEFAULTS)


def item_entities(items: pd.DataFrame, fields: tuple[str, ...] = ENTITY_FIELDS) -> list[list[str]]:
    """Per item, its attribute entities as ``"field:token"`` strings (``genres:drama``, ``year:1990s``)."""
    out: list[list[str]] = [[] for _ in range(len(items))]
    for field in fields:
        for row, tokens in enumerate(field_tokens(items, field, "decade")):
            out[row].extend(f"{field}:{t}" for t in dict.fromkeys(tokens))
    return out


# -- TF-IDF ------------------------------------------------------------------------------------------
def field_tokens(items: pd.DataFrame, field: str, year_tokens: str = "decade") -> list[list[str]]:
    """Tokens of one content field per row; missing columns and values give no tokens."""
    n = len(items)

    def column(name: str) -> list[str]:
        if name not in items.columns:
            return [""] * n
        return ["" if pd.isna(v) else str(v) for v in items[name].tolist()]

    if field in ("genres", "tags"):
        return [[p.strip().lower() for p in v.split("|") if p.strip()] for v in column(field)]
    if field in ("title", "text"):
        values = column(field)
        if field == "title":
            values = [_TITLE_YEAR.sub("", v) for v in values]
        return [[w for w in _WORD.findall(v.lower()) if len(w) > 1] for v in values]
    # year: the release decade; from the year column, else from "(1995)" at the end of the title
    years = column("year")
    titles = column("title")
    out: list[list[str]] = []
    for year, title in zip(years, titles, strict=True):
        match = _TITLE_YEAR.search(title)
        value = _as_int(year)
        if value is None and match:
            value = int(match.group(1))
        if value is None:
            out.append([])
        elif year_tokens == "decade":
            out.append([f"{value // 10 * 10}s"])
        elif year_tokens == "year":
            out.append([str(value)])
        else:
            out.append([f"{value // 10 * 10}s", str(value)])
    return out


def _as_int(value: str) -> int | None:
    try:
        return int(float(value))
    except ValueError:
        return None


def _field_weights(config: ContentSettings) -> dict[str, float]:
    return {
        "genres": config.genre_weight,
        "tags": config.tag_weight,
        "title": config.title_weight,
        "text": config.text_weight,
        "year": config.year_weight,
    }


def fit_tfidf(
    items: pd.DataFrame, config: ContentSettings, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vocabulary, term field ids, smoothed idf and L2-normalised item vectors of the catalog."""
    vocab: list[str] = []
    fields: list[int] = []
    dfs: list[int] = []
    weights = _field_weights(config)
    for f, field in enumerate(FIELDS):
        if weights[field] <= 0:
            continue
        df: dict[str, int] = {}
        for tokens in field_tokens(items, field, config.year_tokens):
            for t in set(tokens):
                df[t] = df.get(t, 0) + 1
        for term in sorted(df):
            if df[term] >= config.min_df:
                vocab.append(term)
                fields.append(f)
                dfs.append(df[term])
    if len(vocab) > config.max_features:
        keep = np.sort(np.argsort(-np.asarray(dfs), kind="stable")[: config.max_features])
        vocab = [vocab[i] for i in keep]
        fields = [fields[i] for i in keep]
        dfs = [dfs[i] for i in keep]
    idf = (np.log((1.0 + n_items) / (1.0 + np.asarray(dfs, dtype=np.float64))) + 1.0).astype(np.float32)
    vocab_arr = np.asarray(vocab, dtype=str) if vocab else np.zeros(0, dtype="<U1")
    fields_arr = np.asarray(fields, dtype=np.int8)
    return vocab_arr, fields_arr, idf, transform_tfidf(items, vocab_arr, fields_arr, idf, config)


def transform_tfidf(
    items: pd.DataFrame, vocab: np.ndarray, fields: np.ndarray, idf: np.ndarray, config: ContentSettings
) -> np.ndarray:
    """Per field: tf x idf, L2-normalised, times the field weight; then the whole row L2-normalised.

    Why per-field normalisation: a long title or text should not drown the genres, so the field
    weights in the config mean what they say.
    """
    n, d = len(items), len(vocab)
    out = np.zeros((n, max(d, 1)), dtype=np.float32)
    weights = _field_weights(config)
    for f, field in enumerate(FIELDS):
        cols = np.flatnonzero(fields == f)
        if len(cols) == 0:
            continue
        index = {str(vocab[c]): i for i, c in enumerate(cols)}
        block = np.zeros((n, len(cols)), dtype=np.float32)
        for row, tokens in enumerate(field_tokens(items, field, config.year_tokens)):
            for t in tokens:
                j = index.get(t)
                if j is not None:
                    block[row, j] += 1.0
        if config.sublinear_tf:
            block = np.where(block > 0, 1.0 + np.log(np.maximum(block, 1.0)), 0.0).astype(np.float32)
        block *= idf[cols]
        out[:, cols] = weights[field] * unit_rows(block)
    return unit_rows(out[:, :d] if d else out)


def table_rows(table: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Rows of a per-user ``table`` (``[n_users, f]``); a row index of -1 or out of range gives zeros."""
    if rows is None:
        return np.zeros((0, table.shape[1]), dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    known = (rows >= 0) & (rows < len(table))
    out = np.zeros((len(rows), table.shape[1]), dtype=np.float32)
    out[known] = table[rows[known]]
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return x / np.maximum(norm, _EPS)


# -- user attributes ---------------------------------------------------------------------------------
def encode_attributes(users: pd.DataFrame, config: ContentSettings) -> np.ndarray:
    """One-hot ``float32 [n_users, f]`` of every attribute column; ``f = 0`` when there are none."""
    return encode_attributes_named(users, config)[0]


def encode_attributes_named(users: pd.DataFrame, config: ContentSettings) -> tuple[np.ndarray, list[str]]:
    """:func:`encode_attributes` and the ``"column:value"`` name of each output column.

    Numeric columns become quantile bands, zip-like columns their first character (a region), other
    columns their values; values rarer than ``attribute_min_count`` and missing values get no column.
    """
    encoder = AttributeEncoder.fit(users, config)
    return encoder.transform(users), list(encoder.names)


def _listed(edges: tuple[float, ...] | None) -> list[float] | None:
    return None if edges is None else list(edges)


@dataclass(frozen=True)
class AttributeColumn:
    """How one users-table column becomes one-hot columns: its kept values, and its band edges if numeric."""

    column: str
    values: tuple[str, ...]
    edges: tuple[float, ...] | None = None  # numeric: quantile band edges (value -> band index)

    def labels(self, raw: pd.Series) -> pd.Series:
        """Each raw value as the label it is one-hot encoded by (missing -> <NA>)."""
        if self.edges is not None:
            numeric = pd.to_numeric(raw, errors="coerce").astype("float64")
            bands = np.searchsorted(
                np.asarray(self.edges, dtype=np.float64), numeric.to_numpy(), side="right"
            )
            return pd.Series(np.where(numeric.notna(), bands.astype(str), None), dtype="string")
        values = raw.astype("string")
        if self.column.lower() in _REGION_COLUMNS:
            values = values.str.strip().str[:1]
        return values.where(values.notna() & (values != ""))


@dataclass(frozen=True)
class AttributeEncoder:
    """The users-table -> one-hot mapping learned once at fit and applied to anyone later.

    Why a fitted object: the service and the evaluate stage must encode a user exactly as the models'
    fit did (the same kept values, the same age bands) to feed the served graph its ``user_features``
    input, for users in the table and for attributes sent with a request. It round-trips through JSON.
    """

    columns: tuple[AttributeColumn, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{c.column}:{v}" for c in self.columns for v in c.values)

    @classmethod
    def fit(cls, users: pd.DataFrame, config: ContentSettings | None = None) -> AttributeEncoder:
        config = config or DEFAULTS
        columns: list[AttributeColumn] = []
        for name in users.columns:
            if name in _NON_ATTRIBUTES:
                continue
            col = users[name]
            edges: tuple[float, ...] | None = None
            if not (pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col)):
                known = pd.to_numeric(col, errors="coerce").astype("float64").dropna().to_numpy()
                if len(known) == 0:
                    continue
                qs = np.linspace(0, 1, config.numeric_bins + 1)[1:-1]
                edges = tuple(float(e) for e in np.unique(np.quantile(known, qs)))
            labels = AttributeColumn(str(name), (), edges).labels(col)
            counts = labels.value_counts()
            kept = sorted(str(v) for v, c in counts.items() if c >= config.attribute_min_count)
            if len(kept) >= 2:  # one value for everyone carries no information
                columns.append(AttributeColumn(str(name), tuple(kept), edges))
        return cls(tuple(columns))

    def transform(self, users: pd.DataFrame) -> np.ndarray:
        """``float32 [len(users), len(names)]``; a column the frame lacks, or an unseen value, stays 0."""
        blocks: list[np.ndarray] = []
        for col in self.columns:
            block = np.zeros((len(users), len(col.values)), dtype=np.float32)
            if col.column in users.columns:
                lookup = {v: i for i, v in enumerate(col.values)}
                for row, v in enumerate(col.labels(users[col.column]).tolist()):
                    j = lookup.get(str(v)) if v is not None and not pd.isna(v) else None
                    if j is not None:
                        block[row, j] = 1.0
            blocks.append(block)
        return np.hstack(blocks) if blocks else np.zeros((len(users), 0), dtype=np.float32)

    def table(self, users: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
        """``float32 [len(users), len(columns)]``: :meth:`transform` in ``columns``' order (a graph's
        ``user_features``); a column this encoder does not make stays 0."""
        encoded, names = self.transform(users), self.names
        out = np.zeros((len(users), len(columns)), dtype=np.float32)
        for j, name in enumerate(columns):
            if name in names:
                out[:, j] = encoded[:, names.index(name)]
        return out

    def encode(self, attributes: dict[str, str], columns: Sequence[str] | None = None) -> np.ndarray:
        """``float32 [len(columns)]`` of one person's attributes (``{"gender": "F", "age": "25-34"}``), in
        ``columns``' order (default: this encoder's :attr:`names`)."""
        frame = pd.DataFrame({k: [v] for k, v in attributes.items()})
        return self.table(frame, self.names if columns is None else columns)[0]

    def to_json(self) -> list[dict[str, object]]:
        return [
            {
                "column": c.column,
                "values": list(c.values),
                "edges": None if c.edges is None else list(c.edges),
            }
            for c in self.columns
        ]

    @classmethod
    def from_json(cls, spec: list[dict[str, Any]]) -> AttributeEncoder:
        return cls(
            tuple(
                AttributeColumn(
                    str(c["column"]),
                    tuple(str(v) for v in c["values"]),
                    None if c.get("edges") is None else tuple(float(e) for e in c["edges"]),
                )
                for c in spec
            )
        )


@dataclass(frozen=True)
class TfidfVocabulary:
    """A fitted TF-IDF vocabulary: the catalog's vectors, and the means to embed rows added later.

    Why keep it: a model that must place a brand-new item next to the fitted ones embeds its catalog row
    in the same vocabulary and idf, not in one refitted on a catalog that now differs.
    """

    vocab: np.ndarray
    term_fields: np.ndarray
    idf: np.ndarray
    item_vectors: np.ndarray
    settings: ContentSettings = DEFAULTS

    @classmethod
    def fit(cls, items: pd.DataFrame, settings: ContentSettings = DEFAULTS) -> TfidfVocabulary:
        vocab, fields, idf, vectors = fit_tfidf(items, settings, len(items))
        return cls(vocab, fields, idf, vectors, settings)

    def embed(self, items: pd.DataFrame) -> np.ndarray:
        """Unit-norm vectors of catalog rows (same columns as the items table) in this vocabulary."""
        return transform_tfidf(items, self.vocab, self.term_fields, self.idf, self.settings)

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "vocab": np.asarray(self.vocab, dtype=str),
            "term_fields": self.term_fields,
            "idf": self.idf,
            "item_vectors": self.item_vectors,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, np.ndarray], settings: ContentSettings = DEFAULTS
    ) -> TfidfVocabulary:
        return cls(
            np.asarray(state["vocab"], dtype=str),
            np.asarray(state["term_fields"]).astype(np.int8),
            np.asarray(state["idf"]).astype(np.float32),
            np.asarray(state["item_vectors"]).astype(np.float32),
            settings,
        )


def svd_reduce(vectors: np.ndarray, dims: int) -> np.ndarray:
    """Vectors projected on their top ``dims`` singular directions (``U_k S_k``); unchanged when small.

    Why: fusers read cosines between content vectors thousands of times; a few dozen directions keep
    those cosines close while the features stay cheap.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape[1] > dims and min(vectors.shape) > dims:
        from scipy.sparse.linalg import svds

        u, s, _ = svds(vectors, k=dims, random_state=0)
        vectors = u * s
    return vectors.astype(np.float32)
