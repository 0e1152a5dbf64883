"""Multi-objective re-ranking after any scorer: MMR diversity over content vectors and a novelty bonus.

Accuracy is not the only goal: a list of ten near-identical action films is accurate and useless. MMR
(Carbonell & Goldstein 1998) builds the list greedily, each step taking the item that best trades its
relevance against its similarity to what is already listed; a novelty term (self-information of the
item's popularity) pushes toward the long tail. Both are weighted by a parameter, so a user of fuserec
can move along the accuracy/diversity curve knowingly; ``diversity_curve`` measures that curve.

Written in torch with a fixed number of steps (k), so it can also run inside an exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch


@dataclass(frozen=True)
class Rerank:
    """``diversity`` (lambda) in [0, 1): weight of dissimilarity; ``novelty`` >= 0: weight of the bonus."""

    diversity: float = 0.0
    novelty: float = 0.0
    depth: int = 100  # the pool: the scorer's top-``depth`` unseen items
    relevance: str = "minmax"  # "minmax": scores min-max scaled in the pool; "rank": 1 - position / depth
    penalty: str = "mean"  # similarity to the list: "mean" (greedy intra-list diversity) or "max" (MMR)
    keep: int = 5  # the first ``keep`` slots stay in score order (the head NDCG weighs most)
    order: str = "score"  # the chosen items listed by "score" (the scorer's order) or in "greedy" pick order

    def __post_init__(self) -> None:
        if not 0.0 <= self.diversity < 1.0:
            raise ValueError(f"rerank diversity must lie in [0, 1), got {self.diversity}")
        if self.penalty not in ("mean", "max"):
            raise ValueError(f"rerank penalty must be 'mean' or 'max', got {self.penalty!r}")
        if self.order not in ("score", "greedy"):
            raise ValueError(f"rerank order must be 'score' or 'greedy', got {self.order!r}")
        if self.relevance not in ("rank", "minmax"):
            raise ValueError(f"rerank relevance must be 'rank' or 'minmax', got {self.relevance!r}")
        if self.novelty < 0.0 or self.depth < 1 or self.keep < 0:
            raise ValueError(f"rerank novelty must be >= 0 and depth >= 1, got {self.novelty}, {self.depth}")

    @property
    def active(self) -> bool:
        return self.diversity > 0.0 or self.novelty > 0.0


def novelty_bonus(popularity: np.ndarray, n_users: int) -> np.ndarray:
    """``float32 [n]`` self-information of each item scaled to [0, 1] (1 = never seen)."""
    info = -np.log2((np.asarray(popularity, np.float64) + 1.0) / (max(n_users, 1) + 1.0))
    top = info.max() if info.size and info.max() > 0 else 1.0
    return (info / top).astype(np.float32)


def mmr_top_k(
    scores: torch.Tensor,
    seen: torch.Tensor,
    vectors: torch.Tensor,
    bonus: torch.Tensor,
    k: int,
    rerank: Rerank,
) -> torch.Tensor:
    """``int64 [B, k]`` lists: greedy MMR over each user's top-``depth`` unseen items.

    Step score = ``(1 - diversity) * relevance + novelty * bonus - diversity * similarity to the list``,
    where similarity is the mean cosine to the listed items (``penalty="mean"``: greedy intra-list
    diversity, which traded accuracy for diversity better than MMR's max on ML-100k validation) or the max
    (MMR), and relevance is min-max scaled within the pool. With both weights 0 it is the plain top-k.

    The greedy steps choose *which* items are listed; with ``order="score"`` they are then listed in the
    scorer's order. Intra-list diversity does not depend on the order, and for a fixed set the scorer's
    order maximises its expected DCG, so this costs no diversity and recovered NDCG@10 on validation.
    """
    b, n = scores.shape
    depth = min(rerank.depth, n)
    k = min(k, depth)
    masked = scores.masked_fill(seen, float("-inf"))
    if torch.onnx.is_in_onnx_export():  # onnxruntime's TopK keeps equal scores in index order ...
        pool_scores, pool = torch.topk(masked, depth, dim=1)
    else:  # ... and so does a stable sort, so ties enter the pool (and win argmax) alike in both
        from fuserec.fusion import top_in_protocol_order

        full = depth >= n
        pool = (
            masked.argsort(dim=1, descending=True, stable=True)
            if full
            else top_in_protocol_order(masked, depth)
        )
        pool_scores = masked.gather(1, pool)
    valid = torch.isfinite(pool_scores)
    finite = torch.where(valid, pool_scores, torch.zeros_like(pool_scores))
    low = torch.where(valid, pool_scores, torch.full_like(pool_scores, float("inf"))).amin(1, keepdim=True)
    high = finite.amax(1, keepdim=True)
    if rerank.relevance == "rank":  # scale-free, but blind to how far apart the scores are
        rank = torch.arange(depth, dtype=scores.dtype, device=scores.device).unsqueeze(0)
        relevance = (1.0 - rank / depth).expand(b, depth)
    else:
        relevance = (finite - torch.where(torch.isfinite(low), low, 0.0)) / torch.clamp(high - low, min=1e-12)
    gain = (1.0 - rerank.diversity) * relevance + rerank.novelty * bonus[pool]
    gain = torch.where(valid, gain, torch.full_like(gain, float("-inf")))
    relevance_only = torch.where(valid, relevance, torch.full_like(relevance, float("-inf")))
    unit = vectors[pool]  # [B, depth, d], rows L2-normalised (zero rows have no similarity)
    sims = unit @ unit.transpose(1, 2)  # [B, depth, depth]
    closest = torch.zeros_like(gain)  # max (MMR) or mean (greedy intra-list diversity) cosine to the list
    total = torch.zeros_like(gain)
    taken = torch.zeros_like(gain, dtype=torch.bool)
    picks = []  # pool positions picked, step by step (depth + step for a slot left empty)
    for position in range(k):
        if position < rerank.keep:  # the head stays in relevance order; diversity works on the rest
            step = torch.where(taken, torch.full_like(gain, float("-inf")), relevance_only)
        else:
            step = torch.where(taken, torch.full_like(gain, float("-inf")), gain - rerank.diversity * closest)
        pick = step.argmax(dim=1, keepdim=True)  # ties: the first, i.e. the higher-scored item
        picks.append(torch.where(torch.isfinite(step.gather(1, pick)), pick, depth + position))
        taken = taken.scatter(1, pick, True)
        sim = sims.gather(1, pick.unsqueeze(2).expand(b, 1, depth)).squeeze(1)
        if rerank.penalty == "max":
            closest = torch.maximum(closest, sim)
        else:
            total = total + sim
            closest = total / float(position + 1)
    positions = torch.cat(picks, dim=1)
    if rerank.order == "score":
        # The pool is in score order, so ascending pool positions list the chosen items by score (ties in
        # protocol order), empty slots last. Positions are distinct, so topk needs no stable sort and
        # exports to ONNX as is.
        positions = torch.topk(positions, k, dim=1, largest=False, sorted=True).values
    listed = pool.gather(1, positions.clamp(max=depth - 1))
    return torch.where(positions < depth, listed, torch.full_like(listed, -1))


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def intra_list_diversity(topk: np.ndarray, vectors: np.ndarray, chunk: int = 4096) -> float:
    """Mean over lists of the mean pairwise ``1 - cosine`` of their items (padding ignored).

    Lists with fewer than two items have no pairs and are left out. Computed ``chunk`` lists at a time.
    """
    unit = unit_vectors(vectors)
    topk = np.asarray(topk)
    values = []
    for start in range(0, len(topk), chunk):
        rows = topk[start : start + chunk]
        valid = rows >= 0
        m = valid.sum(axis=1)
        v = unit[np.where(valid, rows, 0)] * valid[..., None]  # [c, k, d], padding rows zero
        summed = np.einsum("ckd,cd->c", v, v.sum(axis=1)) - np.einsum("ckd,ckd->c", v, v)
        pairs = m >= 2
        values.append(1.0 - summed[pairs] / (m[pairs] * (m[pairs] - 1)))
    values_all = np.concatenate(values) if values else np.empty(0)
    return float(values_all.mean()) if values_all.size else float("nan")


def gini_of_exposure(topk: np.ndarray, n_items: int) -> float:
    """Gini coefficient of how often each catalog item is recommended (0 = even, 1 = one item only)."""
    items = np.asarray(topk)
    counts = np.sort(np.bincount(items[items >= 0], minlength=n_items).astype(np.float64))
    if counts.sum() == 0:
        return float("nan")
    ranks = np.arange(1, n_items + 1)
    return float((2 * ranks - n_items - 1) @ counts / (n_items * counts.sum()))


def beyond_accuracy(
    topk: np.ndarray, vectors: np.ndarray, popularity: np.ndarray, n_users: int
) -> dict[str, float]:
    """Diversity, Gini of exposure and self-information of top-k lists (one k: the lists' width)."""
    from fuserec.metrics import self_information

    k = topk.shape[1]
    return {
        f"diversity@{k}": intra_list_diversity(topk, vectors),
        f"gini@{k}": gini_of_exposure(topk, len(popularity)),
        f"self_information@{k}": self_information(topk, popularity, max(n_users, 1)),
    }


class DiversityCurve:
    """NDCG@k, diversity, novelty, coverage and Gini for each re-ranking setting, batch by batch.

    ``add`` takes one batch of scores (computed once for every setting); ``result`` scores the lists.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        popularity: np.ndarray,
        n_with_history: int,
        settings: list[Rerank],
        k: int = 10,
    ) -> None:
        self.vectors, self.popularity, self.settings, self.k = vectors, popularity, settings, k
        self.n_with_history = n_with_history
        self.unit = torch.from_numpy(unit_vectors(vectors))
        self.bonus = torch.from_numpy(novelty_bonus(popularity, n_with_history))
        self.lists: list[list[np.ndarray]] = [[] for _ in settings]

    def add(self, scores: np.ndarray, seen: sp.spmatrix | sp.sparray) -> None:
        """One batch: scores ``[B, n]`` and the users' training items (excluded from the lists)."""
        array = np.asarray(scores, dtype=np.float32)
        # Shared scores are read-only (fusion.SharedScores): torch would warn on wrapping them, so copy.
        values = torch.from_numpy(array if array.flags.writeable else array.copy())
        mask = torch.from_numpy(sp.csr_matrix(seen).toarray() > 0)
        for parts, setting in zip(self.lists, self.settings, strict=True):
            parts.append(mmr_top_k(values, mask, self.unit, self.bonus, self.k, setting).numpy())

    def result(self, truth: sp.spmatrix | sp.sparray) -> list[dict[str, float]]:
        """One row per setting; ``truth`` holds the added users' relevant items, in the order added."""
        from fuserec.metrics import evaluate_rankings

        k, out = self.k, []
        for setting, parts in zip(self.settings, self.lists, strict=True):
            topk = np.concatenate(parts) if parts else np.empty((0, k), dtype=np.int64)
            metrics = evaluate_rankings(topk, truth, [k], self.popularity)
            out.append(
                {
                    "diversity_weight": setting.diversity,
                    "novelty_weight": setting.novelty,
                    f"ndcg@{k}": metrics[f"ndcg@{k}"],
                    f"coverage@{k}": metrics[f"coverage@{k}"],
                    **beyond_accuracy(topk, self.vectors, self.popularity, self.n_with_history),
                }
            )
        return out


def diversity_curve(
    score_fn: Any,
    users: np.ndarray,
    train: sp.csr_matrix,
    truth: sp.csr_matrix,
    vectors: np.ndarray,
    popularity: np.ndarray,
    settings: list[Rerank],
    k: int = 10,
    batch_size: int = 256,
) -> list[dict[str, float]]:
    """:class:`DiversityCurve` of ``score_fn(rows)`` over ``users`` (scores computed once per batch)."""
    n_with_history = int((np.diff(sp.csr_matrix(train).indptr) > 0).sum())
    curve = DiversityCurve(vectors, popularity, n_with_history, settings, k)
    for start in range(0, len(users), batch_size):
        rows = users[start : start + batch_size]
        curve.add(score_fn(rows), train[rows])
    return curve.result(truth[users])
