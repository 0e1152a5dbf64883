"""User-similarity prediction: a history's mean plus its nearest training users' deviations.

``R̂_ij = μ_i + Σ_k S_ik (R_kj − μ_k) / Σ_k |S_ik|`` over the ``k`` training users most similar to the
history ``i`` among those who rated ``j`` (``μ`` a user's mean rating). ``S`` is computed at predict time
from the history against every training user, so a new user is served from their ratings alone:

- ``pearson``: cosine of the mean-centred rating vectors (each user centred on their own mean, norms over
  all of their own ratings: the matrix form of Pearson's correlation);
- ``cosine``: cosine of the raw rating vectors.

With no usable neighbour (an empty history, or no training user who rated ``j``) the prediction is
``μ_i`` (the training mean for an empty history). The model keeps the training ratings themselves
(sparse, item-major), which is what a neighbourhood model is.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.api import Choice, IntRange, SearchDim
from fuserec.histories import Histories
from fuserec.rating import RatingAlgorithm, RatingConfig, RatingData, history_rows
from fuserec.rating_torch import entry_count, history_entries, masked, ratio

#: Pairs scored per chunk, times the longest candidate list (bounds the [pairs, raters] blocks).
PAIR_CELLS = 1 << 21


class UserSimilarityConfig(RatingConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "k": IntRange(5, 200, log=True),
        "similarity": Choice(("pearson", "cosine")),
    }

    k: int = Field(40, ge=1, description="most similar training users (among those who rated the item)")
    similarity: Literal["pearson", "cosine"] = Field("pearson", description="how a history meets a user")


def rating_vectors(
    rows: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_rows: int, n_items: int, fallback: float
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(R, μ)``: the ``n_rows x n_items`` rating matrix and each row's mean (``fallback`` when empty)."""
    counts = np.bincount(rows, minlength=n_rows)
    sums = np.bincount(rows, ratings, minlength=n_rows)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), fallback)
    matrix = sp.csr_matrix((ratings.astype(np.float64), (rows, items)), shape=(n_rows, n_items))
    return matrix, means


class UserSimilarity(RatingAlgorithm):
    Config = UserSimilarityConfig
    config: UserSimilarityConfig
    global_mean_: float
    # training ratings, item-major (CSC arrays): for item j the raters rater_users_[p] and their
    # centred ratings rater_deviations_[p], p in item_ptr_[j]:item_ptr_[j+1]
    item_ptr_: np.ndarray
    rater_users_: np.ndarray
    rater_deviations_: np.ndarray
    user_vectors_: sp.csr_matrix  # [n_users, n_items] unit-norm vectors the similarity compares

    def fit_ratings(self, data: RatingData) -> None:
        self.global_mean_ = data.global_mean
        matrix, means = rating_vectors(
            data.users, data.items, data.ratings, data.n_users, data.n_items, data.global_mean
        )
        matrix.sum_duplicates()
        centred = matrix.copy()
        centred.data -= np.repeat(means, np.diff(centred.indptr))
        by_item = centred.tocsc()
        by_item.sort_indices()
        self.item_ptr_ = by_item.indptr.astype(np.int64)
        self.rater_users_ = by_item.indices.astype(np.int64)
        self.rater_deviations_ = by_item.data.astype(np.float64)
        self.user_vectors_ = self._unit(centred if self.config.similarity == "pearson" else matrix)

    @staticmethod
    def _unit(matrix: sp.csr_matrix) -> sp.csr_matrix:
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        scale = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
        return sp.csr_matrix(sp.diags(scale) @ matrix)

    def similarities(self, histories: Histories) -> tuple[np.ndarray, np.ndarray]:
        """``(S [B, n_users], μ [B])``: each history's similarity to every training user, and its mean."""
        assert histories.ratings is not None
        n_users = self.user_vectors_.shape[0]
        rows = history_rows(histories)
        ratings = histories.ratings.astype(np.float64)
        matrix, means = rating_vectors(
            rows, histories.items, ratings, len(histories), histories.n_items, self.global_mean_
        )
        if self.config.similarity == "pearson":
            matrix = sp.csr_matrix(
                (ratings - means[rows], (rows, histories.items)), shape=(len(histories), histories.n_items)
            )
        sim = (
            (self._unit(matrix) @ self.user_vectors_.T).toarray()
            if n_users
            else np.zeros((len(histories), 0))
        )
        return sim, means

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        sim, means = self.similarities(histories)
        b, m = items.shape
        flat_rows = np.repeat(np.arange(b), m)
        flat_items = items.ravel()
        out = np.repeat(means, m).astype(np.float64)
        counts = self.item_ptr_[flat_items + 1] - self.item_ptr_[flat_items]
        order = np.argsort(counts, kind="stable")  # similar candidate counts share a chunk: little padding
        start = 0
        while start < len(order):  # counts ascend, so a chunk's last pair has its longest rater list
            stop = start + 1
            while stop < len(order) and (stop + 1 - start) * max(int(counts[order[stop]]), 1) <= PAIR_CELLS:
                stop += 1
            chunk = order[start:stop]
            width = max(int(counts[order[stop - 1]]), 1)
            out[chunk] += self._neighbour_deviation(sim, flat_rows[chunk], flat_items[chunk], width)
            start = stop
        return out.reshape(b, m)

    def _neighbour_deviation(
        self, sim: np.ndarray, rows: np.ndarray, items: np.ndarray, width: int
    ) -> np.ndarray:
        """``Σ S (R − μ) / Σ |S|`` over the top-k raters of each pair's item (0 where there is none)."""
        starts = self.item_ptr_[items]
        counts = self.item_ptr_[items + 1] - starts
        offsets = np.arange(width)
        valid = offsets[None, :] < counts[:, None]
        pos = np.where(valid, starts[:, None] + offsets[None, :], 0)
        raters = self.rater_users_[pos] if len(self.rater_users_) else np.zeros_like(pos)
        s = np.where(valid, sim[rows[:, None], raters], -np.inf)
        dev = np.where(valid, self.rater_deviations_[pos] if len(self.rater_deviations_) else 0.0, 0.0)
        k = self.config.k
        if width > k:
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(s, top, axis=1)
            dev = np.take_along_axis(dev, top, axis=1)
        s = np.where(np.isfinite(s), s, 0.0)
        total = np.abs(s).sum(axis=1)
        return (s * dev).sum(axis=1) / np.where(total > 0, total, 1.0)

    def to_torch(self) -> torch.nn.Module:
        """The served form carries the training ratings as dense arrays: the users' unit vectors
        ``[n_items, n_users]`` and each item's raters padded to the most-rated item's count."""
        self._check_fitted()
        counts = np.diff(self.item_ptr_)
        width = max(int(counts.max()) if len(counts) else 0, 1)
        offsets = np.arange(width)
        valid = offsets[None, :] < counts[:, None]
        pos = np.where(valid, self.item_ptr_[:-1, None] + offsets[None, :], 0)
        # a fitted model has at least one rating, so position 0 exists for the padding to point at
        return _UserSimilarityModule(
            self.global_mean_,
            np.asarray(self.user_vectors_.T.toarray(), np.float64),
            np.where(valid, self.rater_users_[pos], 0),
            np.where(valid, self.rater_deviations_[pos], 0.0),
            valid,
            self.config.k,
            self.config.similarity == "pearson",
        ).eval()

    def model_state(self) -> dict[str, np.ndarray]:
        vectors = self.user_vectors_
        return {
            "global_mean": np.asarray(self.global_mean_),
            "item_ptr": self.item_ptr_,
            "rater_users": self.rater_users_,
            "rater_deviations": self.rater_deviations_,
            "vectors_indptr": vectors.indptr.astype(np.int64),
            "vectors_indices": vectors.indices.astype(np.int64),
            "vectors_data": vectors.data.astype(np.float64),
            "vectors_shape": np.asarray(vectors.shape, dtype=np.int64),
        }

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.global_mean_ = float(state["global_mean"])
        self.item_ptr_ = np.asarray(state["item_ptr"], dtype=np.int64)
        self.rater_users_ = np.asarray(state["rater_users"], dtype=np.int64)
        self.rater_deviations_ = np.asarray(state["rater_deviations"], dtype=np.float64)
        shape = tuple(int(v) for v in state["vectors_shape"])
        self.user_vectors_ = sp.csr_matrix(
            (state["vectors_data"], state["vectors_indices"], state["vectors_indptr"]), shape=shape
        )


