"""EASE (Steck 2019): a closed-form item-item linear autoencoder with a zero diagonal.

``B = I - P · diag(1 / diag(P))`` with ``P = (XᵀX + λI)⁻¹`` is the ridge regression of each item column
on all the others under the constraint ``diag(B) = 0`` (an item may not predict itself). A history
scores the catalog with ``x_h @ B``. One linear solve, no epochs, no seed to tune, and on MovieLens-sized
data it is among the strongest baselines there are.

Memory: ``B`` and ``P`` are dense ``n_items x n_items``. The fit holds the Gram matrix and its inverse in
float64 (``2 · 8 · n_items²`` bytes) and keeps ``B`` in float32 (``4 · n_items²``); the inverse costs
``O(n_items³)`` time. 1,682 items is 11 MB; 20k items is 1.6 GB for ``B`` alone and a minute of solving;
100k items (40 GB for ``B``) does not fit. For large catalogs restrict EASE to the most popular items
or use a factorised model (ALS); ``max_items`` turns an accidental out-of-memory into an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np
import scipy.linalg
import torch
from pydantic import Field

from fuserec.api import Algorithm, AlgorithmConfig, FloatRange, Histories, SearchDim, hot_matmul, multi_hot

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset


class EASEConfig(AlgorithmConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {"l2": FloatRange(1.0, 5000.0, log=True)}

    l2: float = Field(250.0, gt=0.0, description="λ, the ridge penalty added to the Gram diagonal")
    max_items: int = Field(
        30_000, ge=1, description="refuse catalogs larger than this: B is dense n_items² float32"
    )


class EASE(Algorithm):
    Config = EASEConfig
    config: EASEConfig

    def fit(self, data: Dataset) -> Self:
        n_items = data.n_items
        if n_items > self.config.max_items:
            need_gb = 20 * n_items**2 / 1e9  # float64 Gram + inverse, float32 B
            raise MemoryError(
                f"EASE needs about {need_gb:.1f} GB for {n_items} items (dense n_items² matrices); "
                f"raise ease.max_items (now {self.config.max_items}) if the machine has that, or "
                "filter the catalog to its most popular items, or use ALS"
            )
        x = data.matrix().astype(np.float64)
        gram = (x.T @ x).toarray()
        gram[np.diag_indices(n_items)] += self.config.l2
        # Cholesky: the Gram matrix plus λI is symmetric positive definite, so this is the stable inverse.
        p = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram, overwrite_a=True), np.eye(n_items))
        b = -p / np.diag(p)[None, :]
        b[np.diag_indices(n_items)] = 0.0
        self.weights_ = b.astype(np.float32)
        self.n_items_ = n_items
        return self

    def score(self, histories: Histories) -> np.ndarray:
        self._check_fitted()
        return np.asarray(histories.to_csr() @ self.weights_, dtype=np.float32)

    def explain(self, history: np.ndarray, item: int) -> dict[str, object]:
        """Each history item's weight towards ``item``: the score is exactly their sum."""
        contributions = {int(h): float(self.weights_[h, item]) for h in np.unique(history)}
        ranked = sorted(contributions.items(), key=lambda kv: -kv[1])
        return {"score": float(sum(contributions.values())), "contributions": ranked}

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return _EASEModule(torch.from_numpy(self.weights_))

    def get_state(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights_}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.weights_ = state["weights"].astype(np.float32)


class _EASEModule(torch.nn.Module):
    weights: torch.Tensor

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return hot_matmul(multi_hot(history, self.weights.shape[0]), self.weights)
