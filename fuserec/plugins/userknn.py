"""User-based k-nearest-neighbours: a history is matched against every training user.

Fit keeps the binary training user x item matrix ``X`` and each row's norm under an optional IDF item
weighting. A history ``h`` (weighted the same way) scores items by
``sim_v = h . X_v / (|h| |X_v| + shrinkage)`` for every training user ``v``, keeping the ``k`` most
similar users, and ``score = sum_v sim_v ** exponent * X_v``. A new user is therefore matched by history
alone, with no per-user state, and the exported graph is a matmul, a top-k over users, a mask and a
second matmul.

Memory and speed: ``X`` is kept sparse (CSR). Up to ``dense_max_cells`` user x item cells (2^25, e.g.
ML-1M's 6,040 x 3,706) ``score()`` runs the torch module on a dense copy, the same arithmetic as the ONNX
graph. Above it ``score()`` stays sparse: ``(h w^2) X^T`` touches only the users who share an item with
the history, and the neighbours' rows are summed sparsely, far faster than the dense module at the ML-10M
shape and without its dense ``X`` (``benchmarks/userknn_scale.py`` measures both). The exported graph is
still the dense module (``X`` as a float32 buffer: 3 GB at ML-10M size, stored beside the graph as
external data). With the default binary weighting the similarities are sums of ones, exact in
both paths, so they select the same neighbours; with ``idf`` a tie at the k-th neighbour may fall either
way between the two.

The neighbour cut is tie-tolerant: every user whose similarity reaches the k-th largest value is kept, so
``score()``, the torch module and onnxruntime agree whichever of several tied users each top-k picks.
A training user scoring their own history finds themselves as the best neighbour. That neighbour only
adds to items already in the history (which rankings exclude), so it costs one neighbour slot and
nothing else; a history-based rule dropping exact matches made no difference on validation at the
chosen ``k`` (it helps only at tiny k), so none is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, Self

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.api import (
    Algorithm,
    AlgorithmConfig,
    Choice,
    FloatRange,
    Histories,
    IntRange,
    SearchDim,
    hot_matmul,
    multi_hot,
)

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

Weighting = Literal["none", "idf"]


class UserKNNConfig(AlgorithmConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "k": IntRange(10, 500, log=True),
        "shrinkage": FloatRange(0.0, 100.0),
        "exponent": FloatRange(0.5, 3.0),
        "weighting": Choice(("none", "idf")),
    }

    k: int = Field(50, ge=1, description="neighbours (training users) kept per history")
    shrinkage: float = Field(
        50.0, ge=0.0, description="added to the cosine denominator; damps small overlaps"
    )
    exponent: float = Field(2.0, gt=0.0, description="similarity power; >1 favours the closest users")
    weighting: Weighting = Field(
        "none", description="item weighting in the cosine only; scores sum binary rows"
    )
    batch_size: int = Field(1024, ge=1, description="histories scored per block in score()")
    dense_max_cells: int = Field(
        1 << 25, ge=0, description="score through a dense X up to this many users x items; sparse above"
    )


class UserKNN(Algorithm):
    rating_counterpart = "user_similarity"  # similarity-weighted neighbours' rating deviations
    Config = UserKNNConfig
    config: UserKNNConfig
    _module: _UserKNNModule | None  # built lazily from the fitted state

    def fit(self, data: Dataset) -> Self:
        x = data.matrix().astype(np.float32).tocsr()
        x.data[:] = 1.0
        n_users, n_items = x.shape
        self.csr_ = x
        self.item_weights_ = _item_weights(np.asarray(x.sum(axis=0)).ravel(), n_users, self.config.weighting)
        # Norm of each weighted row X_v * w, computed once in float64.
        sq = x @ (self.item_weights_.astype(np.float64) ** 2)
        self.norms_ = np.sqrt(np.asarray(sq).ravel()).astype(np.float32)
        self.n_items_ = n_items
        self._module = None
        return self

    def _dense_scoring(self) -> bool:
        n_users, n_items = self.csr_.shape
        return n_users * n_items <= self.config.dense_max_cells

    def _scorer(self) -> _UserKNNModule:
        module: _UserKNNModule | None = getattr(self, "_module", None)
        if module is None:
            module = self._module = _UserKNNModule(
                torch.from_numpy(self.csr_.toarray()),  # dense X: the exported graph's buffer
                torch.from_numpy(self.norms_),
                torch.from_numpy(self.item_weights_),
                k=self.config.k,
                shrinkage=self.config.shrinkage,
                exponent=self.config.exponent,
            ).eval()
        return module

    def score(self, histories: Histories) -> np.ndarray:
        self._check_fitted()
        out = np.empty((len(histories), histories.n_items), dtype=np.float32)
        step = self.config.batch_size
        dense = self._dense_scoring()
        with torch.no_grad():
            for start in range(0, len(histories), step):
                rows = np.arange(start, min(start + step, len(histories)))
                hot = histories.select(rows).to_csr()
                if dense:
                    out[rows] = self._scorer().from_multi_hot(torch.from_numpy(hot.toarray())).numpy()
                else:
                    out[rows] = (self._sparse_weights(hot) @ self.csr_).toarray()
        return out

    def _sparse_similarities(self, hot: sp.csr_matrix) -> np.ndarray:
        """:meth:`_UserKNNModule.similarities` without dense products: ``[B, n_users]`` float32."""
        w = self.item_weights_
        h = hot.astype(np.float32).multiply(w[None, :]).tocsr()
        dots = np.asarray((h.multiply(w[None, :]).tocsr() @ self.csr_.T).toarray(), dtype=np.float32)
        h_norm = np.sqrt(np.asarray(h.multiply(h).sum(axis=1), dtype=np.float32))
        denom = h_norm * self.norms_[None, :] + np.float32(self.config.shrinkage)
        return dots / np.maximum(denom, np.float32(1e-12))

    def _sparse_weights(self, hot: sp.csr_matrix) -> sp.csr_matrix:
        """:meth:`_UserKNNModule.neighbour_weights`, sparse ``[B, n_users]``: k users a row, plus ties."""
        sim = self._sparse_similarities(hot)
        k = max(1, min(self.config.k, sim.shape[1]))
        kth = np.partition(sim, sim.shape[1] - k, axis=1)[:, -k][:, None]
        keep = (sim >= kth) & (sim > 0)
        powered = np.power(np.clip(sim, 0.0, None), np.float32(self.config.exponent), dtype=np.float32)
        return sp.csr_matrix(np.where(keep, powered, np.float32(0.0)))

    def user_representation(self, histories: Histories) -> np.ndarray:
        """Similarity of each history to every training user, ``[batch, n_train_users]``: who it resembles."""
        self._check_fitted()
        if not self._dense_scoring():
            return self._sparse_similarities(histories.to_csr())
        with torch.no_grad():
            hot = torch.from_numpy(histories.to_csr().toarray())
            return self._scorer().similarities(hot).numpy()

    def explain(self, history: np.ndarray, item: int) -> dict[str, object]:
        """The neighbours (training-user rows) that gave ``item`` its score, with their contributions."""
        hist = Histories.from_lists([np.unique(history).tolist()], self._check_fitted())
        if self._dense_scoring():
            with torch.no_grad():
                hot = torch.from_numpy(hist.to_csr().toarray())
                weights = self._scorer().neighbour_weights(hot)[0].numpy()
        else:
            weights = self._sparse_weights(hist.to_csr()).toarray()[0]
        contrib = weights * self.csr_[:, item].toarray().ravel()
        ranked = sorted(((int(v), float(contrib[v])) for v in np.flatnonzero(contrib)), key=lambda kv: -kv[1])
        return {"score": float(contrib.sum()), "neighbours": ranked}

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return self._scorer()

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "indptr": self.csr_.indptr,
            "indices": self.csr_.indices,
            "shape": np.asarray(self.csr_.shape, dtype=np.int64),
            "norms": self.norms_,
            "item_weights": self.item_weights_,
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        if "matrix" in state:  # saved before X was kept sparse
            self.csr_ = sp.csr_matrix(state["matrix"].astype(np.float32))
        else:
            indices = state["indices"]
            ones = np.ones(len(indices), dtype=np.float32)
            shape = tuple(int(v) for v in state["shape"])
            self.csr_ = sp.csr_matrix((ones, indices, state["indptr"]), shape=shape)
        self.norms_ = state["norms"].astype(np.float32)
        self.item_weights_ = state["item_weights"].astype(np.float32)
        self._module = None


def _item_weights(counts: np.ndarray, n_users: int, weighting: Weighting) -> np.ndarray:
    """Per-item column weights: 1, or IDF ``log(n_users / df)`` (0 for never-seen items)."""
    if weighting == "none":
        return np.ones(len(counts), dtype=np.float32)
    idf = np.log(np.maximum(n_users, 1) / np.maximum(counts, 1.0))
    return np.where(counts > 0, np.maximum(idf, 0.0), 0.0).astype(np.float32)


class _UserKNNModule(torch.nn.Module):
    """History -> scores. The one implementation behind ``score()`` and the ONNX graph.

    ``matrix`` is the binary X; weighting enters only the similarity, as ``(h w^2) X^T`` (= the dot of the
    weighted vectors), so scores stay sums of neighbours' binary rows and X is stored once.
    """

    matrix: torch.Tensor
    norms: torch.Tensor
    item_weights: torch.Tensor

    def __init__(
        self,
        matrix: torch.Tensor,
        norms: torch.Tensor,
        item_weights: torch.Tensor,
        k: int,
        shrinkage: float,
        exponent: float,
    ) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.register_buffer("norms", norms)
        self.register_buffer("item_weights", item_weights)
        self.k = max(1, min(k, matrix.shape[0]))
        self.shrinkage = shrinkage
        self.exponent = exponent

    def similarities(self, hot: torch.Tensor) -> torch.Tensor:
        """Shrunk cosine of each binary ``[B, n_items]`` history with every training user."""
        h = hot * self.item_weights
        dots = hot_matmul(h * self.item_weights, self.matrix.T)  # [B, n_users]
        h_norm = torch.sqrt((h * h).sum(dim=1, keepdim=True))
        denom = h_norm * self.norms + self.shrinkage
        return dots / torch.clamp(denom, min=1e-12)

    def neighbour_weights(self, hot: torch.Tensor) -> torch.Tensor:
        """``sim ** exponent`` for the k most similar users (all ties at the cut kept), 0 elsewhere."""
        sim = self.similarities(hot)
        kth = torch.topk(sim, self.k, dim=1).values[:, -1:]
        keep = (sim >= kth) & (sim > 0)
        powered = torch.pow(torch.clamp(sim, min=0.0), self.exponent)
        return torch.where(keep, powered, torch.zeros_like(sim))

    def from_multi_hot(self, hot: torch.Tensor) -> torch.Tensor:
        return hot_matmul(self.neighbour_weights(hot), self.matrix)  # k users a row: their rows only

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.from_multi_hot(multi_hot(history, self.matrix.shape[1]))
