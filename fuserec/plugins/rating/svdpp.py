"""SVD++ (Koren 2008): biased factorisation plus the implicit feedback of which items a user rated.

``r̂_ui = μ + b_u + b_i + q_iᵀ (p_u + |N(u)|^-½ Σ_{j ∈ N(u)} y_j)``, ``N(u)`` the items ``u`` rated. The
``y_j`` are what makes it a history model: the implicit term is a function of the history alone. SGD with
a penalty at every rating, vectorised over minibatches as in :mod:`fuserec.plugins.rating.svd` (defaults
are Surprise's ``SVDpp``: 20 factors, 20 epochs, learning rate 0.007, penalty 0.02). A rating of user u
moves every ``y_j`` of ``N(u)``; per batch that is two sparse products with the rows of the normalised
user x item matrix, never a loop over ratings.

At predict time the implicit term comes from the history's rated items, then ``(b_u, p_u)`` are folded
in by the same ridge regression as SVD's, on the residual ``r − μ − b_i − q_iᵀ z_u``, with
``λ_u = fold_in_reg + reg·|h|``. The gap to the fitted ``p_u`` has the same origin as SVD's (early
stopping, random start) and is reported by ``benchmarks/rating.py``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.histories import Histories
from fuserec.rating import FactorSGDConfig, RatingAlgorithm, RatingData, history_rows
from fuserec.rating_ops import batch_scatter, ridge_fold_in
from fuserec.rating_torch import (
    entry_count,
    first_occurrences,
    history_entries,
    padded_ridge_fold_in,
    ratio,
)


class SVDppConfig(FactorSGDConfig):
    factors: int = Field(20, ge=1, description="latent dimensions")
    lr: float = Field(0.007, gt=0.0, le=1.0, description="SGD learning rate of every parameter")


def implicit_matrix(histories: Histories) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """``(N, B)``: the binary rated-items matrix ``B`` and ``N`` = its rows scaled by ``|N(u)|^-½``."""
    binary = histories.to_csr().astype(np.float64)
    counts = np.asarray(binary.sum(axis=1)).ravel()
    scale = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1.0)), 0.0)
    return sp.csr_matrix(sp.diags(scale) @ binary), sp.csr_matrix(binary)


class SVDpp(RatingAlgorithm):
    Config = SVDppConfig
    config: SVDppConfig
    global_mean_: float
    item_bias_: np.ndarray
    item_factors_: np.ndarray
    implicit_factors_: np.ndarray
    # fitted parameters of the training users (and their implicit term): diagnostics, not saved
    train_user_bias_: np.ndarray | None
    train_user_factors_: np.ndarray | None
    train_implicit_: np.ndarray | None

    def fit_ratings(self, data: RatingData) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        mu = data.global_mean
        k = cfg.factors
        p = rng.normal(cfg.init_mean, cfg.init_std, (data.n_users, k))
        q = rng.normal(cfg.init_mean, cfg.init_std, (data.n_items, k))
        y = rng.normal(cfg.init_mean, cfg.init_std, (data.n_items, k))
        bu = np.zeros(data.n_users)
        bi = np.zeros(data.n_items)
        norm, binary = implicit_matrix(data.histories())
        lr, reg = cfg.lr, cfg.reg
        for _ in range(cfg.epochs):
            perm = rng.permutation(len(data.ratings))
            for start in range(0, len(perm), cfg.batch_size):
                batch = perm[start : start + cfg.batch_size]
                u, i, r = data.users[batch], data.items[batch], data.ratings[batch]
                users, user_of, to_users = batch_scatter(u)
                items, _, to_items = batch_scatter(i)
                rows_norm = norm[users]
                implicit = np.asarray(rows_norm @ y)[user_of]
                pu, qi = p[u], q[i]
                z = pu + implicit
                err = r - (mu + bu[u] + bi[i] + np.einsum("nk,nk->n", z, qi))
                # y_j of every j in N(u) gets err·q_i/√|N(u)| − reg·y_j, once per rating of u in the batch
                per_user = to_users @ (err[:, None] * qi)
                per_user_count = np.bincount(user_of, minlength=len(users)).astype(np.float64)
                grad_y = rows_norm.T @ per_user - reg * (binary[users].T @ per_user_count)[:, None] * y
                bu[users] += lr * (to_users @ (err - reg * bu[u]))
                bi[items] += lr * (to_items @ (err - reg * bi[i]))
                p[users] += lr * (to_users @ (err[:, None] * qi - reg * pu))
                q[items] += lr * (to_items @ (err[:, None] * z - reg * qi))
                y += lr * grad_y
        unseen = np.bincount(data.items, minlength=data.n_items) == 0
        q[unseen] = 0.0
        y[unseen] = 0.0
        p[np.bincount(data.users, minlength=data.n_users) == 0] = 0.0
        self.global_mean_, self.item_bias_, self.item_factors_, self.implicit_factors_ = mu, bi, q, y
        self.train_user_bias_, self.train_user_factors_ = bu, p
        self.train_implicit_ = norm @ y

    def implicit_term(self, histories: Histories) -> np.ndarray:
        """``float64 [B, k]``: ``|N(u)|^-½ Σ_{j ∈ h} y_j`` of each history (its distinct rated items)."""
        norm, _ = implicit_matrix(histories)
        return np.asarray(norm @ self.implicit_factors_)

    def fold_in(self, histories: Histories) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(b_u [B], p_u [B, k], z_u [B, k])``: ridge fold-in given the implicit term ``z_u``."""
        assert histories.ratings is not None
        z = self.implicit_term(histories)
        entries = histories.items
        rows = history_rows(histories)
        targets = (
            histories.ratings
            - self.global_mean_
            - self.item_bias_[entries]
            - np.einsum("nk,nk->n", self.item_factors_[entries], z[rows])
        )
        design = np.hstack([np.ones((len(self.item_bias_), 1)), self.item_factors_])
        ridge = self.config.fold_in_reg + self.config.reg * histories.lengths
        x = ridge_fold_in(histories, design, targets, ridge)
        return x[:, 0], x[:, 1:], z

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        bu, pu, z = self.fold_in(histories)
        interaction = np.einsum("bk,bmk->bm", pu + z, self.item_factors_[items])
        return self.global_mean_ + bu[:, None] + self.item_bias_[items] + interaction

    def fitted_estimate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        bu = getattr(self, "train_user_bias_", None)
        pu = getattr(self, "train_user_factors_", None)
        z = getattr(self, "train_implicit_", None)
        if bu is None or pu is None or z is None:
            return None
        interaction = np.einsum("nk,nk->n", pu[users] + z[users], self.item_factors_[items])
        return self.global_mean_ + bu[users] + self.item_bias_[items] + interaction

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        cfg = self.config
        return _SVDppModule(
            self.global_mean_,
            self.item_bias_,
            self.item_factors_,
            self.implicit_factors_,
            cfg.fold_in_reg,
            cfg.reg,
        ).eval()

    def model_state(self) -> dict[str, np.ndarray]:
        return {
            "global_mean": np.asarray(self.global_mean_),
            "item_bias": self.item_bias_,
            "item_factors": self.item_factors_,
            "implicit_factors": self.implicit_factors_,
        }

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.global_mean_ = float(state["global_mean"])
        self.item_bias_ = np.asarray(state["item_bias"], dtype=np.float64)
        self.item_factors_ = np.asarray(state["item_factors"], dtype=np.float64)
        self.implicit_factors_ = np.asarray(state["implicit_factors"], dtype=np.float64)
        self.train_user_bias_ = self.train_user_factors_ = self.train_implicit_ = None