class _UserSimilarityModule(torch.nn.Module):
    """:meth:`UserSimilarity.estimate` on the padded history, in float64 like the numpy path, so the
    top-k neighbours are the same ones (a similarity rounded to float32 could swap near ties)."""

    user_vectors: torch.Tensor
    raters: torch.Tensor
    deviations: torch.Tensor
    rater_valid: torch.Tensor

    def __init__(
        self,
        global_mean: float,
        user_vectors: np.ndarray,
        raters: np.ndarray,
        deviations: np.ndarray,
        rater_valid: np.ndarray,
        k: int,
        pearson: bool,
    ) -> None:
        super().__init__()
        self.register_buffer("user_vectors", torch.from_numpy(np.ascontiguousarray(user_vectors)))
        self.register_buffer("raters", torch.from_numpy(np.asarray(raters, np.int64)))  # [n_items, W]
        self.register_buffer("deviations", torch.from_numpy(np.asarray(deviations, np.float64)))
        self.register_buffer("rater_valid", torch.from_numpy(np.asarray(rater_valid, bool)))
        self.global_mean = float(global_mean)
        self.k = min(int(k), raters.shape[1])
        self.pearson = bool(pearson)
        self.n_items = user_vectors.shape[0]

    def forward(
        self, history: torch.Tensor, history_ratings: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        ids, valid = history_entries(history, self.n_items)
        ratings = masked(history_ratings, valid)
        count = entry_count(valid)
        mean = torch.where(count > 0, ratio(ratings.sum(1), count), torch.full_like(count, self.global_mean))
        values = masked(ratings - mean.unsqueeze(1), valid) if self.pearson else ratings
        # the history's rating vector over the catalogue (a repeated item adds up, as in scipy's sum)
        slot = torch.where(valid, ids, torch.full_like(ids, self.n_items))
        vector = torch.zeros(ids.shape[0], self.n_items + 1, dtype=values.dtype, device=values.device)
        vector = vector.scatter_add(1, slot, values)[:, : self.n_items]
        unit = ratio(vector, (vector * vector).sum(1, keepdim=True).sqrt())
        sim = unit @ self.user_vectors  # [B, n_users]
        batch, m = items.shape
        width = self.raters.shape[1]
        near = torch.gather(sim, 1, self.raters[items].reshape(batch, m * width)).reshape(batch, m, width)
        near = torch.where(self.rater_valid[items], near, torch.full_like(near, float("-inf")))
        top, at = torch.topk(near, self.k, dim=2)  # ties at the k-th place may pick another rater
        dev = torch.gather(self.deviations[items], 2, at)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        deviation = ratio((top * dev).sum(2), top.abs().sum(2))
        return (mean.unsqueeze(1) + deviation).to(torch.float32)
