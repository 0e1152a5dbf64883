"""What to export: each fitted fuser's and model's score on validation users it was not fitted on.

``export.algorithm: auto`` serves the best of them. Every candidate is judged on the validation carve
(components fitted on train', truth = the validation split; test is never read) by the metric tuning
maximises (``tune.metric``), with the evaluation's metric code. A fuser learns on those same validation
users, so its in-sample score would flatter it; each candidate is scored where it could not have learned:

- a model fitted on train' (a fused component) learned nothing from validation: every validation user;
- a fuser that held users out while fitting (stacking's folds, the torch fusers' early stopping) keeps
  its lists for them (:class:`~fuserec.fusion.HeldOut`): nothing is fitted again;
- any other fuser (weighted, the voting ones, a third-party plugin) is cross-fitted: fitted again on all
  but one of :data:`FOLDS` folds of the validation users and scored on the fold left out, in turn.

Then every candidate is scored on the same users: those every candidate has held out (with the torch
fusers, their early-stopping share; otherwise every validation user). Scores of different users would
compare how easy the users were as much as the candidates.

Left out, with the reason on record: a fuser that fell back to one component (that component is a
candidate itself), and a trained model without a fit on train' (not among ``fuse.components``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fuserec.api import Algorithm
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.fusion import HELD_OUT_DEPTH, Fuser, HeldOut
from fuserec.metrics import PER_USER_METRICS, evaluate_rankings, rank_together

FOLDS = 5  # cross-fitting folds of validation users, for fusers that hold none out themselves
ALL_USERS = "fitted on train': every validation user is held out"
CROSS_FITTED = f"cross-fitted: {FOLDS} folds of validation users, each scored by a fit on the others"
RANKED_METRICS = (*PER_USER_METRICS, "coverage", "novelty")


@dataclass(frozen=True)
class FittedFuser:
    """What the fuse stage knows of a fitted fuser when it chooses: its held-out lists, or how to refit it."""

    name: str
    held_out: HeldOut | None
    served_alone: str | None
    refit: Callable[[pd.DataFrame], Fuser]  # a fresh fit on these validation rows (train' components)


def parse_metric(metric: str) -> tuple[str, int]:
    """``("ndcg", 10)`` from ``"ndcg@10"``; the error lists what can be chosen on."""
    name, _, k = metric.partition("@")
    if name not in RANKED_METRICS or not k.isdigit() or not 1 <= int(k) <= HELD_OUT_DEPTH:
        raise ValueError(
            f"tune.metric is {metric!r}; the export is chosen on metric@k with metric one of "
            f"{', '.join(RANKED_METRICS)} and 1 <= k <= {HELD_OUT_DEPTH}, e.g. ndcg@10"
        )
    return name, int(k)


def select(
    metric: str,
    inner: Dataset,
    valid: pd.DataFrame,
    models: Mapping[str, Algorithm],
    fusers: list[FittedFuser],
    left_out: dict[str, str],
    seed: int,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """The record ``selection.json`` holds: every candidate's validation ``metric`` and the best one.

    ``inner``: train'; ``valid``: the validation truth; ``models``: fits on train' (every one a candidate);
    ``left_out``: names that cannot be candidates, with why. Ties go to a single model (a smaller graph).
    """
    _, k = parse_metric(metric)
    users = np.unique(valid["user"].to_numpy())
    hist, seen = inner.histories(), inner.matrix()
    lists: dict[str, tuple[str, HeldOut]] = {}
    if models:
        ranked = rank_together(
            {n: m.score for n, m in models.items()}, hist.select, users, seen, k, batch_size
        )
        lists |= {n: ("model", HeldOut(users, top, ALL_USERS)) for n, top in ranked.items()}
    left_out = dict(left_out)
    refit: dict[str, Callable[[pd.DataFrame], Fuser]] = {}
    for fuser in fusers:
        if fuser.served_alone is not None:
            left_out[fuser.name] = f"serves {fuser.served_alone} alone, which is a candidate itself"
        elif fuser.held_out is not None and len(fuser.held_out.users):
            lists[fuser.name] = ("fuser", fuser.held_out)
        else:
            refit[fuser.name] = fuser.refit
    lists |= {n: ("fuser", held) for n, held in cross_fit(refit, inner, valid, k, seed, batch_size).items()}
    truth, popularity = interactions_matrix(valid, inner.n_users, inner.n_items), inner.item_popularity()
    common = users
    for _, held in lists.values():
        common = np.intersect1d(common, held.users)
    candidates: dict[str, dict[str, Any]] = {}
    for name, (kind, held) in lists.items():
        rows = np.isin(held.users, common) if len(common) else np.ones(len(held.users), dtype=bool)
        values = evaluate_rankings(held.top[rows, :k], truth[held.users[rows]], [k], popularity)
        candidates[name] = {
            "kind": kind,
            metric: round(float(values[metric]), 6),
            "n_users": int(values["n_users"]),
            "held_out_users": len(held.users),
            "method": held.method,
        }

    def rank(name: str) -> tuple[float, bool, str]:
        value = candidates[name][metric] if candidates[name]["n_users"] else float("nan")
        return (-value if np.isfinite(value) else np.inf, candidates[name]["kind"] != "model", name)

    order = sorted(candidates, key=rank)
    best = order[0] if order and np.isfinite(rank(order[0])[0]) else None
    return {
        "metric": metric,
        "chosen": best,
        "carve": "validation: components fitted on train', truth = the validation split; test is not read",
        "users": f"the {len(common)} validation users every candidate held out"
        if len(common)
        else "no user is held out by every candidate: each is scored on its own held-out users",
        "candidates": {n: candidates[n] for n in order},
        "left_out": dict(sorted(left_out.items())),
    }


def cross_fit(
    refit: Mapping[str, Callable[[pd.DataFrame], Fuser]],
    inner: Dataset,
    valid: pd.DataFrame,
    k: int,
    seed: int,
    batch_size: int = 1024,
) -> dict[str, HeldOut]:
    """Each fuser's top-``k`` lists for every validation user, from a fit on the other folds' users."""
    if not refit:
        return {}
    users = np.unique(valid["user"].to_numpy())
    fold_of = np.empty(len(users), dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(len(users))] = np.arange(len(users)) % FOLDS
    in_fold = dict(zip(users.tolist(), fold_of.tolist(), strict=True))
    row_fold = valid["user"].map(in_fold).to_numpy()
    hist, seen = inner.histories(), inner.matrix()
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in refit}
    for fold in range(min(FOLDS, len(users))):
        held = users[fold_of == fold]
        fitted = {name: make(valid[row_fold != fold]) for name, make in refit.items()}
        ranked = rank_together(
            {n: f.score for n, f in fitted.items()}, hist.select, held, seen, k, batch_size
        )
        for name, top in ranked.items():
            parts[name].append((held, top))
        del fitted
    return {
        name: HeldOut(np.concatenate([u for u, _ in p]), np.concatenate([t for _, t in p]), CROSS_FITTED)
        for name, p in parts.items()
    }
