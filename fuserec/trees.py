"""Gradient-boosted trees as tensor arithmetic, so a LightGBM ranker runs inside the exported torch graph.

A learned fuser is only useful if the served model is still one ONNX file: the ranker has to sit between
the components' scores and the top-k. LightGBM's own ONNX converter would need graph surgery to splice
its TreeEnsemble into the torch export; evaluating the trees as matrix products in torch gives the same
leaves, exports with the rest, and yields Saabas path attributions (which feature moved the score).

The evaluation is the "GEMM" strategy (as in Hummingbird): every split is one column of a 0/1 feature
selector, every leaf is reached iff the split outcomes on its path match, which is one batched product
against a per-tree path matrix. A level-by-level walk with gathers gave the same numbers but spent most
of the served model's latency in onnxruntime's Gather kernels.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def booster_arrays(booster: Any, n_features: int) -> dict[str, np.ndarray]:
    """Flatten a LightGBM booster's trees into padded node tables (numeric, saved without pickle).

    Per tree ``t`` and node ``s`` (internal nodes first, then leaves): ``feature``, ``threshold`` (go left
    when ``x <= threshold``), ``left``/``right`` child node, ``value`` (internal value or leaf output).
    Leaves point to themselves, so walking ``depth`` steps from the root always ends on a leaf.
    """
    trees = booster.dump_model()["tree_info"]
    if not trees:
        raise ValueError("the booster has no trees: train at least one boosting round")
    sizes = [2 * t["num_leaves"] - 1 for t in trees]
    width = max(sizes)
    n = len(trees)
    feature = np.zeros((n, width), dtype=np.int64)
    threshold = np.full((n, width), np.inf, dtype=np.float64)
    left = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    right = left.copy()
    value = np.zeros((n, width), dtype=np.float64)
    is_leaf = np.ones((n, width), dtype=bool)
    depth = 0
    for t, tree in enumerate(trees):
        n_internal = tree["num_leaves"] - 1

        def index(node: dict[str, Any], n_internal: int = n_internal) -> int:
            if "split_index" in node:
                return int(node["split_index"])
            return n_internal + int(node.get("leaf_index", 0))

        stack = [(tree["tree_structure"], 0)]
        while stack:
            node, level = stack.pop()
            s = index(node)
            depth = max(depth, level)
            if "split_index" not in node:
                value[t, s] = float(node["leaf_value"])
                continue
            if node.get("decision_type", "<=") != "<=":
                raise ValueError(f"unsupported split {node.get('decision_type')!r}: only numeric '<=' splits")
            if int(node["split_feature"]) >= n_features:
                raise ValueError(f"tree splits on feature {node['split_feature']} of {n_features}")
            feature[t, s] = int(node["split_feature"])
            threshold[t, s] = float(node["threshold"])
            value[t, s] = float(node["internal_value"])
            is_leaf[t, s] = False
            left[t, s], right[t, s] = index(node["left_child"]), index(node["right_child"])
            stack += [(node["left_child"], level + 1), (node["right_child"], level + 1)]
    return {
        "feature": feature,
        "threshold": threshold,
        "left": left,
        "right": right,
        "value": value,
        "is_leaf": is_leaf,
        "depth": np.asarray(depth, dtype=np.int64),
    }


def leaf_tables(arrays: dict[str, np.ndarray], n_features: int) -> dict[str, np.ndarray]:
    """The node tables of :func:`booster_arrays` rewritten for :func:`predict_trees` (derived, not saved).

    Per tree, ``I`` internal nodes and ``L = I + 1`` leaf slots (smaller trees padded):
    ``selector [F, T*I]`` one-hot split features; ``threshold [T*I]`` float32 thresholds rounded down, so
    ``x <= t32`` equals LightGBM's float64 ``x <= t`` for every float32 ``x``; ``paths [T, I, L]`` +1 where
    the leaf lies left of the node, -1 right; ``lefts [T, 1, L]`` left turns on each leaf's path (0.5 on
    padding: never matched); ``leaf [T*L, 1 + F]`` each leaf's value then its Saabas attributions.
    """
    feature, threshold, left, right = arrays["feature"], arrays["threshold"], arrays["left"], arrays["right"]
    value, is_leaf = arrays["value"], arrays["is_leaf"]
    n_trees = feature.shape[0]
    n_internal = (~is_leaf).sum(axis=1)
    inner = max(int(n_internal.max()), 1)
    slots = inner + 1
    selector = np.zeros((n_features, n_trees, inner), dtype=np.float32)
    thresholds = np.full((n_trees, inner), np.inf, dtype=np.float32)
    paths = np.zeros((n_trees, inner, slots), dtype=np.float32)
    lefts = np.full((n_trees, slots), 0.5, dtype=np.float32)
    leaf = np.zeros((n_trees, slots, 1 + n_features), dtype=np.float64)
    for t in range(n_trees):
        k = int(n_internal[t])
        for i in range(k):
            selector[feature[t, i], t, i] = 1.0
            down = np.float32(threshold[t, i])
            thresholds[t, i] = np.nextafter(down, np.float32(-np.inf)) if down > threshold[t, i] else down
        stack: list[tuple[int, list[tuple[int, float]], np.ndarray]] = [(0, [], np.zeros(n_features))]
        while stack:
            node, path, attribution = stack.pop()
            if is_leaf[t, node]:
                slot = node - k
                for i, side in path:
                    paths[t, i, slot] = side
                lefts[t, slot] = sum(side > 0 for _, side in path)
                leaf[t, slot, 0] = value[t, node]
                leaf[t, slot, 1:] = attribution
                continue
            for child, side in ((left[t, node], 1.0), (right[t, node], -1.0)):
                moved = attribution.copy()
                moved[feature[t, node]] += value[t, child] - value[t, node]
                stack.append((int(child), [*path, (node, side)], moved))
    return {
        "selector": selector.reshape(n_features, n_trees * inner),
        "threshold": thresholds.reshape(-1),
        "paths": paths,
        "lefts": lefts[:, None, :],
        "leaf": leaf.reshape(n_trees * slots, 1 + n_features).astype(np.float32),
    }


def predict_trees(tables: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble output ``[N]`` and per-feature path attributions ``[N, F]`` for finite rows ``x [N, F]``.

    Output = sum of the roots' values + attributions.sum(1): each step from node to child adds
    ``value[child] - value[node]`` to the node's split feature (Saabas). Leaf choice is exact (see
    :func:`leaf_tables`); the leaf sums run in float32, within 1e-5 of LightGBM's float64 predictions.
    """
    leaves = leaf_indicator(tables, x)
    summed = leaves @ tables["leaf"]
    return summed[:, 0], summed[:, 1:]


