"""RP3beta as a fuserec algorithm plugin, distributed apart from fuserec and found through its entry point.

RP3beta (Paudel, Christoffel, Mendez and Bernstein, "Updatable, Accurate, Diverse, and Scalable
Recommendations for Interactive Applications", ACM TiiS 7(1), 2017) ranks items by a three-step random
walk on the user-item graph, started from the user: user -> item -> user -> item. The item-to-item part
of that walk is

    W = P_iu^alpha @ P_ui^alpha,   W[:, j] /= popularity(j)^beta

where ``P_ui`` is the user x item matrix with each row divided by the user's degree and ``P_iu`` the item x
user matrix with each row divided by the item's degree (``^alpha`` is element-wise). ``beta`` damps walks
that end on popular items, which is what lifts accuracy and diversity over plain P^3. Each item keeps its
``k`` strongest destinations; a history scores an item by summing its items' rows of ``W``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np
import scipy.sparse as sp
import torch
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
from pydantic import Field

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

__version__ = "0.1.0"
DENSE_EXPORT_MAX_ITEMS = 8192  # above this, the exported graph gathers neighbours instead of a dense matmul


class RP3betaConfig(AlgorithmConfig):
    """Defaults chosen on the MovieLens-100k validation carve only (``tune_ml100k.py``, see the README)."""

    search_space: ClassVar[dict[str, SearchDim]] = {
        "alpha": FloatRange(0.0, 2.0),
        "beta": FloatRange(0.0, 1.0),
        "k": IntRange(10, 1000, log=True),
    }

    alpha: float = Field(0.25, ge=0.0, description="exponent on every transition probability")
    beta: float = Field(0.7, ge=0.0, description="popularity penalty: W[:, j] /= popularity(j)^beta")
    k: int = Field(800, ge=1, description="destinations kept per item")
    block_size: int = Field(1024, ge=1, description="items per block when computing W")


class RP3beta(Algorithm):
    """Item-item random walk with a popularity penalty; scores histories, exports as one matmul."""

    api_version: ClassVar[str] = "1.0"  # written for plugin API 1.x; fuserec refuses it under another major
    Config = RP3betaConfig

    def fit(self, data: Dataset) -> Self:
        cfg: RP3betaConfig = self.config  # type: ignore[assignment]
        x = data.matrix().astype(np.float64)  # [n_users, n_items], binary
        n_items = data.n_items
        user_degree = np.asarray(x.sum(axis=1)).ravel()
        item_degree = np.asarray(x.sum(axis=0)).ravel()
        p_ui = sp.csr_matrix(sp.diags(1.0 / np.maximum(user_degree, 1.0)) @ x)
        p_iu = sp.csr_matrix(sp.diags(1.0 / np.maximum(item_degree, 1.0)) @ x.T.tocsr())
        p_ui.data **= cfg.alpha
        p_iu.data **= cfg.alpha
        penalty = np.maximum(item_degree, 1.0) ** -cfg.beta
        k = min(cfg.k, max(n_items - 1, 1))
        idx = np.zeros((n_items, k), dtype=np.int32)
        weights = np.zeros((n_items, k), dtype=np.float64)
        for start in range(0, n_items, cfg.block_size):
            stop = min(start + cfg.block_size, n_items)
            w = (p_iu[start:stop] @ p_ui).toarray() * penalty[None, :]  # [block, n_items]
            w[np.arange(stop - start), np.arange(start, stop)] = 0.0  # no walk back to the same item
            top = _top_k_rows(w, k)
            idx[start:stop] = top
            weights[start:stop] = np.take_along_axis(w, top, axis=1)
        # One global scale (rankings unchanged) keeps scores far above float32's resolution limits.
        largest = weights.max() if weights.size else 0.0
        self.neighbours_ = idx
        self.weights_ = (weights / largest if largest > 0 else weights).astype(np.float32)
        self.n_items_ = n_items
        self._matrix: sp.csr_matrix | None = None
        return self

    def similarity(self) -> sp.csr_matrix:
        """``[n_items, n_items]`` sparse W: row i holds item i's kept destinations and their weights."""
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

    def explain(self, history: np.ndarray, item: int) -> dict[str, object]:
        """Each history item's walk weight to ``item``."""
        sim = self.similarity()
        contributions = {int(h): float(sim[h, item]) for h in np.unique(history)}
        ranked = sorted(contributions.items(), key=lambda kv: -kv[1])
        return {"score": float(sum(contributions.values())), "contributions": ranked}

    def to_torch(self, dense: bool | None = None) -> torch.nn.Module:
        n_items = self._check_fitted()
        if dense is None:
            dense = n_items <= DENSE_EXPORT_MAX_ITEMS
        if dense:
            return _Dense(torch.from_numpy(np.asarray(self.similarity().todense(), dtype=np.float32)))
        return _Gather(
            torch.from_numpy(self.neighbours_.astype(np.int64)), torch.from_numpy(self.weights_), n_items
        )

    def get_state(self) -> dict[str, np.ndarray]:
        return {"neighbours": self.neighbours_, "weights": self.weights_}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.neighbours_ = state["neighbours"].astype(np.int32)
        self.weights_ = state["weights"].astype(np.float32)
        self._matrix = None


def _top_k_rows(w: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest values (ties: lower index), sorted by value."""
    if k >= w.shape[1]:
        part = np.tile(np.arange(w.shape[1]), (w.shape[0], 1))
    else:
        part = np.argpartition(-w, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(w, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


class _Dense(torch.nn.Module):
    """``multi_hot(history) @ W``: one matmul, fastest under onnxruntime for small catalogs."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return hot_matmul(multi_hot(history, self.w.shape[0]), self.w)


class _Gather(torch.nn.Module):
    """Sums each history item's kept destinations: memory linear in the catalog."""

    def __init__(self, neighbours: torch.Tensor, weights: torch.Tensor, n_items: int) -> None:
        super().__init__()
        self.register_buffer("neighbours", neighbours)
        self.register_buffer("weights", weights)
        self.n_items = n_items

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        # An item repeated in a history counts once, as in score(): keep its first occurrence only.
        batch, length = history.shape
        same = history.unsqueeze(2) == history.unsqueeze(1)  # [B, L, L]
        earlier = torch.tril(torch.ones(length, length, dtype=torch.bool, device=history.device), -1)
        valid = (history >= 0) & ~(same & earlier.unsqueeze(0)).any(dim=2)
        safe = torch.where(valid, history, torch.zeros_like(history))
        weights = self.weights[safe] * valid.unsqueeze(2).to(self.weights.dtype)  # [B, L, K]
        out = torch.zeros(batch, self.n_items, dtype=self.weights.dtype, device=history.device)
        return out.scatter_add(1, self.neighbours[safe].reshape(batch, -1), weights.reshape(batch, -1))


__all__ = ["RP3beta", "RP3betaConfig"]
