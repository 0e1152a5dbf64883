"""Weighted score fusion: normalise each model's scores per user, add them with weights from validation.

Why per-user normalisation: models score on unrelated scales (cosine sums, factor dot products,
log-likelihoods), and a ranking only depends on one user's scores. Weights are searched with Optuna
(TPE, seeded) on the validation carve: the first trials are equal weights and each model alone, so the
blend is never worse on validation than the best single component. docs/protocol.md's anchors show the
limit: a tuned linear blend gains little over the best of its parts; learned fusers read more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from fuserec.api import SearchDim
from fuserec.fusion import (
    Fuser,
    FuserConfig,
    ValidationScores,
    by_users,
    masked_minmax,
    masked_zscore,
)

if TYPE_CHECKING:
    import pandas as pd

    from fuserec.data.dataset import Dataset

NORMALISATIONS = ("minmax", "zscore")


class WeightedConfig(FuserConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {}

    normalization: Literal["minmax", "zscore", "search"] = Field(
        "search", description="per-user score normalisation; `search` picks one on validation"
    )
    n_trials: int = Field(80, ge=1, description="Optuna trials over the weights (and the normalisation)")
    max_users: int | None = Field(5000, ge=1, description="validation users the search scores (None = all)")


class Weighted(Fuser):
    """``fused = sum_m w_m * normalise(score_m)``, weights in [0, 1] chosen on validation NDCG@10."""

    Config = WeightedConfig
    config: WeightedConfig

    def fit_combination(self, data: Dataset, truth: pd.DataFrame) -> None:
        import optuna

        cfg = self.config
        val = ValidationScores(self, data, truth, cfg.max_users, cfg.seed)
        choices = NORMALISATIONS if cfg.normalization == "search" else (cfg.normalization,)
        transforms = {"minmax": masked_minmax, "zscore": masked_zscore}
        # The raw scores are not read again: the last normalisation overwrites them in place, so the search
        # holds one [M, U, n] tensor per normalisation and no more (one such tensor less at the peak).
        normalised = {
            norm: by_users(
                transforms[norm], val.scores, val.seen, out=val.scores if i == len(choices) - 1 else None
            )
            for i, norm in enumerate(choices)
        }
        names = self._check_fitted_names()

        def objective(trial: optuna.Trial) -> float:
            norm = trial.suggest_categorical("normalization", choices)
            w = torch.tensor([trial.suggest_float(f"w_{n}", 0.0, 1.0) for n in names], dtype=torch.float32)
            if float(w.sum()) <= 0:
                return 0.0
            return val.ndcg(torch.einsum("m,mun->un", w, normalised[norm]))

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
        for norm in choices:  # equal weights, then each model alone: the blend never loses on validation
            study.enqueue_trial({"normalization": norm, **{f"w_{n}": 1.0 for n in names}})
        for n in names:
            study.enqueue_trial({"normalization": choices[0], **{f"w_{m}": float(m == n) for m in names}})
        study.optimize(objective, n_trials=max(cfg.n_trials, len(names) + len(choices)))
        best = study.best_trial.params
        self.normalization_ = str(best["normalization"])
        self.weights_ = np.asarray([best[f"w_{n}"] for n in names], dtype=np.float32)
        self.validation_ndcg_ = float(study.best_value)

    def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalise = masked_minmax if self.normalization_ == "minmax" else masked_zscore
        weights = torch.from_numpy(self.weights_).to(scores.device)
        parts = weights[:, None, None] * normalise(scores, seen)
        return parts.sum(dim=0), parts

    @property
    def weights(self) -> dict[str, float]:
        """The learned weight of each component, by name."""
        return dict(zip(self._check_fitted_names(), self.weights_.tolist(), strict=True))

    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "weights": self.weights_,
            "normalization": np.asarray(NORMALISATIONS.index(self.normalization_), dtype=np.int64),
            "validation_ndcg": np.asarray(self.validation_ndcg_, dtype=np.float64),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.weights_ = state["weights"].astype(np.float32)
        self.normalization_ = NORMALISATIONS[int(state["normalization"])]
        self.validation_ndcg_ = float(state["validation_ndcg"])
