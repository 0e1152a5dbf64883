"""Most-popular baseline: every history gets the same scores, the training count of each item."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

import numpy as np
import torch

from fuserec.api import Algorithm, AlgorithmConfig, Histories

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset


class PopularityConfig(AlgorithmConfig):
    pass


class Popularity(Algorithm):
    Config = PopularityConfig
    config: PopularityConfig

    def fit(self, data: Dataset) -> Self:
        self.counts_ = data.item_popularity().astype(np.float32)
        self.n_items_ = data.n_items
        return self

    def score(self, histories: Histories) -> np.ndarray:
        self._check_fitted()
        return np.broadcast_to(self.counts_, (len(histories), len(self.counts_))).copy()

    def item_representation(self) -> np.ndarray:
        return np.log1p(self.counts_)[:, None]

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return _PopularityModule(torch.from_numpy(self.counts_))

    def get_state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts_}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.counts_ = state["counts"].astype(np.float32)


class _PopularityModule(torch.nn.Module):
    counts: torch.Tensor

    def __init__(self, counts: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", counts)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.counts.unsqueeze(0).expand(history.shape[0], -1)