class _SVDppModule(torch.nn.Module):
    """:meth:`SVDpp.estimate` on the padded history: implicit term, then the ridge fold-in in the graph."""

    item_bias: torch.Tensor
    design: torch.Tensor
    implicit_factors: torch.Tensor

    def __init__(
        self,
        global_mean: float,
        item_bias: np.ndarray,
        item_factors: np.ndarray,
        implicit_factors: np.ndarray,
        fold_in_reg: float,
        reg: float,
    ) -> None:
        super().__init__()
        design = np.hstack([np.ones((len(item_bias), 1)), item_factors]).astype(np.float64)
        self.register_buffer("item_bias", torch.from_numpy(np.asarray(item_bias, np.float64)))
        self.register_buffer("design", torch.from_numpy(design))  # [1, q_i]
        self.register_buffer("implicit_factors", torch.from_numpy(np.asarray(implicit_factors, np.float64)))
        self.global_mean = float(global_mean)
        self.fold_in_reg = float(fold_in_reg)
        self.reg = float(reg)
        self.n_items = len(item_bias)

    def forward(
        self, history: torch.Tensor, history_ratings: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        ids, valid = history_entries(history, self.n_items)
        # z_u = |N(u)|^-½ Σ y_j over the distinct rated items (a repeated item counts once)
        distinct, first = first_occurrences(ids, valid)
        weight = first.to(torch.float64).unsqueeze(2)
        implicit = ratio((self.implicit_factors[distinct] * weight).sum(1), weight.sum(1).sqrt())  # [B, k]
        factors = self.design[:, 1:]
        targets = (
            history_ratings.to(torch.float64)
            - self.global_mean
            - self.item_bias[ids]
            - (factors[ids] * implicit.unsqueeze(1)).sum(2)
        )
        ridge = self.fold_in_reg + self.reg * entry_count(valid)
        x = padded_ridge_fold_in(self.design, ids, valid, targets, ridge)  # (b_u, p_u)
        user = x + torch.cat([torch.zeros_like(x[:, :1]), implicit], dim=1)  # (b_u, p_u + z_u)
        out = self.global_mean + self.item_bias[items] + (self.design[items] * user.unsqueeze(1)).sum(2)
        return out.to(torch.float32)
