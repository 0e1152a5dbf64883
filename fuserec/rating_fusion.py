"""Fused rating prediction: learn to combine raters from out-of-fold predictions of the training ratings.

A fuser must learn from predictions the raters made *without* the ratings they predict, or it learns to
trust whichever rater overfits most. The usual fix, a validation carve, leaves the fuser few rows (10% of
train). Cross-fitting gives it all of them: the training ratings are cut into ``folds`` (seeded); for each
fold every component is fitted on the other folds and predicts that fold's ratings from the user's history
in the other folds (the fold-in served predictions use), and the meta-features
(:mod:`fuserec.rating_meta`) come from the other folds' ratings too. So every training rating gets honest
component predictions, computed the way a served prediction is. The components are then refitted on the
whole training set for serving; the fusers (:mod:`fuserec.rating_fuser` plugins) are fitted on the
out-of-fold rows. ``crossfit=False`` is the cheaper single carve (one fold of ``carve`` of the ratings).

Which predictor to serve is chosen out of fold as well (:func:`select_predictor`): every fuser is fitted on
the out-of-fold rows of four fifths of the users and scored on the rest, beside each single component on
the same rows; the lowest RMSE wins and the ranking says why.

:func:`fit_rating_ensemble` does all of it; the pipeline and ``benchmarks/rating.py`` both call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fuserec.rating import RatingAlgorithm, RatingConfig, RatingData, RatingSide
from fuserec.rating_ensemble import RatingEnsemble, plugin_name
from fuserec.rating_fuser import RatingFuser, RatingFuserConfig
from fuserec.rating_meta import META_FEATURES, ItemStats, pair_meta

ComponentConfigs = Mapping[str, RatingConfig | dict[str, Any] | None]
FuserConfigs = Mapping[str, RatingFuserConfig | dict[str, Any] | None]
Log = Callable[[str], None]


def make_component(key: str, config: RatingConfig | dict[str, Any] | None) -> RatingAlgorithm:
    from fuserec.registry import get_rater

    return get_rater(plugin_name(key))(config)


def make_fuser(key: str, config: RatingFuserConfig | dict[str, Any] | None) -> RatingFuser:
    from fuserec.registry import get_rating_fuser

    return get_rating_fuser(plugin_name(key))(config)


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold rows: ``frame`` has ``user, item, rating, fold``, ``pred:<component>`` (clipped) and
    ``meta:<feature>`` columns, in the training frame's row order (rows never predicted are dropped)."""

    frame: pd.DataFrame
    names: list[str]
    seconds: dict[str, float]

    @property
    def predictions(self) -> np.ndarray:
        return self.frame[[f"pred:{n}" for n in self.names]].to_numpy(np.float32)

    @property
    def meta(self) -> np.ndarray:
        return self.frame[[f"meta:{f}" for f in META_FEATURES]].to_numpy(np.float64)

    @property
    def target(self) -> np.ndarray:
        return self.frame["rating"].to_numpy(np.float64)

    @property
    def users(self) -> np.ndarray:
        return self.frame["user"].to_numpy(np.int64)


def fold_ids(n: int, folds: int, seed: int, crossfit: bool = True, carve: float = 0.1) -> np.ndarray:
    """``int64 [n]``: each rating's validation fold (shuffled equal folds), or 0 for a ``carve`` share and -1
    (never predicted) for the rest when not cross-fitting."""
    rng = np.random.default_rng(seed)
    if not crossfit:
        return np.where(rng.random(n) < carve, 0, -1).astype(np.int64)
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    out = np.empty(n, dtype=np.int64)
    for k, rows in enumerate(np.array_split(rng.permutation(n), folds)):
        out[rows] = k
    return out


