"""Item-based k-nearest-neighbours over the binary interaction matrix.

Each item keeps its ``k`` most similar items (cosine with optional shrinkage); a history scores an item
by summing the similarities of the history's items to it. Neighbours are stored as ``[n_items, k]``
index/weight arrays, so memory is linear in the catalog and the exported graph is a gather + scatter-add
(or a dense matrix product for small catalogs, which onnxruntime runs faster).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.api import (
    Algorithm,
    AlgorithmConfig,
    FloatRange,
    Histories,
    IntRange,
    SearchDim,
    hot_matmul,
    multi_hot,
)

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

DENSE_EXPORT_MAX_ITEMS = 8192  # above this, the exported graph gathers neighbours instead of a dense matmul


class ItemKNNConfig(AlgorithmConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "k": IntRange(10, 2000, log=True),
        "shrinkage": FloatRange(0.0, 100.0),
    }

    k: int = Field(200, ge=1, description="neighbours kept per item")
    shrinkage: float = Field(0.0, ge=0.0, description="added to the cosine denominator; damps rare pairs")
    block_size: int = Field(1024, ge=1, description="items per block when computing similarities")


class ItemKNN(Algorithm):
    rating_counterpart = "knn_baseline"  # item-based neighbours, with baselines (Pearson-baseline)
    Config = ItemKNNConfig
    config: ItemKNNConfig

    def fit(self, data: Dataset) -> Self:
        x = data.matrix().tocsc().astype(np.float32)
        n_items = data.n_items
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel()).astype(np.float32)
        k = min(self.config.k, max(n_items - 1, 1))
        xt = x.T.tocsr()
        idx = np.zeros((n_items, k), dtype=np.int32)
        weights = np.zeros((n_items, k), dtype=np.float32)
        for start in range(0, n_items, self.config.block_size):
            stop = min(start + self.config.block_size, n_items)
            co = (xt[start:stop] @ x).toarray()  # [block, n_items] co-occurrence counts
            denom = norms[start:stop, None] * norms[None, :] + self.config.shrinkage
            sim = np.divide(co, denom, out=np.zeros_like(co), where=denom > 0)
            sim[np.arange(stop - start), np.arange(start, stop)] = 0.0  # an item is not its own neighbour
            top = _top_k_rows(sim, k)
            idx[start:stop] = top
            weights[start:stop] = np.take_along_axis(sim, top, axis=1)
        self.neighbours_, self.weights_ = idx, weights
        self.n_items_ = n_items
        self._matrix = None
        return self

    def similarity(self) -> sp.csr_matrix:
        """``[n_items, n_items]`` sparse: row i holds item i's neighbours and their similarities."""
        if getattr(self, "_matrix", None) is None:
            n, k = self.neighbours_.shape
            rows = np.repeat(np.arange(n), k)
            mat = sp.csr_matrix(
                (self.weights_.ravel(), (rows, self.neighbours_.ravel())), shape=(n, self._check_fitted())
            )
            mat.eliminate_zeros()
            self._matrix = mat
        return self._matrix

    def score(self, histories: Histories) -> np.ndarray:
        self._check_fitted()
        return np.asarray((histories.to_csr() @ self.similarity()).todense(), dtype=np.float32)

    def item_representation(self) -> np.ndarray:
        return np.asarray(self.similarity().todense(), dtype=np.float32)

    def explain(self, history: np.ndarray, item: int) -> dict[str, object]:
        """Each history item's similarity to ``item``: the "because you liked ..." part of a score."""
        sim = self.similarity()
        contributions = {int(h): float(sim[h, item]) for h in np.unique(history)}
        ranked = sorted(contributions.items(), key=lambda kv: -kv[1])
        return {"score": float(sum(contributions.values())), "contributions": ranked}

    def to_torch(self, dense: bool | None = None) -> torch.nn.Module:
        n_items = self._check_fitted()
        if dense is None:
            dense = n_items <= DENSE_EXPORT_MAX_ITEMS
        if dense:
            return _DenseKNN(torch.from_numpy(np.asarray(self.similarity().todense(), dtype=np.float32)))
        return _GatherKNN(
            torch.from_numpy(self.neighbours_.astype(np.int64)), torch.from_numpy(self.weights_), n_items
        )

    def get_state(self) -> dict[str, np.ndarray]:
        return {"neighbours": self.neighbours_, "weights": self.weights_}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.neighbours_ = state["neighbours"].astype(np.int32)
        self.weights_ = state["weights"].astype(np.float32)
        self._matrix = None


def _top_k_rows(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest values (ties: lower index), sorted by value."""
    if k >= sim.shape[1]:
        part = np.tile(np.arange(sim.shape[1]), (sim.shape[0], 1))
    else:
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sim, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


class _DenseKNN(torch.nn.Module):
    sim: torch.Tensor

    def __init__(self, sim: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("sim", sim)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return hot_matmul(multi_hot(history, self.sim.shape[0]), self.sim)


class _GatherKNN(torch.nn.Module):
    neighbours: torch.Tensor
    weights: torch.Tensor

    def __init__(self, neighbours: torch.Tensor, weights: torch.Tensor, n_items: int) -> None:
        super().__init__()
        self.register_buffer("neighbours", neighbours)
        self.register_buffer("weights", weights)
        self.n_items = n_items

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        # A history item counted twice must count once, as in score(): keep its first occurrence only.
        batch, length = history.shape
        same = history.unsqueeze(2) == history.unsqueeze(1)  # [B, L, L]
        earlier = torch.tril(torch.ones(length, length, dtype=torch.bool, device=history.device), -1)
        repeat = (same & earlier.unsqueeze(0)).any(dim=2)
        valid = (history >= 0) & ~repeat
        safe = torch.where(valid, history, torch.zeros_like(history))
        nbr = self.neighbours[safe]  # [B, L, K]
        w = self.weights[safe] * valid.unsqueeze(2).to(self.weights.dtype)
        out = torch.zeros(batch, self.n_items, dtype=self.weights.dtype, device=history.device)
        return out.scatter_add(1, nbr.reshape(batch, -1), w.reshape(batch, -1))
