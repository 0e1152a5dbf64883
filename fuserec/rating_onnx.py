"""The served rating graph: rated histories and candidate items in; ratings, each model's prediction and
the parts of the fused rating out.

Inputs: ``history int64 [B, L]`` (padded with -1; any id outside ``[0, n_items)`` is padding),
``history_ratings float32 [B, L]`` aligned with it, ``items int64 [B, m]`` the items to rate and, when a
model reads attributes, ``user_features float32 [B, g]``. Outputs: ``ratings [B, m]`` clipped to the
training range, ``predictions [M, B, m]`` each component's clipped rating and ``contributions [P, B, m]``
parts that add up to the unclipped fused rating (a single rater is its own one component and one part).

:class:`RatingGraph` wraps either a rater's ``to_torch()`` module or a fused ensemble's, so both are
served alike; what names the components and parts travels in the file's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuserec.api import USER_FEATURES, user_feature_names
from fuserec.onnx_model import FEATURE_NAMES_KEY, inference_session, save_onnx

INPUT_NAMES = ("history", "history_ratings", "items")
OUTPUT_NAMES = ("ratings", "predictions", "contributions")
#: Metadata keys the export writes: the clip range ``[low, high]`` and the catalogue size, as JSON.
RANGE_KEY = "fuserec.rating_range"
N_ITEMS_KEY = "fuserec.n_items"
#: Keys a caller usually adds (JSON lists of names): what ``predictions`` and ``contributions`` hold.
COMPONENTS_KEY = "fuserec.components"
PARTS_KEY = "fuserec.parts"

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RatingGraph(torch.nn.Module):
    """Sanitises ids, runs ``module`` and clips: the exported rating model.

    History ids outside ``[0, n_items)`` become -1 padding (their ratings 0) before the module gathers
    anything, so a bad id can never index out of bounds (onnxruntime on CUDA does not bound-check); item
    ids are clamped into range: wrong for the caller who sent them, but never a crash. ``module`` returns
    either ``[B, m]`` (one rater) or ``(fused [B, m], predictions [M, B, m], contributions [P, B, m])``.
    """

    def __init__(self, module: torch.nn.Module, n_items: int, rating_range: tuple[float, float]) -> None:
        super().__init__()
        self.module = module
        self.n_items = int(n_items)
        self.low, self.high = (float(v) for v in rating_range)

    def forward(
        self,
        history: torch.Tensor,
        history_ratings: torch.Tensor,
        items: torch.Tensor,
        user_features: torch.Tensor | None = None,
    ) -> Triple:
        valid = (history >= 0) & (history < self.n_items)
        history = torch.where(valid, history, torch.full_like(history, -1))
        ratings = history_ratings.to(torch.float32)
        history_ratings = torch.where(valid, ratings, torch.zeros_like(ratings))
        items = torch.clamp(items, 0, self.n_items - 1)
        if user_features is None:
            out = self.module(history, history_ratings, items)
        else:
            out = self.module(history, history_ratings, items, user_features.to(torch.float32))
        if isinstance(out, tuple):
            fused, predictions, parts = out
        else:
            fused, predictions, parts = out, out.unsqueeze(0), out.unsqueeze(0)
        return (
            torch.clamp(fused.to(torch.float32), self.low, self.high),
            torch.clamp(predictions.to(torch.float32), self.low, self.high),
            parts.to(torch.float32),
        )


def feature_width(module: torch.nn.Module) -> int:
    """Columns of ``user_features`` a module reads: its ``user_feature_names`` or ``n_user_features``."""
    width = len(user_feature_names(module)) or int(getattr(module, "n_user_features", 0) or 0)
    if not width:
        raise ValueError(
            f"{type(module).__name__} reads user_features but declares neither user_feature_names nor "
            "n_user_features: the export needs the column count"
        )
    return width


def export_rating_onnx(
    module: torch.nn.Module,
    path: str | Path,
    n_items: int,
    rating_range: tuple[float, float],
    reads_user_features: bool = False,
    metadata: dict[str, str] | None = None,
    opset: int = 18,
) -> Path:
    """Export ``RatingGraph(module)`` to ``path`` with dynamic batch, history length and item count.

    ``metadata`` (e.g. :data:`COMPONENTS_KEY`, :data:`PARTS_KEY`) is stored in the model's
    ``metadata_props`` beside the rating range and catalogue size, so the file says what it serves.
    """
    from torch.export import Dim

    last = max(n_items - 1, 0)
    # distinct sizes (B=2, L=3, m=4), none 0 or 1, so the exporter specialises none of them
    inputs: list[torch.Tensor] = [
        torch.tensor([[0, min(1, last), -1], [min(2, last), -1, -1]], dtype=torch.int64),
        torch.tensor([[4.0, 3.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float32),
        torch.tensor([[0, min(1, last), min(2, last), 0], [min(3, last), 0, 0, 0]], dtype=torch.int64),
    ]
    batch = Dim("batch")
    length = Dim("history_len")
    shapes: list[dict[int, Any]] = [{0: batch, 1: length}, {0: batch, 1: length}, {0: batch, 1: Dim("items")}]
    names = list(INPUT_NAMES)
    features = user_feature_names(module)
    if reads_user_features:
        inputs.append(torch.zeros(2, feature_width(module), dtype=torch.float32))
        shapes.append({0: batch})
        names.append(USER_FEATURES)
    graph = RatingGraph(module, n_items, rating_range).eval()
    props = {
        **(metadata or {}),
        RANGE_KEY: json.dumps([float(v) for v in rating_range]),
        N_ITEMS_KEY: json.dumps(int(n_items)),
    }
    if reads_user_features and features:
        props[FEATURE_NAMES_KEY] = json.dumps(list(features))
    return save_onnx(graph, inputs, names, list(OUTPUT_NAMES), shapes, path, opset, props)


class RatingSession:
    """An onnxruntime session over an exported rating graph, fed ragged Python lists."""

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int = 0, spinning: bool = True
    ) -> None:
        """``threads`` intra-op threads (0: onnxruntime's default); ``spinning=False`` lets idle pool
        threads sleep, which a server sharing its cores needs."""
        self.session = inference_session(path, providers, threads, spinning)
        self.providers: list[str] = self.session.get_providers()
        #: the graph's metadata: the export's keys and whatever the exporter added
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        low, high = json.loads(self.metadata[RANGE_KEY])
        self.rating_range = (float(low), float(high))
        self.n_items = int(json.loads(self.metadata[N_ITEMS_KEY]))
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.reads_user_features = USER_FEATURES in inputs
        self.feature_width = int(inputs[USER_FEATURES].shape[1]) if self.reads_user_features else 0
        self.feature_names: tuple[str, ...] = tuple(json.loads(self.metadata.get(FEATURE_NAMES_KEY, "[]")))

    def names(self, key: str) -> list[str] | None:
        """A JSON list of names stored under ``key`` (e.g. :data:`COMPONENTS_KEY`), None when absent."""
        value = self.metadata.get(key)
        return None if value is None else [str(v) for v in json.loads(value)]

    def run_padded(
        self,
        history: np.ndarray,
        history_ratings: np.ndarray,
        items: np.ndarray,
        user_features: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The graph's outputs by name for already padded arrays (``[B, L]``, ``[B, L]``, ``[B, m]``).

        A graph that reads attributes gets zeros where ``user_features`` is None (unknown users).
        """
        feed: dict[str, np.ndarray] = {
            INPUT_NAMES[0]: np.asarray(history, dtype=np.int64),
            INPUT_NAMES[1]: np.asarray(history_ratings, dtype=np.float32),
            INPUT_NAMES[2]: np.asarray(items, dtype=np.int64),
        }
        if self.reads_user_features:
            shape = (len(feed[INPUT_NAMES[0]]), self.feature_width)
            values = np.zeros(shape, np.float32) if user_features is None else user_features
            feed[USER_FEATURES] = np.asarray(values, dtype=np.float32)
            if feed[USER_FEATURES].shape != shape:
                raise ValueError(
                    f"user_features must be float32 {list(shape)}, got {feed[USER_FEATURES].shape}"
                )
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feed), strict=True))

    def run(
        self,
        history: Sequence[Sequence[int]],
        ratings: Sequence[Sequence[float]],
        items: Sequence[Sequence[int]],
        user_features: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Rate ``items[b]`` for the rated history ``(history[b], ratings[b])`` of each row ``b``.

        Rows may differ in length. Returns the outputs padded to the longest item list, ``ratings
        [B, m]``, ``predictions [M, B, m]``, ``contributions [P, B, m]``, with NaN past a row's own items,
        and ``lengths int64 [B]``: row b's values are ``[..., b, :lengths[b]]``. Histories are padded to
        at least one column, so an empty history (or a batch of them) is a valid input.
        """
        if not (len(history) == len(ratings) == len(items)):
            raise ValueError(
                f"history, ratings and items need one row per user: got {len(history)}, {len(ratings)}, "
                f"{len(items)} rows"
            )
        uneven = [b for b, (h, r) in enumerate(zip(history, ratings, strict=True)) if len(h) != len(r)]
        if uneven:
            raise ValueError(f"rows {uneven[:5]}: a history and its ratings must have the same length")
        rows = max(len(history), 1)  # an empty batch runs one empty row, then drops it
        user_features = user_features if len(history) else None
        width = max([len(h) for h in history] + [1])
        count = np.array([len(i) for i in items], dtype=np.int64)
        padded = np.full((rows, width), -1, dtype=np.int64)
        values = np.zeros((rows, width), dtype=np.float32)
        wanted = np.zeros((rows, max(int(count.max()) if len(count) else 0, 1)), dtype=np.int64)
        for b, (h, r, i) in enumerate(zip(history, ratings, items, strict=True)):
            padded[b, : len(h)] = h
            values[b, : len(r)] = r
            wanted[b, : len(i)] = i  # item 0 pads the shorter lists: computed, then masked out
        out = self.run_padded(padded, values, wanted, user_features)
        keep = np.arange(wanted.shape[1])[None, :] < np.pad(count, (0, rows - len(count)))[:, None]
        result = {name: np.where(keep, value, np.nan)[..., : len(history), :] for name, value in out.items()}
        result["lengths"] = count
        return result


__all__ = [
    "COMPONENTS_KEY",
    "INPUT_NAMES",
    "N_ITEMS_KEY",
    "OUTPUT_NAMES",
    "PARTS_KEY",
    "RANGE_KEY",
    "RatingGraph",
    "RatingSession",
    "export_rating_onnx",
    "feature_width",
]