def out_of_fold(
    train: pd.DataFrame,
    n_users: int,
    n_items: int,
    components: ComponentConfigs,
    folds: int = 5,
    seed: int = 42,
    side: RatingSide | None = None,
    crossfit: bool = True,
    carve: float = 0.1,
    log: Log | None = None,
) -> OutOfFold:
    """Every component's prediction of every held-out training rating, fitted without it (module doc)."""
    train = train.reset_index(drop=True)
    fold = fold_ids(len(train), folds, seed, crossfit, carve)
    names = list(components)
    preds = np.full((len(train), len(names)), np.nan, dtype=np.float32)
    meta = np.full((len(train), len(META_FEATURES)), np.nan)
    seconds = dict.fromkeys(names, 0.0)
    for k in np.unique(fold[fold >= 0]):
        held = np.flatnonzero(fold == k)
        rest = train.iloc[np.flatnonzero(fold != k)]
        histories = RatingData.from_frame(rest, n_users, n_items).histories()
        users = train["user"].to_numpy(np.int64)[held]
        items = train["item"].to_numpy(np.int64)[held]
        meta[held] = pair_meta(histories, users, items, ItemStats.from_frame(rest, n_items))
        for j, name in enumerate(names):
            start = time.perf_counter()
            model = make_component(name, components[name]).fit(rest, n_users, n_items, side)
            preds[held, j] = model.predict_pairs(histories, users, items)
            seconds[name] += time.perf_counter() - start
            if log:
                log(f"  validation fold {k + 1}: {name} {time.perf_counter() - start:.1f}s")
    keep = fold >= 0
    frame = train.loc[keep, ["user", "item", "rating"]].copy()
    frame["fold"] = fold[keep]
    for j, name in enumerate(names):
        frame[f"pred:{name}"] = preds[keep, j]
    for f, feature in enumerate(META_FEATURES):
        frame[f"meta:{feature}"] = meta[keep, f]
    return OutOfFold(frame.reset_index(drop=True), names, seconds)


