"""The fused rating predictor: fitted raters, the item statistics and the fitted fusers, served as one.

:class:`RatingEnsemble` predicts from rated histories like a rater (``predict(histories, items)``, clipped
to the training rating range) and explains each rating as parts: one per component, ``context`` and
``base`` (:mod:`fuserec.rating_fuser`). It keeps every fuser it was fitted with and serves ``chosen``: a
fuser, or one component alone when none of the fusers beat it on validation (:mod:`fuserec.rating_fusion`).

Saved without pickle: each component with its own ``save`` (found again by its rater name through
:func:`fuserec.registry.get_rater`), each fuser likewise (:func:`fuserec.registry.get_rating_fuser`), the
item statistics as arrays and the rest as JSON.

:meth:`RatingEnsemble.to_torch` is the served form: ``forward(history int64 [B, L] padded with -1,
history_ratings float32 [B, L], items int64 [B, m][, user_features float32 [B, g]])`` returns ``(rating
[B, m]`` unclipped, ``predictions [M, B, m]`` each component's clipped prediction, ``parts [P, B, m]``
summing to the rating).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuserec.api import user_feature_names
from fuserec.histories import Histories
from fuserec.rating import RatingAlgorithm
from fuserec.rating_fuser import LinearParts, RatingFuser, part_names
from fuserec.rating_meta import META_FEATURES, ItemStats, MetaModule, grid_meta, pair_meta

ENSEMBLE_FILE = "ensemble.json"
STATS_FILE = "item_stats.npz"


def plugin_name(key: str) -> str:
    """The plugin behind a component or fuser key: ``"svd@small"`` is the ``svd`` plugin named ``svd@small``
    (so one plugin can be fused under several configs)."""
    return key.split("@", 1)[0]


class RatingEnsembleModule(torch.nn.Module):
    """Components' torch forms, clipped, then the meta-features and one fuser's parts (see module doc)."""

    def __init__(
        self,
        components: list[torch.nn.Module],
        ranges: list[tuple[float, float]],
        reads: list[bool],
        meta: MetaModule,
        fuser: torch.nn.Module,
    ) -> None:
        super().__init__()
        self.components = torch.nn.ModuleList(components)
        self.ranges = [(float(lo), float(hi)) for lo, hi in ranges]
        self.reads = list(reads)
        self.reads_user_features = any(reads)
        #: the attribute columns of the optional ``user_features`` input (every reader shares one side)
        self.user_feature_names = next(
            (user_feature_names(c) for c, r in zip(components, reads, strict=True) if r), ()
        )
        self.meta_features = meta  # not `meta`: an exported GraphModule has its own `meta` attribute
        self.fuser = fuser

    def forward(
        self,
        history: torch.Tensor,
        history_ratings: torch.Tensor,
        items: torch.Tensor,
        user_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = []
        for module, (low, high), reads in zip(self.components, self.ranges, self.reads, strict=True):
            if reads:
                out = module(history, history_ratings, items, user_features)
            else:
                out = module(history, history_ratings, items)
            outputs.append(torch.clamp(out.to(torch.float32), low, high))
        predictions = torch.stack(outputs)  # [M, B, m]
        m, b, width = predictions.shape
        meta = self.meta_features(history, history_ratings, items)  # [B, m, F]
        parts = self.fuser(predictions.reshape(m, b * width).t(), meta.reshape(b * width, meta.shape[2]))
        rating = parts.sum(dim=1).reshape(b, width)
        return rating, predictions, parts.t().reshape(parts.shape[1], b, width)


@dataclass
class RatingEnsemble:
    """Fitted ``components`` (name -> rater), ``stats``, fitted ``fusers`` (name -> fuser) and ``chosen``,
    the name of the fuser or component served. ``selection`` is the report that chose it."""

    components: dict[str, RatingAlgorithm]
    stats: ItemStats
    fusers: dict[str, RatingFuser]
    chosen: str
    rating_range: tuple[float, float]
    selection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chosen not in self.fusers and self.chosen not in self.components:
            raise ValueError(f"chosen {self.chosen!r} is neither a fuser {list(self.fusers)} nor a component")

    @property
    def names(self) -> list[str]:
        return list(self.components)

    def served_components(self, name: str | None = None) -> list[str]:
        """The components a served ``name`` (default ``chosen``) reads: all for a fuser, itself alone."""
        name = name or self.chosen
        return self.names if name in self.fusers else [name]

    def part_names(self, name: str | None = None) -> list[str]:
        return part_names(self.served_components(name))

    def _fuser(self, name: str | None) -> RatingFuser | None:
        name = name or self.chosen
        if name in self.fusers:
            return self.fusers[name]
        if name not in self.components:
            raise KeyError(f"{name!r} is neither a fuser {list(self.fusers)} nor a component {self.names}")
        return None

    def clip(self, values: np.ndarray) -> np.ndarray:
        low, high = self.rating_range
        return np.clip(np.asarray(values, np.float32), low, high).astype(np.float32)

    # -- prediction ---------------------------------------------------------------------------------
    def pair_inputs(
        self, histories: Histories, rows: np.ndarray, items: np.ndarray, names: list[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(predictions float32 [n, M], meta float64 [n, F])`` of pairs (``rows[n]``, ``items[n]``)."""
        names = names or self.names
        preds = [self.components[n].predict_pairs(histories, rows, items) for n in names]
        return np.column_stack(preds).astype(np.float32), pair_meta(histories, rows, items, self.stats)

    def combine(
        self, predictions: np.ndarray, meta: np.ndarray, name: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(rating float32 [n] clipped, parts float32 [n, P])`` from all components' predictions."""
        fuser = self._fuser(name)
        if fuser is not None:
            fused, parts = fuser.combine(predictions, meta)
            return self.clip(fused), parts
        single = np.asarray(predictions, np.float32)[:, self.names.index(name or self.chosen)]
        zero = np.zeros_like(single)
        return self.clip(single), np.column_stack([single, zero, zero])

    def predict_pairs(
        self, histories: Histories, rows: np.ndarray, items: np.ndarray, name: str | None = None
    ) -> np.ndarray:
        """``float32 [n]`` clipped fused ratings of pairs."""
        return self.combine(*self.pair_inputs(histories, rows, items), name)[0]

    def explain(
        self, histories: Histories, items: np.ndarray, name: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rating [B, m] clipped, predictions [M, B, m], parts [P, B, m])``; parts sum to the unclipped
        fused rating (``M`` the served components)."""
        items = np.asarray(items, np.int64)
        names = self.served_components(name)
        predictions = np.stack([self.components[n].predict(histories, items) for n in names])
        b, width = items.shape
        if (name or self.chosen) in self.fusers:
            meta = grid_meta(histories, items, self.stats).reshape(b * width, len(META_FEATURES))
            flat = predictions.reshape(len(names), b * width).T
            _, parts = self.combine(flat, meta, name)
        else:
            single = predictions[0].reshape(-1)
            parts = np.column_stack([single, np.zeros_like(single), np.zeros_like(single)])
        parts = parts.T.reshape(parts.shape[1], b, width)
        return self.clip(parts.sum(axis=0)), predictions, parts

    def predict(self, histories: Histories, items: np.ndarray, name: str | None = None) -> np.ndarray:
        """``float32 [B, m]``: the served predictor's ratings of ``items[b]`` for history ``b``, clipped."""
        return self.explain(histories, items, name)[0]

    # -- served form --------------------------------------------------------------------------------
    def to_torch(self, name: str | None = None) -> RatingEnsembleModule:
        names = self.served_components(name)
        fuser = self._fuser(name)
        module = fuser.to_torch() if fuser is not None else LinearParts(np.ones(1), np.zeros(1))
        models = [self.components[n] for n in names]
        ranges = [m.rating_range_ or self.rating_range for m in models]
        served = [m.to_torch() for m in models]
        # a rater that can read attributes but was fitted without them reads none
        reads = [
            type(m).reads_user_features and bool(user_feature_names(s))
            for m, s in zip(models, served, strict=True)
        ]
        return RatingEnsembleModule(served, ranges, reads, MetaModule(self.stats), module).eval()

    def export_onnx(self, path: str | Path, name: str | None = None) -> Path:
        """The served predictor (default ``chosen``) as one ONNX graph (:func:`fuserec.rating_onnx.
        export_rating_onnx`): ratings clipped, each component's prediction, the parts; their names in the
        file's metadata."""
        from fuserec.rating_onnx import COMPONENTS_KEY, PARTS_KEY, export_rating_onnx

        module = self.to_torch(name)
        metadata = {
            COMPONENTS_KEY: json.dumps(self.served_components(name)),
            PARTS_KEY: json.dumps(self.part_names(name)),
        }
        n_items = self.stats.table.shape[0]
        return export_rating_onnx(
            module, path, n_items, self.rating_range, module.reads_user_features, metadata
        )

    # -- persistence (no pickle) --------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """``ensemble.json``, ``item_stats.npz``, ``components/<name>/``, ``fusers/<name>/`` in ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, model in self.components.items():
            model.save(path / "components" / name)
        for name, fuser in self.fusers.items():
            fuser.save(path / "fusers" / name)
        np.savez(path / STATS_FILE, **self.stats.state())  # type: ignore[arg-type]
        record = {
            "format": 1,
            "components": {n: {"rater": plugin_name(n)} for n in self.components},
            "fusers": {n: {"fuser": plugin_name(n)} for n in self.fusers},
            "chosen": self.chosen,
            "rating_range": list(self.rating_range),
            "meta_features": list(META_FEATURES),
            "selection": self.selection,
        }
        (path / ENSEMBLE_FILE).write_text(json.dumps(record, indent=2, default=float))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RatingEnsemble:
        from fuserec.registry import get_rater, get_rating_fuser

        path = Path(path)
        record = json.loads((path / ENSEMBLE_FILE).read_text())
        if list(record["meta_features"]) != list(META_FEATURES):
            raise ValueError(f"{path} was saved with meta-features {record['meta_features']}, not these")
        components = {
            n: get_rater(entry["rater"]).load(path / "components" / n)
            for n, entry in record["components"].items()
        }
        fusers = {
            n: get_rating_fuser(entry["fuser"]).load(path / "fusers" / n)
            for n, entry in record["fusers"].items()
        }
        with np.load(path / STATS_FILE, allow_pickle=False) as npz:
            stats = ItemStats.from_state({k: npz[k] for k in npz.files})
        low, high = record["rating_range"]
        return cls(
            components, stats, fusers, record["chosen"], (float(low), float(high)), record["selection"]
        )


__all__ = ["RatingEnsemble", "RatingEnsembleModule", "plugin_name"]
