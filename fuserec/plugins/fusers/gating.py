"""Gating: per-user weights over the components (a mixture of experts / feature-weighted linear stacking).

Weighted fusion learns one weight per model for everybody; docs/protocol.md's lesson is that the gain lives in
learning per user. A small network reads features of the user that the exported graph can compute from
the padded history alone, and outputs softmax weights over the M components:

- ``log_history_length``: log(1 + number of history items);
- ``history_mean_log_popularity``: mean log(1 + popularity) of the history's items (mainstream or niche);
- ``history_diversity``: 1 - ||mean of the history's unit content vectors||², an O(L) stand-in for
  1 - mean pairwise cosine of the history (0 for an empty history);
- with ``score_features``, each component's own confidence: its maximum per-user z-score over the unseen
  items (a peaked score list is a sure model; a flat one is guessing).

``fused(u, i) = sum_m w_m(u) * z_m(u, i)``, where ``z_m`` is component m's score standardised per user over
the unseen items (:func:`fuserec.fusion.masked_zscore`); the contribution of component m is
``w_m(u) * z_m(u, i)``. Rule-based fallback, before the softmax: a component whose scores are constant over
a user's unseen items (no signal: item-kNN for an empty history) gets weight 0 for that user, the others
are renormalised. So cold users are routed by what the network learned from short histories, never to a
model that cannot rank for them.

Training is on the validation carve only (components fitted on train', their scores of validation users,
the validation truth): a listwise softmax loss over the full catalogue (seen items excluded), Adam,
mini-batches of users; 20% of validation users are held out and their NDCG@10 picks the number of steps
(early stopping), then the network is refitted on every validation user for that many steps. Everything
random derives from ``config.seed``. Activity recency and user attributes are not features: the served
graph reads the padded history only (time is stacking's ``last_time`` input).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import FloatRange, IntRange, SearchDim
from fuserec.fusion import (
    COLD_COPIES_HELP,
    Fuser,
    ValidationScores,
    masked_zscore,
    single_component,
    user_slices,
)
from fuserec.histories import Histories
from fuserec.listwise import (
    MASKED,
    ListwiseConfig,
    fit_on_validation,
    listwise_loss,
    restore_training,
    training_state,
    truth_rows,
)

if TYPE_CHECKING:
    import pandas as pd

    from fuserec.data.dataset import Dataset

USER_FEATURES = ("log_history_length", "history_mean_log_popularity", "history_diversity")
#: A component has no signal for a user when its unseen scores span less than this share of their scale.
NO_SIGNAL_SPAN = 1e-6
GATE_KEYS = ("w1", "b1", "w2", "b2", "mean", "std")


class GatingConfig(ListwiseConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "hidden": IntRange(4, 64, log=True),
        "learning_rate": FloatRange(1e-3, 0.1, log=True),
        "weight_decay": FloatRange(1e-6, 1e-2, log=True),
    }

    hidden: int = Field(16, ge=1, description="units of the gating network's hidden layer")
    score_features: bool = Field(True, description="also read each component's max z-score per user")
    content_dims: int = Field(32, ge=1, description="content vectors are reduced to this many dimensions")
    #: 1.0 was chosen on validation users held out from the fit (docs/concepts/fusion.md): without copies
    #: the gate routes short histories to a model it learned on long ones; with every warm user copied it
    #: leads on users cut to 1-5 items, with no loss on real histories.
    cold_copies: float = Field(1.0, ge=0.0, le=1.0, description=COLD_COPIES_HELP)
    fallback: bool = Field(
        True, description="serve the best component alone when gating does not beat it on held-out users"
    )


class Gating(Fuser):
    """``fused = sum_m w_m(u) z_m``; ``w(u) = softmax(MLP(user features))``, no-signal components at 0."""

    Config = GatingConfig
    config: GatingConfig

    # -- data-derived tables ------------------------------------------------------------------------
    def observe(self, data: Dataset) -> None:
        """Item popularity and unit content vectors from ``data`` (train' to learn, full train to serve)."""
        from fuserec.features import item_content_vectors, svd_reduce

        content = svd_reduce(item_content_vectors(data.items), self.config.content_dims)
        norms = np.linalg.norm(content, axis=1, keepdims=True)
        self.tables_ = {
            "log_popularity": np.log1p(data.item_popularity()).astype(np.float32),
            "content": (content / np.maximum(norms, 1e-12)).astype(np.float32),
        }

    # -- features and weights -----------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        names = self._check_fitted_names()
        return list(USER_FEATURES) + ([f"max_z:{n}" for n in names] if self.config.score_features else [])

    def user_features(
        self, scores: torch.Tensor, seen: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [B, F], signal bool [B, M])`` from the components' scores and z-scores and the history."""
        hot = seen.to(torch.float32)
        length = hot.sum(dim=1, keepdim=True)
        count = torch.clamp(length, min=1.0)
        log_pop = torch.from_numpy(self.tables_["log_popularity"]).to(scores.device)
        content = torch.from_numpy(self.tables_["content"]).to(scores.device)
        mean_pop = (hot @ log_pop.unsqueeze(1)) / count
        centre = (hot @ content) / count
        diversity = torch.where(length > 0, 1.0 - (centre * centre).sum(dim=1, keepdim=True), 0.0)
        columns = [torch.log1p(length), mean_pop, diversity]
        if self.config.score_features:
            columns.append(z.amax(dim=2).t())
        big = torch.finfo(scores.dtype).max
        unseen = ~seen.unsqueeze(0)
        high = torch.where(unseen, scores, torch.full_like(scores, -big)).amax(dim=2)
        low = torch.where(unseen, scores, torch.full_like(scores, big)).amin(dim=2)
        scale = torch.maximum(high.abs(), low.abs())
        signal = (high - low) > NO_SIGNAL_SPAN * scale + 1e-12  # [M, B]; false too when nothing is unseen
        return torch.cat(columns, dim=1), signal.t()

    def gate(self, x: torch.Tensor, signal: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Softmax weights ``[B, M]`` of standardised features ``x``; components without signal get 0."""
        h = torch.tanh(((x - params["mean"]) / params["std"]) @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        logits = torch.where(signal, logits, torch.full_like(logits, MASKED))
        return torch.softmax(logits, dim=1)

    def _weights(self, scores: torch.Tensor, seen: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x, signal = self.user_features(scores, seen, z)
        params = {k: torch.from_numpy(v).to(scores.device) for k, v in self.gate_.items()}
        return self.gate(x, signal, params)

    def weights_for(self, histories: Histories, batch: int = 1024) -> np.ndarray:
        """``float32 [B, M]``: per-history weights over the components (``names_`` order); rows sum to 1.

        Scored ``batch`` histories at a time: the components' scores are ``[M, batch, n_items]`` floats,
        which for every test user at once would not fit in memory on a large catalog."""
        parts = []
        for start in range(0, len(histories), batch):
            chunk = histories.select(np.arange(start, min(start + batch, len(histories))))
            seen = torch.from_numpy(chunk.to_csr().toarray() > 0)
            with torch.no_grad():
                scores = self.component_scores(chunk)
                parts.append(self._weights(scores, seen, masked_zscore(scores, seen)))
        weights = torch.cat(parts) if parts else torch.zeros(0, len(self._check_fitted_names()))
        if getattr(self, "fallback_", -1) >= 0:  # what is served: the fallback component alone
            weights = torch.zeros_like(weights)
            weights[:, self.fallback_] = 1.0
        return weights.numpy().astype(np.float32)

    # -- the combination ----------------------------------------------------------------------------
    def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "fallback_", -1) >= 0:  # lost to a component on held-out users: serve it alone
            return single_component(scores, self.fallback_)
        z = masked_zscore(scores, seen)
        weights = self._weights(scores, seen, z)  # [B, M]
        parts = weights.t().unsqueeze(2) * z
        return parts.sum(dim=0), parts

    # -- learning -----------------------------------------------------------------------------------
    def fit_combination(self, data: Dataset, truth: pd.DataFrame) -> None:
        cfg = self.config
        self.observe(data)
        val = ValidationScores(self, data, truth, cfg.max_users, cfg.seed, cfg.cold_copies)
        m = len(val.scores)
        with torch.no_grad():  # a slice of users at a time: z-scores of all of them would be [M, U, n]
            parts = [
                self.user_features(
                    val.scores[:, rows], val.seen[rows], masked_zscore(val.scores[:, rows], val.seen[rows])
                )
                for rows in user_slices(len(val.users))
            ]
            x = torch.cat([p[0] for p in parts])
            signal = torch.cat([p[1] for p in parts])
        mean = x.mean(dim=0)
        std = torch.where(x.std(dim=0, correction=0) > 1e-6, x.std(dim=0, correction=0), 1.0)
        n_features = x.shape[1]

        def build() -> torch.nn.ParameterDict:
            gen = torch.Generator().manual_seed(cfg.seed)
            bound = 1.0 / np.sqrt(n_features)
            return torch.nn.ParameterDict(
                {
                    "w1": torch.nn.Parameter(
                        (torch.rand(n_features, cfg.hidden, generator=gen) * 2 - 1) * bound
                    ),
                    "b1": torch.nn.Parameter(torch.zeros(cfg.hidden)),
                    "w2": torch.nn.Parameter(torch.zeros(cfg.hidden, m)),  # uniform weights to start
                    "b2": torch.nn.Parameter(torch.zeros(m)),
                    "log_temperature": torch.nn.Parameter(torch.zeros(())),
                }
            )

        def fused(module: torch.nn.ParameterDict, rows: np.ndarray) -> torch.Tensor:
            idx = torch.from_numpy(rows)
            params = {**dict(module.items()), "mean": mean, "std": std}
            weights = self.gate(x[idx], signal[idx], params)
            z = masked_zscore(val.scores[:, idx], val.seen[idx])
            return torch.einsum("bm,mbn->bn", weights, z)

        def loss(module: torch.nn.ParameterDict, rows: np.ndarray) -> torch.Tensor:
            logits = fused(module, rows) * torch.exp(module["log_temperature"])
            penalty = module["w1"].square().sum() + module["w2"].square().sum()
            return (
                listwise_loss(logits, val.exclude[torch.from_numpy(rows)], truth_rows(val, rows))
                + cfg.weight_decay * penalty
            )

        module, self.training_, self.held_out_, self.fallback_ = fit_on_validation(
            build, loss, fused, val, cfg, cfg.fallback
        )
        self.gate_ = {k: module[k].detach().numpy().astype(np.float32) for k in ("w1", "b1", "w2", "b2")}
        self.gate_ |= {"mean": mean.numpy().astype(np.float32), "std": std.numpy().astype(np.float32)}

    # -- persistence --------------------------------------------------------------------------------
    @property
    def holdout_ndcg(self) -> dict[str, float]:
        """Held-out validation NDCG@10: this fuser, equal z-score weights, the best component alone."""
        keys = ("fused", "uniform", "best_single")
        return {k: float(self.training_[f"holdout_{k}"]) for k in keys}

    def get_state(self) -> dict[str, np.ndarray]:
        state = {f"gate_{k}": v for k, v in self.gate_.items()}
        state |= {f"table_{k}": v for k, v in self.tables_.items()}
        fallback = {"fallback": np.asarray(getattr(self, "fallback_", -1), dtype=np.int64)}
        return state | training_state(self.training_) | fallback

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.fallback_ = int(state["fallback"]) if "fallback" in state else -1
        self.gate_ = {k: state[f"gate_{k}"] for k in GATE_KEYS}
        self.tables_ = {k: state[f"table_{k}"] for k in ("log_popularity", "content")}
        self.training_ = restore_training(state)
