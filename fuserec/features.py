"""Side features shared by the models that read item content and user attributes.

One place turns a catalog row and a users-table row into numbers, so content, two-tower, the knowledge
graph and feature fusion agree on what "genre" or "age band" means. The encoders are those of the
``content`` plugin (TF-IDF per field, one-hot attribute bands); this module gives them a public face.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fuserec.plugins.content import ContentConfig, _encode_attributes_named, _field_tokens, _fit_tfidf

#: Item fields that become knowledge-graph entities (one entity per distinct token).
ENTITY_FIELDS = ("genres", "tags", "year")


def item_content_vectors(items: pd.DataFrame, config: ContentConfig | None = None) -> np.ndarray:
    """``float32 [n_items, d]`` L2-normalised TF-IDF vectors of the catalog (``d >= 1``).

    Rows of items with no content are zero. The vocabulary comes from ``items`` itself, so a model that
    must embed items added after fitting keeps its own :class:`fuserec.plugins.content.Content`.
    """
    cfg = config or ContentConfig()
    _, _, _, vectors = _fit_tfidf(items, cfg, len(items))
    return vectors


def user_attribute_matrix(
    users: pd.DataFrame, config: ContentConfig | None = None
) -> tuple[np.ndarray, list[str]]:
    """One-hot ``float32 [n_users, f]`` of the users table's attributes and each column's name.

    Names read ``"column:value"`` (``occupation:engineer``; numeric columns such as age become quantile
    bands ``age:0`` .. ``age:4``). ``f`` is 0 when the table has no attribute columns; values rarer than
    ``attribute_min_count`` and missing values get no column.
    """
    return _encode_attributes_named(users, config or ContentConfig())


def item_entities(items: pd.DataFrame, fields: tuple[str, ...] = ENTITY_FIELDS) -> list[list[str]]:
    """Per item, its attribute entities as ``"field:token"`` strings (``genres:drama``, ``year:1990s``)."""
    out: list[list[str]] = [[] for _ in range(len(items))]
    for field in fields:
        for row, tokens in enumerate(_field_tokens(items, field, "decade")):
            out[row].extend(f"{field}:{t}" for t in dict.fromkeys(tokens))
    return out