def average_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One ensemble that outputs the mean of several :func:`booster_arrays` over the same features.

    Averaging boosters fitted with different bagging seeds lowers the variance that a small validation set
    leaves in any one of them. The trees are stacked (padded to one width with unreachable, self-pointing
    zero leaves, as :func:`booster_arrays` pads its own) and every value divided by their number, so the
    leaves, the attributions and the ONNX export need nothing new.
    """
    if len(parts) == 1:
        return parts[0]
    width = max(p["feature"].shape[1] for p in parts)
    fills: dict[str, Any] = {"feature": 0, "threshold": np.inf, "value": 0.0, "is_leaf": True}

    def padded(table: np.ndarray, key: str) -> np.ndarray:
        n, w = table.shape
        if key in ("left", "right"):
            extra = np.tile(np.arange(w, width, dtype=table.dtype), (n, 1))
        else:
            extra = np.full((n, width - w), fills[key], dtype=table.dtype)
        return np.concatenate([table, extra], axis=1)

    out = {
        key: np.concatenate([padded(p[key], key) for p in parts]) for key in fills.keys() | {"left", "right"}
    }
    out["value"] = out["value"] / len(parts)
    out["depth"] = np.asarray(max(int(p["depth"]) for p in parts), dtype=np.int64)
    return out


def base_value(arrays: dict[str, Any]) -> Any:
    """Sum of the trees' root values: the output before any split is read."""
    return arrays["value"][:, 0].sum()


# -- the ensemble as one operator: torch (GEMM) in Python, onnxruntime's native TreeEnsemble when exported --
_ENSEMBLES: weakref.WeakValueDictionary[int, TreeEnsemble] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


