"""Item-based neighbourhood with baselines (Koren 2010, Surprise's ``KNNBaseline``, item-based).

``r̂_ui = b_ui + Σ_{j ∈ N^k_i(u)} s_ij (r_uj − b_uj) / Σ_{j ∈ N^k_i(u)} s_ij`` with ``b_ui = μ + b_u + b_i``
(ALS baselines, as :mod:`fuserec.plugins.rating.baseline`), ``N^k_i(u)`` the ``k`` items of the history
most similar to ``i``, of which only positive similarities contribute (the estimate falls back to the
baseline when none does).

The similarity is the shrunk Pearson-baseline correlation over the users who rated both items::

    s_ij = Σ_u e_ui e_uj / √(Σ_u e_ui² · Σ_u e_uj²) · (n_ij − 1) / (n_ij − 1 + shrinkage),  e_ui = r_ui − b_ui

computed for all item pairs at once with three sparse products (``n_items²`` floats are kept: fine for
catalogues of tens of thousands of items, not millions).

The history is all a prediction needs: ``b_u`` is folded in from its ratings by the ALS user step (exact
for a training user: no gap) and its residuals are the neighbours' deviations.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.api import FloatRange, IntRange, SearchDim
from fuserec.histories import Histories
from fuserec.rating import RatingAlgorithm, RatingConfig, RatingData
from fuserec.rating_ops import (
    BATCH_CELLS,
    als_baselines,
    fold_in_user_bias,
    padded_entries,
    rows_by_length,
)
from fuserec.rating_torch import fold_in_bias, history_entries, masked, ratio


class KNNBaselineConfig(RatingConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "k": IntRange(5, 200, log=True),
        "shrinkage": FloatRange(0.0, 500.0),
    }

    k: int = Field(40, ge=1, description="neighbours (history items) per prediction")
    shrinkage: float = Field(100.0, ge=0.0, description="pulls similarities of few common raters towards 0")
    min_support: int = Field(1, ge=1, description="common raters below which a similarity is 0")
    reg_users: float = Field(15.0, ge=0.0, description="ridge on a user bias (baselines)")
    reg_items: float = Field(10.0, ge=0.0, description="ridge on an item bias (baselines)")
    baseline_epochs: int = Field(10, ge=1, description="ALS sweeps of the baselines")


def pearson_baseline(
    data: RatingData, residuals: np.ndarray, shrinkage: float, min_support: int
) -> np.ndarray:
    """``float32 [n_items, n_items]`` shrunk Pearson-baseline similarities (diagonal 1).

    With ``E`` the user x item residual matrix and ``M`` its pattern: products ``EᵀE``, squared norms over
    the common users ``(E∘E)ᵀM`` and common counts ``MᵀM``.
    """
    shape = (data.n_users, data.n_items)
    resid = sp.csr_matrix((residuals, (data.users, data.items)), shape=shape)
    pattern = sp.csr_matrix((np.ones(len(data.users)), (data.users, data.items)), shape=shape)
    prods = (resid.T @ resid).toarray()
    sq = (resid.multiply(resid).T @ pattern).toarray()  # sq[i, j] = Σ over users of both: e_ui²
    common = (pattern.T @ pattern).toarray()
    denom = np.sqrt(sq * sq.T)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(denom > 0, prods / np.where(denom > 0, denom, 1.0), 0.0)
    shrink = np.maximum(common - 1.0, 0.0)
    sim *= shrink / np.where(shrink + shrinkage > 0, shrink + shrinkage, 1.0)
    sim[common < min_support] = 0.0
    np.fill_diagonal(sim, 1.0)
    return sim.astype(np.float32)


class KNNBaseline(RatingAlgorithm):
    Config = KNNBaselineConfig
    config: KNNBaselineConfig
    global_mean_: float
    item_bias_: np.ndarray
    similarity_: np.ndarray
    train_user_bias_: np.ndarray | None  # fitted biases (diagnostics, not saved)
    train_histories_: Histories | None

    def fit_ratings(self, data: RatingData) -> None:
        cfg = self.config
        bu, bi = als_baselines(data, cfg.reg_users, cfg.reg_items, cfg.baseline_epochs)
        mu = data.global_mean
        residuals = data.ratings - mu - bu[data.users] - bi[data.items]
        self.similarity_ = pearson_baseline(data, residuals, cfg.shrinkage, cfg.min_support)
        self.global_mean_, self.item_bias_ = mu, bi
        self.train_user_bias_, self.train_histories_ = bu, data.histories()

    def user_bias(self, histories: Histories) -> np.ndarray:
        return fold_in_user_bias(histories, self.item_bias_, self.global_mean_, self.config.reg_users)

    def neighbourhood(self, histories: Histories, items: np.ndarray, user_bias: np.ndarray) -> np.ndarray:
        """``b_ui`` plus the similarity-weighted residuals of the ``k`` most similar history items."""
        assert histories.ratings is not None
        base = self.global_mean_ + user_bias[:, None] + self.item_bias_[items]
        rows_of = np.repeat(np.arange(len(histories)), histories.lengths)
        resid = histories.ratings - self.global_mean_ - user_bias[rows_of] - self.item_bias_[histories.items]
        out = base.copy()
        if not len(histories.items):
            return out
        width = max(items.shape[1], 1)
        for rows in rows_by_length(histories.lengths, BATCH_CELLS * 8, width):
            entry, mask = padded_entries(histories, rows)
            sim = self.similarity_[items[rows][:, :, None], histories.items[entry][:, None, :]]  # [b, m, L]
            sim = np.where(mask[:, None, :], sim, -np.inf)
            dev = np.broadcast_to(np.where(mask, resid[entry], 0.0)[:, None, :], sim.shape)
            if sim.shape[2] > self.config.k:  # keep the k largest similarities (ties broken arbitrarily)
                top = np.argpartition(-sim, self.config.k - 1, axis=2)[:, :, : self.config.k]
                sim = np.take_along_axis(sim, top, axis=2)
                dev = np.take_along_axis(dev, top, axis=2)
            weight = np.where(sim > 0, sim, 0.0)
            total = weight.sum(axis=2)
            adjust = (weight * dev).sum(axis=2) / np.where(total > 0, total, 1.0)
            out[rows] += adjust
        return out

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        return self.neighbourhood(histories, items, self.user_bias(histories))

    def fitted_estimate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        bias = getattr(self, "train_user_bias_", None)
        hist = getattr(self, "train_histories_", None)
        if bias is None or hist is None:
            return None
        uniq, inverse = np.unique(users, return_inverse=True)
        grid = np.zeros((len(uniq), 1 + int(np.bincount(inverse).max())), dtype=np.int64)
        order = np.argsort(inverse, kind="stable")
        pos = np.arange(len(users)) - np.searchsorted(inverse[order], inverse[order])
        grid[inverse[order], pos] = items[order]
        est = self.neighbourhood(hist.select(uniq), grid, bias[uniq])
        out = np.empty(len(users))
        out[order] = est[inverse[order], pos]
        return out

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        cfg = self.config
        return _KNNBaselineModule(
            self.global_mean_, self.item_bias_, self.similarity_, cfg.reg_users, cfg.k
        ).eval()

    def model_state(self) -> dict[str, np.ndarray]:
        return {
            "global_mean": np.asarray(self.global_mean_),
            "item_bias": self.item_bias_,
            "similarity": self.similarity_,
        }

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.global_mean_ = float(state["global_mean"])
        self.item_bias_ = np.asarray(state["item_bias"], dtype=np.float64)
        self.similarity_ = np.asarray(state["similarity"], dtype=np.float32)
        self.train_user_bias_ = self.train_histories_ = None


class _KNNBaselineModule(torch.nn.Module):
    """:meth:`KNNBaseline.neighbourhood` on the padded history; the similarity matrix is a buffer."""

    item_bias: torch.Tensor
    similarity: torch.Tensor

    def __init__(
        self, global_mean: float, item_bias: np.ndarray, similarity: np.ndarray, reg_users: float, k: int
    ) -> None:
        super().__init__()
        self.register_buffer("item_bias", torch.from_numpy(np.asarray(item_bias, np.float64)))
        # flat, so a (candidate, history item) pair is one Gather of `candidate * n_items + item`
        self.register_buffer("similarity", torch.from_numpy(np.asarray(similarity, np.float32).ravel()))
        self.global_mean = float(global_mean)
        self.reg_users = float(reg_users)
        self.k = int(k)
        self.n_items = len(item_bias)

    def forward(
        self, history: torch.Tensor, history_ratings: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        ids, valid = history_entries(history, self.n_items)
        bias = fold_in_bias(ids, valid, history_ratings, self.item_bias, self.global_mean, self.reg_users)
        base = self.global_mean + bias.unsqueeze(1) + self.item_bias[items]  # [B, m]
        entry_base = self.global_mean + bias.unsqueeze(1) + self.item_bias[ids]  # b_uj of the history
        resid = masked(history_ratings.to(torch.float64) - entry_base, valid)
        # k padding columns, so top-k always has k candidates whatever the history's length
        pad = torch.zeros_like(ids[:, :1]).expand(-1, self.k)
        ids = torch.cat([ids, pad], dim=1)
        valid = torch.cat([valid, torch.zeros_like(pad, dtype=torch.bool)], dim=1)
        resid = torch.cat([resid, torch.zeros_like(pad, dtype=resid.dtype)], dim=1)
        # float32 as in numpy, so top-k ranks the same values (and the [B, m, L + k] block stays half size)
        sim = self.similarity[items.unsqueeze(2) * self.n_items + ids.unsqueeze(1)]
        sim = torch.where(valid.unsqueeze(1), sim, torch.full_like(sim, float("-inf")))  # [B, m, L + k]
        top, at = torch.topk(sim, self.k, dim=2)  # ties at the k-th place may pick another neighbour
        top = top.to(torch.float64)
        dev = torch.gather(resid.unsqueeze(1).expand(-1, items.shape[1], -1), 2, at)
        weight = torch.where(top > 0, top, torch.zeros_like(top))  # only positive similarities count
        adjust = ratio((weight * dev).sum(2), weight.sum(2))
        return (base + adjust).to(torch.float32)
