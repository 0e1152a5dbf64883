"""A ridge-regularised linear blend of the components' predictions: the fuser every other must beat.

``r̂ = b + Σ_k w_k · r̂_k``, ``(w, b)`` by ridge regression on the out-of-fold rows (the intercept is not
penalised). Blending correlated but differently biased raters is the oldest win of the Netflix Prize;
with tens of thousands of out-of-fold rows and a handful of weights it needs no early stopping.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import FloatRange, SearchDim
from fuserec.rating_fuser import LinearParts, RatingFuser, RatingFuserConfig, ridge


class BlendConfig(RatingFuserConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {"alpha": FloatRange(1e-3, 1e4, log=True)}

    alpha: float = Field(1.0, ge=0.0, description="L2 penalty on the weights (not on the intercept)")


class Blend(RatingFuser):
    Config = BlendConfig
    config: BlendConfig
    weights_: np.ndarray
    intercept_: float

    def fit_arrays(
        self, predictions: np.ndarray, meta: np.ndarray, target: np.ndarray, groups: np.ndarray
    ) -> None:
        self.weights_, self.intercept_ = ridge(predictions, target, self.config.alpha)

    def to_torch(self) -> torch.nn.Module:
        return LinearParts(self.weights_, np.asarray([self.intercept_]))

    def summary(self, components: list[str]) -> dict[str, Any]:
        return {
            "weights": dict(zip(components, map(float, self.weights_), strict=True)),
            "intercept": self.intercept_,
        }

    def model_state(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights_, "intercept": np.asarray(self.intercept_)}

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.weights_ = np.asarray(state["weights"], np.float64)
        self.intercept_ = float(state["intercept"])
