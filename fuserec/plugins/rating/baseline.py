"""Global mean plus user and item biases: the floor every rating model must beat.

``r̂_ui = μ + b_u + b_i``, the biases fitted by alternating ridge least squares (the closed-form steps of
:func:`fuserec.rating_ops.als_baselines`). At predict time ``b_u`` is folded in from the history's
ratings by the same user step, so for a training user's own ratings the fold-in equals the fit exactly.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import FloatRange, IntRange, SearchDim
from fuserec.histories import Histories
from fuserec.rating import RatingAlgorithm, RatingConfig, RatingData
from fuserec.rating_ops import als_baselines, fold_in_user_bias
from fuserec.rating_torch import fold_in_bias, history_entries


class BaselineConfig(RatingConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "reg_users": FloatRange(0.1, 100.0, log=True),
        "reg_items": FloatRange(0.1, 100.0, log=True),
        "epochs": IntRange(2, 30),
    }

    reg_users: float = Field(
        15.0, ge=0.0, description="ridge on a user bias (shrinks users with few ratings)"
    )
    reg_items: float = Field(10.0, ge=0.0, description="ridge on an item bias")
    epochs: int = Field(10, ge=1, description="ALS sweeps (items, then users)")


class Baseline(RatingAlgorithm):
    Config = BaselineConfig
    config: BaselineConfig
    global_mean_: float
    item_bias_: np.ndarray
    train_user_bias_: np.ndarray | None  # fitted biases of training users: diagnostics, not saved

    def fit_ratings(self, data: RatingData) -> None:
        cfg = self.config
        self.global_mean_ = data.global_mean
        self.train_user_bias_, self.item_bias_ = als_baselines(data, cfg.reg_users, cfg.reg_items, cfg.epochs)

    def user_bias(self, histories: Histories) -> np.ndarray:
        """``float64 [B]``: each history's folded-in user bias."""
        return fold_in_user_bias(histories, self.item_bias_, self.global_mean_, self.config.reg_users)

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        return self.global_mean_ + self.user_bias(histories)[:, None] + self.item_bias_[items]

    def fitted_estimate(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        bias = getattr(self, "train_user_bias_", None)
        if bias is None:
            return None
        return self.global_mean_ + bias[users] + self.item_bias_[items]

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return _BaselineModule(self.global_mean_, self.item_bias_, self.config.reg_users).eval()

    def model_state(self) -> dict[str, np.ndarray]:
        return {"global_mean": np.asarray(self.global_mean_), "item_bias": self.item_bias_}

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.global_mean_ = float(state["global_mean"])
        self.item_bias_ = np.asarray(state["item_bias"], dtype=np.float64)
        self.train_user_bias_ = None


class _BaselineModule(torch.nn.Module):
    """``μ + b_u + b_i`` with ``b_u`` folded in from the padded history (see ``RatingAlgorithm.to_torch``)."""

    item_bias: torch.Tensor

    def __init__(self, global_mean: float, item_bias: np.ndarray, reg_users: float) -> None:
        super().__init__()
        self.register_buffer("item_bias", torch.from_numpy(np.asarray(item_bias, np.float64)))
        self.global_mean = float(global_mean)
        self.reg_users = float(reg_users)
        self.n_items = len(item_bias)

    def forward(
        self, history: torch.Tensor, history_ratings: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        ids, valid = history_entries(history, self.n_items)
        bias = fold_in_bias(ids, valid, history_ratings, self.item_bias, self.global_mean, self.reg_users)
        out = self.global_mean + bias.unsqueeze(1) + self.item_bias[items]
        return out.to(torch.float32)
