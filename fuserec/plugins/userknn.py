"""User-based k-nearest-neighbours: a history is matched against every training user.

Fit keeps the binary training user x item matrix ``X`` and each row's norm under an optional IDF item
weighting. A history ``h`` (weighted the same way) scores items by
``sim_v = h . X_v / (|h| |X_v| + shrinkage)`` for every training user ``v``, keeping the ``k`` most
similar users, and ``score = sum_v sim_v ** exponent * X_v``. A new user is therefore matched by history
alone, with no per-user state, and the exported graph is a matmul, a top-k over users, a mask and a
second matmul.

Memory: ``X`` is stored dense, ``n_users x n_items`` float32 (ML-100k: 943 x 1682 = 6.3 MB), once in the
model and once as the ONNX buffer, and scoring a batch of B histories builds ``[B, n_users]`` and
``[B, n_items]`` float32 blocks. Fine up to some 10^4 x 10^4; beyond that a sparse or sampled neighbour
pool is needed.

The neighbour cut is tie-tolerant: every user whose similarity reaches the k-th largest value is kept, so
``score()``, the torch module and onnxruntime agree whichever of several tied users each top-k picks.
A training user scoring their own history finds themselves as the best neighbour. That neighbour only
adds to items already in the history (which rankings exclude), so it costs one neighbour slot and
nothing else; a history-based rule dropping exact matches changed ML-100k validation NDCG@10 by
-0.0003 at the chosen k=50 (it helps only at tiny k), so none is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, Self

import numpy as np
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


class UserKNN(Algorithm):
    Config = UserKNNConfig

    def fit(self, data: Dataset) -> Self:
        x = data.matrix().astype(np.float32)
        n_users, n_items = x.shape
        self.matrix_ = x.toarray()
        self.item_weights_ = _item_weights(np.asarray(x.sum(axis=0)).ravel(), n_users, self.config.weighting)
        # Norm of each weighted row X_v * w, computed once in float64.
        sq = x @ (self.item_weights_.astype(np.float64) ** 2)
        self.norms_ = np.sqrt(np.asarray(sq).ravel()).astype(np.float32)
        self.n_items_ = n_items
        self._module = None
        return self

    def _scorer(self) -> _UserKNNModule:
        if getattr(self, "_module", None) is None:
            self._module = _UserKNNModule(
                torch.from_numpy(self.matrix_),
                torch.from_numpy(self.norms_),
                torch.from_numpy(self.item_weights_),
                k=self.config.k,
                shrinkage=self.config.shrinkage,
                exponent=self.config.exponent,
            ).eval()
        return self._module

    def score(self, histories: Histories) -> np.ndarray:
        self._check_fitted()
        module = self._scorer()
        out = np.empty((len(histories), histories.n_items), dtype=np.float32)
        step = self.config.batch_size
        with torch.no_grad():
            for start in range(0, len(histories), step):
                rows = np.arange(start, min(start + step, len(histories)))
                hot = torch.from_numpy(histories.select(rows).to_csr().toarray())
                out[rows] = module.from_multi_hot(hot).numpy()
        return out

    def user_representation(self, histories: Histories) -> np.ndarray:
        """Similarity of each history to every training user, ``[batch, n_train_users]``: who it resembles."""
        self._check_fitted()
        with torch.no_grad():
            hot = torch.from_numpy(histories.to_csr().toarray())
            return self._scorer().similarities(hot).numpy()

    def explain(self, history: np.ndarray, item: int) -> dict[str, object]:
        """The neighbours (training-user rows) that gave ``item`` its score, with their contributions."""
        hist = Histories.from_lists([np.unique(history).tolist()], self._check_fitted())
        with torch.no_grad():
            weights = self._scorer().neighbour_weights(torch.from_numpy(hist.to_csr().toarray()))[0].numpy()
        contrib = weights * self.matrix_[:, item]
        ranked = sorted(((int(v), float(contrib[v])) for v in np.flatnonzero(contrib)), key=lambda kv: -kv[1])
        return {"score": float(contrib.sum()), "neighbours": ranked}

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return self._scorer()

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "matrix": self.matrix_,
            "norms": self.norms_,
            "item_weights": self.item_weights_,
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.matrix_ = state["matrix"].astype(np.float32)
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
        dots = (h * self.item_weights) @ self.matrix.T  # [B, n_users]
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
        return self.neighbour_weights(hot) @ self.matrix

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.from_multi_hot(multi_hot(history, self.matrix.shape[1]))