class TreeEnsemble:
    """Trees whose leaves each emit ``[value, attributions @ weights]``; calling it sums the reached rows.

    ``weights [F, K]`` maps the per-feature Saabas attributions to ``K`` groups (e.g. one per fused
    component); without it the row holds all ``F`` attributions. In Python (and torch eager) the leaves
    are found by :func:`leaf_indicator`'s matrix products. In an ONNX export the call becomes one
    ``ai.onnx.ml`` ``TreeEnsembleRegressor`` with ``1 + K`` targets (see :data:`TRANSLATIONS`):
    onnxruntime's native trees run a ranker more than ten times faster than the same products exported.
    """

    def __init__(
        self, arrays: dict[str, np.ndarray], n_features: int, weights: np.ndarray | None = None
    ) -> None:
        self.arrays = arrays
        self.tables = leaf_tables(arrays, n_features)
        leaf = self.tables["leaf"].astype(np.float64)
        if weights is not None:
            if weights.shape[0] != n_features:
                raise ValueError(f"weights has {weights.shape[0]} rows for {n_features} features")
            leaf = np.concatenate([leaf[:, :1], leaf[:, 1:] @ weights], axis=1)
        self.outputs = np.ascontiguousarray(leaf, dtype=np.float32)
        self._torch: dict[str, torch.Tensor] = {}
        self.key = next(_KEYS)
        _ENSEMBLES[self.key] = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, K]``: the summed outputs of the leaves that finite rows ``x [N, F]`` reach."""
        return torch.ops.fuserec.tree_ensemble(x.to(torch.float32), self.key)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        if not self._torch or self._torch["outputs"].device != x.device:
            arrays = {**self.tables, "outputs": self.outputs}
            self._torch = {k: torch.from_numpy(v).to(x.device) for k, v in arrays.items()}
        return leaf_indicator(self._torch, x) @ self._torch["outputs"]

    def onnx_attributes(self) -> dict[str, Any]:
        """``TreeEnsembleRegressor`` attributes: the same splits (float32 thresholds) and leaf outputs."""
        a, slots, inner = self.arrays, self.tables["paths"].shape[2], self.tables["paths"].shape[1]
        out: dict[str, list[Any]] = {
            name: []
            for name in (
                "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
                "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
                "target_treeids", "target_nodeids", "target_ids", "target_weights",
            )
        }  # fmt: skip
        for t in range(a["feature"].shape[0]):
            k = int((~a["is_leaf"][t]).sum())
            for node in range(2 * k + 1):
                leaf = bool(a["is_leaf"][t, node])
                out["nodes_treeids"].append(t)
                out["nodes_nodeids"].append(node)
                out["nodes_featureids"].append(0 if leaf else int(a["feature"][t, node]))
                out["nodes_values"].append(0.0 if leaf else float(self.tables["threshold"][t * inner + node]))
                out["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
                out["nodes_truenodeids"].append(0 if leaf else int(a["left"][t, node]))
                out["nodes_falsenodeids"].append(0 if leaf else int(a["right"][t, node]))
                out["nodes_missing_value_tracks_true"].append(0)
                if leaf:
                    row = self.outputs[t * slots + node - k]
                    for j in np.flatnonzero(row).tolist() or [0]:
                        out["target_treeids"].append(t)
                        out["target_nodeids"].append(node)
                        out["target_ids"].append(j)
                        out["target_weights"].append(float(row[j]))
        return out


def leaf_indicator(tables: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``[N, T*L]`` float32: 1 where row ``n`` reaches slot ``l`` of tree ``t`` (see :func:`leaf_tables`)."""
    rows = x.shape[0]
    n_trees, inner, slots = tables["paths"].shape
    chosen = x.to(torch.float32) @ tables["selector"]  # [N, T*I]: each split's feature, exactly
    go_left = (chosen <= tables["threshold"]).to(torch.float32).reshape(rows, n_trees, inner)
    matched = torch.matmul(go_left.transpose(0, 1), tables["paths"]) == tables["lefts"]  # [T, N, L]
    return matched.transpose(0, 1).reshape(rows, n_trees * slots).to(torch.float32)


@torch.library.custom_op("fuserec::tree_ensemble", mutates_args=())
def _tree_ensemble(x: torch.Tensor, key: int) -> torch.Tensor:
    return _ensemble(key).evaluate(x)


@_tree_ensemble.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], _ensemble(key).outputs.shape[1]))


def _ensemble(key: int) -> TreeEnsemble:
    try:
        return _ENSEMBLES[key]
    except KeyError:
        raise RuntimeError(f"tree ensemble {key} is gone: keep its TreeEnsemble alive to score") from None


def _translate(x: Any, key: int) -> Any:
    from onnxscript.onnx_opset import opset_ai_onnx_ml3 as ml

    ensemble = _ensemble(key)
    return ml.TreeEnsembleRegressor(
        x,
        n_targets=int(ensemble.outputs.shape[1]),
        aggregate_function="SUM",
        post_transform="NONE",
        **ensemble.onnx_attributes(),
    )


#: ``custom_translation_table`` for ``torch.onnx.export``: every :class:`TreeEnsemble` call becomes one node.
TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.fuserec.tree_ensemble.default: _translate
}
