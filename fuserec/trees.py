"""Gradient-boosted trees as tensor arithmetic, so a LightGBM ranker runs inside the exported torch graph.

A learned fuser is only useful if the served model is still one ONNX file: the ranker has to sit between
the components' scores and the top-k. LightGBM's own ONNX converter would need graph surgery to splice
its TreeEnsemble into the torch export; walking the trees with gathers in torch gives the same numbers,
exports with the rest, and yields Saabas path attributions (which feature moved the score) for free.
"""

from __future__ import annotations

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


def predict_trees(
    arrays: dict[str, torch.Tensor], x: torch.Tensor, n_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble output ``[N]`` and per-feature path attributions ``[N, n_features]`` for rows ``x [N, F]``.

    Output = sum of the roots' values + attributions.sum(1): each step from node to child adds
    ``value[child] - value[node]`` to the node's split feature (Saabas). Comparisons run in float64 like
    LightGBM's, so a float32 feature equal to a threshold goes the same way as in training.
    """
    feature, threshold = arrays["feature"], arrays["threshold"]
    left, right, value, is_leaf = arrays["left"], arrays["right"], arrays["value"], arrays["is_leaf"]
    n_trees, width = feature.shape
    rows = x.shape[0]
    xd = x.to(torch.float64)
    offset = (torch.arange(n_trees, device=x.device, dtype=torch.int64) * width).unsqueeze(0)
    node = torch.zeros(rows, n_trees, dtype=torch.int64, device=x.device)
    attributions = torch.zeros(rows, n_features + 1, dtype=torch.float64, device=x.device)
    flat_feature, flat_threshold = feature.reshape(-1), threshold.reshape(-1)
    flat_left, flat_right, flat_value = left.reshape(-1), right.reshape(-1), value.reshape(-1)
    flat_leaf = is_leaf.reshape(-1)
    for _ in range(int(arrays["depth"])):
        flat = node + offset
        split = flat_feature[flat]
        go_left = torch.gather(xd, 1, split) <= flat_threshold[flat]
        child = torch.where(go_left, flat_left[flat], flat_right[flat])
        delta = flat_value[child + offset] - flat_value[flat]
        target = torch.where(flat_leaf[flat], torch.full_like(split, n_features), split)
        attributions = attributions.scatter_add(1, target, delta)
        node = child
    out = flat_value[node + offset].sum(dim=1)
    return out, attributions[:, :n_features]


def base_value(arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the trees' root values: the output before any split is read."""
    return arrays["value"][:, 0].sum()
