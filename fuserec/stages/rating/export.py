"""Export: the chosen rating predictor as one ONNX graph, checked against Python under onnxruntime.

The graph takes rated histories and the items to rate and returns the clipped rating, every component's
own prediction and the parts of the fused one (:mod:`fuserec.rating_onnx`). Beside it: ``catalog.parquet``
(row = item index) and a manifest naming the task, the chosen predictor and why, the components, the
parts, the rating range and the measured parity.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fuserec.api import USER_FEATURES, user_feature_names
from fuserec.config import Params
from fuserec.data.dataset import ITEMS_FILE
from fuserec.features import AttributeEncoder
from fuserec.histories import Histories
from fuserec.layout import CATALOG_FILE, MODEL_FILE, Layout
from fuserec.manifest import file_sha256, read_json, write_manifest
from fuserec.rating_ensemble import RatingEnsemble
from fuserec.rating_onnx import COMPONENTS_KEY, PARTS_KEY, RatingSession, export_rating_onnx
from fuserec.stages.rating.data import catalogue, histories_of
from fuserec.stages.rating.fuse import load_fusion

#: Largest |graph - Python| accepted on a predicted rating; the export fails above it.
PARITY_TOLERANCE = 1e-4
#: Share of predictions that may differ by more, through a discontinuity of the model (:class:`Parity`).
MAX_JUMPS = 1e-3
PARITY_USERS = 256


def padded(histories: Histories, rows: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """``(history [b, L], ratings [b, L])`` of ``rows``: each history's latest ``max_history`` entries,
    right-padded with -1 (and rating 0)."""
    assert histories.ratings is not None
    lengths = np.minimum(histories.lengths[rows], max_history)
    width = max(int(lengths.max()) if len(rows) else 0, 1)
    items = np.full((len(rows), width), -1, dtype=np.int64)
    ratings = np.zeros((len(rows), width), dtype=np.float32)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        stop = histories.indptr[row + 1]
        items[b, :n] = histories.items[stop - n : stop]
        ratings[b, :n] = histories.ratings[stop - n : stop]
    return items, ratings


@dataclass(frozen=True)
class Parity:
    """How the graph's outputs compare with Python's on the same histories and items.

    A model may be discontinuous in floating-point values: the stacker's trees at a split, the neighbour
    models at a near-tie for the k-th neighbour. Where the graph and numpy round a value one float32 or
    float64 step apart on either side of such a point, the two answers differ by a jump, not by rounding.
    Those pairs are counted, and may be at most ``MAX_JUMPS`` of them; everything else agrees within
    ``PARITY_TOLERANCE`` or the export fails.
    """

    components: float  # largest |graph - Python| over every component's own prediction
    components_over: int  # component predictions further apart than PARITY_TOLERANCE
    fused: float  # largest |graph - Python| over the served rating
    over: int  # served ratings further apart than PARITY_TOLERANCE
    n: int  # pairs (history, item)
    m: int  # components

    def problem(self) -> str | None:
        """Why the graph is not the measured model, or None."""
        if self.components_over > MAX_JUMPS * self.n * self.m:
            return (
                f"{self.components_over} of {self.n * self.m} component predictions differ from predict() "
                f"by over {PARITY_TOLERANCE:g} (largest {self.components:.2e})"
            )
        if self.over > MAX_JUMPS * self.n:
            return f"{self.over} of {self.n} served ratings differ from Python by over {PARITY_TOLERANCE:g}"
        return None

    def record(self) -> dict[str, Any]:
        return {
            "pairs": self.n,
            "tolerance": PARITY_TOLERANCE,
            "max_abs_diff": self.fused,
            "over_tolerance": self.over,
            "components_max_abs_diff": self.components,
            "components_over_tolerance": self.components_over,
        }


def parity(
    session: RatingSession,
    ensemble: RatingEnsemble,
    histories: Histories,
    rows: np.ndarray,
    items: np.ndarray,
    max_history: int,
    features: np.ndarray | None = None,
) -> Parity:
    """The graph against Python on ``items [b, m]`` for history ``rows`` (``features``: those users'
    attribute rows, which Python finds through ``histories.users``)."""
    history, ratings = padded(histories, rows, max_history)
    out = session.run_padded(history, ratings, items, features)
    latest = histories.select(rows).latest(np.full(len(rows), max_history))
    python, predictions, _ = ensemble.explain(latest, items)
    fused = np.abs(out["ratings"] - python)
    components = np.abs(out["predictions"] - predictions)
    return Parity(
        float(components.max(initial=0.0)),
        int((components > PARITY_TOLERANCE).sum()),
        float(fused.max(initial=0.0)),
        int((fused > PARITY_TOLERANCE).sum()),
        int(fused.size),
        int(components.shape[0]),
    )


def export(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    out = layout.export
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ensemble = load_fusion(layout)
    cat = catalogue(layout)
    name = ensemble.chosen
    module = ensemble.to_torch()
    components, parts = ensemble.served_components(), ensemble.part_names()
    onnx_path = out / MODEL_FILE
    columns = user_feature_names(module)
    reads = bool(module.reads_user_features) and bool(columns)
    export_rating_onnx(
        module,
        onnx_path,
        cat.n_items,
        ensemble.rating_range,
        reads_user_features=bool(module.reads_user_features),
        metadata={COMPONENTS_KEY: json.dumps(components), PARTS_KEY: json.dumps(parts)},
        opset=params.export.opset,
    )
    session = RatingSession(onnx_path, params.export.providers)
    max_history = params.rating.max_history
    train = pd.read_parquet(layout.split_file("train"))
    histories = histories_of(train, cat.n_users, cat.n_items)
    rng = np.random.default_rng(params.rating.seed)
    rated = np.flatnonzero(histories.lengths > 0)
    rows = np.sort(rng.choice(rated, min(PARITY_USERS, len(rated)), replace=False))
    rows = np.concatenate([rows, [int(np.argmin(histories.lengths))]])  # the shortest history, maybe empty
    items = rng.integers(0, cat.n_items, size=(len(rows), 16))
    features = cat.attribute_rows(rows, columns) if reads else None
    checked = parity(session, ensemble, histories, rows, items, max_history, features)
    problem = checked.problem()
    if problem:
        raise RuntimeError(
            f"the exported rating graph is not the Python model on {len(rows)} training histories: "
            f"{problem}; {name}'s to_torch() does not match its predict()"
        )
    pd.read_parquet(layout.clean / ITEMS_FILE).to_parquet(out / CATALOG_FILE, index=False)
    selection = read_json(layout.selection) if layout.selection.exists() else {}
    kind = "fuser" if name in ensemble.fusers else "rater"
    write_manifest(
        out,
        task="rating",
        algorithm={"name": name, "kind": kind},
        selection={
            "reason": selection.get("reason"),
            "candidates": {n: c.get("rmse") for n, c in (selection.get("candidates") or {}).items()},
        },
        sha256=file_sha256(onnx_path),
        inputs=_inputs(),
        features_input=(
            {
                "name": USER_FEATURES,
                "dtype": "float32",
                "shape": ["batch", len(columns)],
                "columns": list(columns),
                "meaning": "one-hot user attributes (column:value); a zero row = attributes unknown",
                "encoder": AttributeEncoder.fit(cat.users).to_json(),
            }
            if reads
            else None
        ),
        outputs=["ratings", "predictions", "contributions"],
        components=components,
        parts=parts,
        rating_range=list(ensemble.rating_range),
        max_history=max_history,
        n_items=cat.n_items,
        providers=session.providers,
        opset=params.export.opset,
        parity={"histories": len(rows), **checked.record()},
    )
    return str(out)


def _inputs() -> list[dict[str, Any]]:
    return [
        {"name": "history", "dtype": "int64", "shape": ["batch", "history_len"], "padding": -1},
        {"name": "history_ratings", "dtype": "float32", "shape": ["batch", "history_len"]},
        {"name": "items", "dtype": "int64", "shape": ["batch", "items"], "meaning": "catalogue indices"},
    ]