def errors(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    diff = np.asarray(pred, np.float64) - np.asarray(actual, np.float64)
    return {"rmse": float(np.sqrt(np.mean(diff**2))), "mae": float(np.mean(np.abs(diff)))}


def user_folds(users: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """``int64 [n]``: a fold per row such that all rows of a user share one (users shuffled with ``seed``)."""
    uniq, index = np.unique(users, return_inverse=True)
    of_user = np.empty(len(uniq), dtype=np.int64)
    of_user[np.random.default_rng(seed).permutation(len(uniq))] = np.arange(len(uniq)) % folds
    return of_user[index]


def select_predictor(
    oof: OutOfFold,
    fusers: FuserConfigs,
    rating_range: tuple[float, float],
    holdout: float = 0.2,
    seed: int = 42,
    selection_folds: int = 1,
) -> dict[str, Any]:
    """Each fuser and each component scored on out-of-fold rows of users the fuser was not fitted on.

    ``selection_folds == 1``: one group of about ``holdout`` of the users is scored (fusers fitted on the
    others); ``k >= 2``: k folds over users, every row scored once (k fits per fuser). Returns
    ``{"ranking": [{"name", "kind", "rmse", "mae"}, ...] best first, "chosen", "reason", "holdout_users",
    "holdout_rows"}``.
    """
    users = oof.users
    if selection_folds >= 2:
        fold = user_folds(users, selection_folds, seed + 1)
    else:
        fold = np.where(user_folds(users, max(round(1 / holdout), 2), seed + 1) == 0, 0, -1)
    scored = fold >= 0
    if len(np.unique(fold)) < 2:
        raise ValueError("selection needs users on both sides: too few users for this holdout share")
    preds, meta, target = oof.predictions, oof.meta, oof.target
    low, high = rating_range
    ranking: list[dict[str, Any]] = []
    for name, config in fusers.items():
        start = time.perf_counter()
        fused = np.zeros(len(target), np.float32)
        for k in np.unique(fold[scored]):
            held, rest = fold == k, fold != k
            fuser = make_fuser(name, config).fit(preds[rest], meta[rest], target[rest], users[rest])
            fused[held] = np.clip(fuser.combine(preds[held], meta[held])[0], low, high)
        seconds = round(time.perf_counter() - start, 3)
        ranking.append(
            {"name": name, "kind": "fuser", **errors(fused[scored], target[scored]), "fit_s": seconds}
        )
    for j, name in enumerate(oof.names):
        ranking.append({"name": name, "kind": "component", **errors(preds[scored, j], target[scored])})
    ranking.sort(key=lambda r: r["rmse"])
    best = ranking[0]
    reason = f"{best['kind']} {best['name']} has the lowest validation RMSE ({best['rmse']:.4f})"
    if len(ranking) > 1:
        runner = ranking[1]
        reason += f", ahead of {runner['kind']} {runner['name']} ({runner['rmse']:.4f})"
    how = f"{selection_folds} folds over users" if selection_folds >= 2 else "held-out users"
    return {
        "ranking": ranking,
        "chosen": best["name"],
        "reason": reason + f"; out-of-fold rows of {int(scored.sum())} ratings, {how}",
        "holdout_users": len(np.unique(users[scored])),
        "holdout_rows": int(scored.sum()),
    }


def fit_rating_ensemble(
    train: pd.DataFrame,
    n_users: int,
    n_items: int,
    components: ComponentConfigs,
    fusers: FuserConfigs,
    folds: int = 5,
    seed: int = 42,
    side: RatingSide | None = None,
    choose: str = "auto",
    crossfit: bool = True,
    carve: float = 0.1,
    holdout: float = 0.2,
    selection_folds: int = 1,
    fitted: Mapping[str, RatingAlgorithm] | None = None,
    log: Log | None = None,
) -> tuple[RatingEnsemble, dict[str, Any], pd.DataFrame]:
    """Cross-fit, fit the fusers, refit the components on ``train``, choose what to serve.

    ``components``: name -> rater config (``"svd@big"`` names a second ``svd``); ``fusers``: name -> fuser
    config. ``choose``: ``"auto"`` (the lowest validation RMSE among fusers and components) or a name.
    ``fitted``: components already fitted on exactly ``train`` (e.g. the pipeline's train stage), used
    instead of refitting them. ``holdout`` / ``selection_folds``: how the choice is validated
    (:func:`select_predictor`). Returns the ensemble, the report (ranking, reason, learned weights, timings)
    and the out-of-fold frame.
    """
    if not components:
        raise ValueError("fit_rating_ensemble needs at least one component")
    if choose != "auto" and choose not in components and choose not in fusers:
        raise ValueError(f"choose must be 'auto', a component {list(components)} or a fuser {list(fusers)}")
    start = time.perf_counter()
    oof = out_of_fold(train, n_users, n_items, components, folds, seed, side, crossfit, carve, log)
    crossfit_s = time.perf_counter() - start
    ratings = train["rating"].to_numpy(np.float64)
    rating_range = (float(ratings.min()), float(ratings.max()))
    selection = select_predictor(oof, fusers, rating_range, holdout, seed, selection_folds)
    fitted_fusers: dict[str, RatingFuser] = {}
    fuser_s: dict[str, float] = {}
    preds, meta, target, users = oof.predictions, oof.meta, oof.target, oof.users
    for name, fuser_config in fusers.items():
        begin = time.perf_counter()
        fitted_fusers[name] = make_fuser(name, fuser_config).fit(preds, meta, target, users)
        fuser_s[name] = time.perf_counter() - begin
    models: dict[str, RatingAlgorithm] = {}
    refit_s: dict[str, float] = {}
    for name, config in components.items():
        begin = time.perf_counter()
        given = (fitted or {}).get(name)
        models[name] = (
            given if given is not None else make_component(name, config).fit(train, n_users, n_items, side)
        )
        refit_s[name] = time.perf_counter() - begin
    chosen = selection["chosen"] if choose == "auto" else choose
    names = list(components)
    report = {
        "components": names,
        "fusers": list(fusers),
        "validation": {
            "method": f"cross-fitting, {folds} folds" if crossfit else f"one carve of {carve:.0%}",
            "rows": len(oof.frame),
            "seed": seed,
        },
        "selection": selection,
        "chosen": chosen,
        "reason": selection["reason"] if choose == "auto" else f"{chosen} was asked for (choose={choose!r})",
        "learned": {n: f.summary(names) for n, f in fitted_fusers.items()},
        "out_of_fold": {n: errors(preds[:, j], target) for j, n in enumerate(names)},
        "seconds": {
            "crossfit": crossfit_s,
            "crossfit_per_component": oof.seconds,
            "fusers": fuser_s,
            "refit": refit_s,
            "total": time.perf_counter() - start,
        },
    }
    ensemble = RatingEnsemble(
        models, ItemStats.from_frame(train, n_items), fitted_fusers, chosen, rating_range, report
    )
    return ensemble, report, oof.frame


__all__ = [
    "OutOfFold",
    "RatingEnsemble",
    "errors",
    "fit_rating_ensemble",
    "fold_ids",
    "make_component",
    "make_fuser",
    "out_of_fold",
    "select_predictor",
]
