"""Biased matrix factorisation fitted by SGD (Funk's "SVD" of the Netflix Prize, as in Surprise's ``SVD``).

``r̂_ui = μ + b_u + b_i + q_iᵀ p_u``, learned by stochastic gradient descent on the squared error with an
L2 penalty applied at every rating (the defaults are Surprise's: 100 factors, 20 epochs, learning rate
0.005, penalty 0.02, factors drawn from N(0, 0.1²)). The SGD is vectorised over minibatches: every rating
of a batch takes its gradient at the same parameters and gradients of a shared user or item add up, which
is per-rating SGD to first order for a small learning rate (one epoch on 80k ratings is well under a
second). Items without training ratings keep zero factors and bias (Surprise's "unknown item").

Only ``μ``, ``b_i`` and ``q_i`` are served. A history's ``(b_u, p_u)`` is folded in at predict time by
ridge regression on its ratings with the item side fixed::

    argmin Σ_{i ∈ h} (r_ui − μ − b_i − b_u − q_iᵀ p_u)² + λ_u (b_u² + ‖p_u‖²),   λ_u = fold_in_reg + reg·|h|

(``reg·|h|`` is the training penalty, which SGD applies once per rating). The fold-in is *not* the fitted
``p_u``: SGD stops after 20 epochs from a random start, far from the penalised optimum for users with few
ratings (early stopping acts as a strong extra prior, and the random initial ``p_u`` leaves noise that a
fold-in does not have). ``fold_in_reg`` stands in for that prior; ``benchmarks/rating.py`` reports both
predictions so the gap is measured (see docs/concepts/rating.md).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from fuserec.histories import Histories
from fuserec.rating import FactorSGDConfig, RatingAlgorithm, RatingData
from fuserec.rating_ops import batch_scatter, ridge_fold_in
from fuserec.rating_torch import entry_count, history_entries, padded_ridge_fold_in


class SVDConfig(FactorSGDConfig):
    factors: int = Field(100, ge=1, description="latent dimensions")
    lr: float = Field(0.005, gt=0.0, le=1.0, description="SGD learning rate of every parameter")


class SVD(RatingAlgorithm):
    Config = SVDConfig
    config: SVDConfig
    global_mean_: float
    item_bias_: np.ndarray
    item_factors_: np.ndarray
    # fitted parameters of the training users: diagnostics of the fold-in gap, not saved
    train_user_bias_: np.ndarray | None
    train_user_factors_: np.ndarray | None

    def fit_ratings(self, data: RatingData) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        mu = data.global_mean
        p = rng.normal(cfg.init_mean, cfg.init_std, (data.n_users, cfg.factors))
        q = rng.normal(cfg.init_mean, cfg.init_std, (data.n_items, cfg.factors))
        bu = np.zeros(data.n_users)
        bi = np.zeros(data.n_items)
        lr, reg = cfg.lr, cfg.reg
        for _ in range(cfg.epochs):
            perm = rng.permutation(len(data.ratings))
            for start in range(0, len(perm), cfg.batch_size):
                batch = perm[start : start + cfg.batch_size]
                u, i, r = data.users[batch], data.items[batch], data.ratings[batch]
                pu, qi = p[u], q[i]
                err = r - (mu + bu[u] + bi[i] + np.einsum("nk,nk->n", pu, qi))
                users, _, to_users = batch_scatter(u)
                items, _, to_items = batch_scatter(i)
                bu[users] += lr * (to_users @ (err - reg * bu[u]))
                bi[items] += lr * (to_items @ (err - reg * bi[i]))
                p[users] += lr * (to_users @ (err[:, None] * qi - reg * pu))
                q[items] += lr * (to_items @ (err[:, None] * pu - reg * qi))
        q[np.bincount(data.items, minlength=data.n_items) == 0] = 0.0
        p[np.bincount(data.users, minlength=data.n_users) == 0] = 0.0
        self.global_mean_, self.item_bias_, self.item_factors_ = mu, bi, q
        self.train_user_bias_, self.train_user_factors_ = bu, p

    def fold_in(self, histories: Histories) -> tuple[np.ndarray, np.ndarray]:
        """``(b_u [B], p_u [B, k])`` of each history: ridge regression with the item side fixed."""
        assert histories.ratings is not None
        targets = histories.ratings - self.global_mean_ - self.item_bias_[histories.items]
        design = np.hstack([np.ones((len(self.item_bias_), 1)), self.item_factors_])
        ridge = self.config.fold_in_reg + self.config.reg * histories.lengths
        x = ridge_fold_in(histories, design, targets, ridge)
        return x[:, 0], x[:, 1:]

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        bu, pu = self.fold_in(histories)
        interaction = np.einsum("bk,bmk->bm", pu, self.item_factors_[items])
        return self.global_mean_ + bu[:, None] + self.item_bias_[items] + interaction

    def fitted_estimate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        bu, pu = getattr(self, "train_user_bias_", None), getattr(self, "train_user_factors_", None)
        if bu is None or pu is None:
            return None
        interaction = np.einsum("nk,nk->n", pu[users], self.item_factors_[items])
        return self.global_mean_ + bu[users] + self.item_bias_[items] + interaction

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        cfg = self.config
        return _SVDModule(
            self.global_mean_, self.item_bias_, self.item_factors_, cfg.fold_in_reg, cfg.reg
        ).eval()

    def model_state(self) -> dict[str, np.ndarray]:
        return {
            "global_mean": np.asarray(self.global_mean_),
            "item_bias": self.item_bias_,
            "item_factors": self.item_factors_,
        }

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.global_mean_ = float(state["global_mean"])
        self.item_bias_ = np.asarray(state["item_bias"], dtype=np.float64)
        self.item_factors_ = np.asarray(state["item_factors"], dtype=np.float64)
        self.train_user_bias_ = self.train_user_factors_ = None


class _SVDModule(torch.nn.Module):
    """:meth:`SVD.estimate` on the padded history: the ridge fold-in of ``(b_u, p_u)`` solved in the graph."""

    item_bias: torch.Tensor
    design: torch.Tensor

    def __init__(
        self,
        global_mean: float,
        item_bias: np.ndarray,
        item_factors: np.ndarray,
        fold_in_reg: float,
        reg: float,
    ) -> None:
        super().__init__()
        design = np.hstack([np.ones((len(item_bias), 1)), item_factors]).astype(np.float64)
        self.register_buffer("item_bias", torch.from_numpy(np.asarray(item_bias, np.float64)))
        self.register_buffer("design", torch.from_numpy(design))  # [1, q_i]: b_u + q_iᵀp_u = design_i · x
        self.global_mean = float(global_mean)
        self.fold_in_reg = float(fold_in_reg)
        self.reg = float(reg)
        self.n_items = len(item_bias)

    def forward(
        self, history: torch.Tensor, history_ratings: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        ids, valid = history_entries(history, self.n_items)
        targets = history_ratings.to(torch.float64) - self.global_mean - self.item_bias[ids]
        ridge = self.fold_in_reg + self.reg * entry_count(valid)
        x = padded_ridge_fold_in(self.design, ids, valid, targets, ridge)  # [B, 1 + k] = (b_u, p_u)
        out = self.global_mean + self.item_bias[items] + (self.design[items] * x.unsqueeze(1)).sum(2)
        return out.to(torch.float32)
