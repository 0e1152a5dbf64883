"""Stacking: gradient-boosted trees over the components' predictions and the meta-features.

A linear blend trusts each rater equally everywhere; trees can learn *where* each is right (the neighbour
model for a well-rated item, the biases for a user with five ratings, a factor model for a user far from
the crowd), which is what the meta-features of :mod:`fuserec.rating_meta` describe. By default the trees
learn the residual of a ridge blend (``residual``): the linear part carries the bulk of the rating and the
trees only its corrections, which takes fewer, shallower trees than rebuilding a weighted mean from
piecewise constants.

LightGBM regression, with early stopping on a held-out share of the rows' groups (users: never a user's
rows on both sides), then refitted on all rows for that many rounds. The trees are served as tensor
arithmetic inside the same graph (:mod:`fuserec.trees`, one ONNX TreeEnsemble when exported), and their
Saabas path attributions give the parts: each component's prediction feature to that component, every
meta-feature (and the spread of the predictions) to ``context``, the trees' root values and the blend's
intercept to ``base``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import FloatRange, IntRange, SearchDim
from fuserec.rating_fuser import LinearParts, RatingFuser, RatingFuserConfig, ridge
from fuserec.rating_meta import META_FEATURES
from fuserec.trees import TreeEnsemble, base_value, booster_arrays

TREE_KEYS = ("feature", "threshold", "left", "right", "value", "is_leaf", "depth")


class StackerConfig(RatingFuserConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "learning_rate": FloatRange(0.01, 0.2, log=True),
        "num_leaves": IntRange(7, 127, log=True),
        "min_child_samples": IntRange(20, 2000, log=True),
    }

    #: Measured on validation rows (out-of-fold rows of ML-100k's 5 training folds, scored over 5 folds of
    #: users): 0.9080 with the residual against 0.9087 without, better in every fold. On the test folds the
    #: two were within noise (0.8942 and 0.8938).
    residual: bool = Field(True, description="trees learn the residual of a ridge blend (else the rating)")
    alpha: float = Field(1.0, ge=0.0, description="L2 penalty of the blend's weights (residual mode)")
    spread: bool = Field(True, description="add the spread (std) of the components' predictions as a feature")
    n_estimators: int = Field(2000, ge=1, description="most boosting rounds; early stopping picks fewer")
    learning_rate: float = Field(0.05, gt=0.0, le=1.0)
    num_leaves: int = Field(31, ge=2)
    max_depth: int = Field(8, ge=1)
    min_child_samples: int = Field(200, ge=1)
    feature_fraction: float = Field(0.9, gt=0.0, le=1.0)
    bagging_fraction: float = Field(0.8, gt=0.0, le=1.0)
    lambda_l2: float = Field(1.0, ge=0.0)
    holdout: float = Field(0.1, gt=0.0, lt=1.0, description="share of groups (users) held out to stop early")
    early_stopping: int = Field(50, ge=1, description="rounds without held-out gain before stopping")
    refit: bool = Field(True, description="refit on every row for the chosen rounds (else keep the probe)")
    #: 1 thread: on a busy 2-core machine LightGBM's OpenMP threads spin against each other (8x slower
    #: with 2 threads than with 1 on planted data while other processes ran).
    threads: int = Field(1, ge=1, description="LightGBM threads")


class StackerParts(torch.nn.Module):
    """Trees (and the blend, in residual mode) as parts ``[N, M + 2]``."""

    def __init__(self, trees: TreeEnsemble, base: float, linear: LinearParts, spread: bool) -> None:
        super().__init__()
        self.trees = trees  # holds the ensemble alive: the torch op finds it by key
        self.base = float(base)
        self.linear = linear
        self.spread = spread

    def forward(self, predictions: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        predictions = predictions.to(torch.float32)
        columns = [predictions, meta.to(torch.float32)]
        if self.spread:
            columns.append(predictions.std(dim=1, keepdim=True, correction=0))
        out = self.trees(torch.cat(columns, dim=1))  # [N, 1 + M + 1]: value, then grouped attributions
        trees = torch.cat([out[:, 1:], torch.full_like(out[:, :1], self.base)], dim=1)
        return trees + self.linear(predictions, meta)


class Stacker(RatingFuser):
    Config = StackerConfig
    config: StackerConfig
    weights_: np.ndarray
    intercept_: float
    trees_: dict[str, np.ndarray]
    rounds_: int
    importance_: np.ndarray
    holdout_rmse_: float

    def feature_names(self, m: int) -> list[str]:
        return [f"prediction_{k}" for k in range(m)] + list(META_FEATURES) + (["spread"] * self.config.spread)

    def features(self, predictions: np.ndarray, meta: np.ndarray) -> np.ndarray:
        columns = [predictions, meta]
        if self.config.spread:
            spread = predictions.astype(np.float32).std(axis=1, keepdims=True)
            columns.append(spread)
        return np.hstack(columns).astype(np.float32).astype(np.float64)

    def fit_arrays(
        self, predictions: np.ndarray, meta: np.ndarray, target: np.ndarray, groups: np.ndarray
    ) -> None:
        import lightgbm as lgb

        cfg = self.config
        m = predictions.shape[1]
        if cfg.residual:
            self.weights_, self.intercept_ = ridge(predictions, target, cfg.alpha)
            target = target - (predictions @ self.weights_ + self.intercept_)
        else:
            self.weights_, self.intercept_ = np.zeros(m), 0.0
        x = self.features(predictions, meta)
        uniq, index = np.unique(groups, return_inverse=True)
        held = (np.random.default_rng(cfg.seed).random(len(uniq)) < cfg.holdout)[index]
        if held.all() or not held.any():  # too few groups to hold any out: hold rows out instead
            held = np.random.default_rng(cfg.seed).random(len(target)) < cfg.holdout
        params = {
            "objective": "regression",
            "learning_rate": cfg.learning_rate,
            "num_leaves": cfg.num_leaves,
            "max_depth": cfg.max_depth,
            "min_child_samples": cfg.min_child_samples,
            "feature_fraction": cfg.feature_fraction,
            "bagging_fraction": cfg.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": cfg.lambda_l2,
            "seed": cfg.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": cfg.threads,
            "verbose": -1,
        }
        fit_set = lgb.Dataset(x[~held], target[~held], free_raw_data=False)
        hold_set = lgb.Dataset(x[held], target[held], reference=fit_set, free_raw_data=False)
        probe = lgb.train(
            params,
            fit_set,
            num_boost_round=cfg.n_estimators,
            valid_sets=[hold_set],
            callbacks=[lgb.early_stopping(cfg.early_stopping, verbose=False)],
        )
        self.rounds_ = int(probe.best_iteration or cfg.n_estimators)
        self.holdout_rmse_ = float(probe.best_score["valid_0"]["l2"] ** 0.5)
        booster = (
            lgb.train(params, lgb.Dataset(x, target), num_boost_round=self.rounds_)
            if cfg.refit
            else lgb.Booster(model_str=probe.model_to_string(num_iteration=self.rounds_))
        )
        n_features = x.shape[1]
        self.trees_ = booster_arrays(booster, n_features)
        self.importance_ = np.asarray(booster.feature_importance(importance_type="gain"), np.float64)

    def owners(self, m: int) -> np.ndarray:
        """``[F, M + 1]``: each tree feature's part (its component, or ``context``)."""
        n_features = len(self.feature_names(m))
        owner = np.zeros((n_features, m + 1))
        owner[np.arange(m), np.arange(m)] = 1.0
        owner[m:, m] = 1.0
        return owner

    def to_torch(self) -> torch.nn.Module:
        assert self.n_components_ is not None
        m = self.n_components_
        n_features = len(self.feature_names(m))
        trees = TreeEnsemble(self.trees_, n_features, self.owners(m))
        base = float(base_value(self.trees_))
        return StackerParts(
            trees, base, LinearParts(self.weights_, np.asarray([self.intercept_])), self.config.spread
        )

    def summary(self, components: list[str]) -> dict[str, Any]:
        names = components + list(META_FEATURES) + (["spread"] * self.config.spread)
        total = max(float(self.importance_.sum()), 1e-12)
        return {
            "rounds": self.rounds_,
            "holdout_rmse": self.holdout_rmse_,
            "gain_share": {n: float(g) / total for n, g in zip(names, self.importance_, strict=True)},
            "blend_weights": dict(zip(components, map(float, self.weights_), strict=True)),
            "blend_intercept": self.intercept_,
        }

    def model_state(self) -> dict[str, np.ndarray]:
        state = {f"tree_{k}": v for k, v in self.trees_.items()}
        return state | {
            "weights": self.weights_,
            "intercept": np.asarray(self.intercept_),
            "rounds": np.asarray(self.rounds_, np.int64),
            "importance": self.importance_,
            "holdout_rmse": np.asarray(self.holdout_rmse_),
        }

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.trees_ = {k: np.asarray(state[f"tree_{k}"]) for k in TREE_KEYS}
        self.weights_ = np.asarray(state["weights"], np.float64)
        self.intercept_ = float(state["intercept"])
        self.rounds_ = int(state["rounds"])
        self.importance_ = np.asarray(state["importance"], np.float64)
        self.holdout_rmse_ = float(state["holdout_rmse"])
