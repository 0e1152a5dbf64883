"""Rank-based voting: Borda count and reciprocal rank fusion. Nothing is learned.

They are the baselines a learned fuser must beat (docs/protocol.md: RRF of strong models loses to the best of
them). Ranks are taken among each user's unseen items, with the evaluation's tie rule, so an item's vote
does not depend on how a model scores the items the user already has.

Ranks are discontinuous in the scores: two component scores tied in Python may differ by one float32 ulp
under onnxruntime and swap ranks, moving both items' votes. So the exported graph is held to the same
top-k as Python (``exact_scores = False``), not to the same fused scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field

from fuserec.fusion import Fuser, FuserConfig, masked_ranks

if TYPE_CHECKING:
    import pandas as pd

    from fuserec.data.dataset import Dataset


class BordaConfig(FuserConfig):
    depth: int = Field(100, ge=1, description="only each model's top `depth` items earn points: depth - rank")


class Borda(Fuser):
    """Each model gives ``(depth - rank) / depth`` points to its top ``depth`` unseen items; points add up."""

    Config = BordaConfig
    config: BordaConfig
    exact_scores = False

    def fit_combination(self, data: Dataset, truth: pd.DataFrame) -> None:
        """Nothing to learn: Borda weighs every model alike."""

    def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        depth = float(self.config.depth)
        parts = torch.clamp(depth - masked_ranks(scores, seen, self.config.depth), min=0.0) / depth
        return parts.sum(dim=0), parts


class RRFConfig(FuserConfig):
    k: float = Field(60.0, gt=0.0, description="RRF constant: each model adds 1 / (k + rank), rank from 1")


class RRF(Fuser):
    """Reciprocal rank fusion (Cormack et al. 2009): ``sum_m 1 / (k + rank_m)`` over unseen items."""

    Config = RRFConfig
    config: RRFConfig
    exact_scores = False

    def fit_combination(self, data: Dataset, truth: pd.DataFrame) -> None:
        """Nothing to learn: RRF weighs every model alike."""

    def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ranks = masked_ranks(scores, seen)
        parts = torch.where(seen.unsqueeze(0), torch.zeros_like(ranks), 1.0 / (self.config.k + ranks + 1.0))
        return parts.sum(dim=0), parts
