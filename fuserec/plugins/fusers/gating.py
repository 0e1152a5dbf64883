"""Gating: per-user weights over the components (a mixture of experts / feature-weighted linear stacking).

Weighted fusion learns one weight per model for everybody; PROTOCOL.md's lesson is that the gain lives in
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

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import FloatRange, IntRange, SearchDim
from fuserec.fusion import (
    COLD_COPIES_HELP,
    Fuser,
    FuserConfig,
    ValidationScores,
    masked_zscore,
    single_component,
    user_slices,
)
from fuserec.histories import Histories

if TYPE_CHECKING:
    import pandas as pd

    from fuserec.data.dataset import Dataset

USER_FEATURES = ("log_history_length", "history_mean_log_popularity", "history_diversity")
#: A component has no signal for a user when its unseen scores span less than this share of their scale.
NO_SIGNAL_SPAN = 1e-6
MASKED = -1e4  # logit of a component without signal: exp underflows to exactly 0 in float32
GATE_KEYS = ("w1", "b1", "w2", "b2", "mean", "std")


class ListwiseConfig(FuserConfig):
    """Training settings shared by the torch fusers (gating, features): listwise loss, early stopping."""

    steps: int = Field(400, ge=1, description="most Adam steps (one mini-batch of users each)")
    learning_rate: float = Field(0.01, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 penalty on the learned weights")
    batch_users: int = Field(256, ge=1, description="validation users per step")
    holdout: float = Field(0.2, gt=0.0, lt=1.0, description="share of validation users for early stopping")
    eval_every: int = Field(10, ge=1, description="steps between held-out NDCG@10 checks")
    patience: int = Field(8, ge=1, description="checks without a held-out gain before stopping")
    refit: bool = Field(True, description="refit on all validation users for the chosen number of steps")
    max_users: int | None = Field(5000, ge=1, description="validation users to learn from (None = all)")
    cold_copies: float = Field(0.0, ge=0.0, le=1.0, description=COLD_COPIES_HELP)
    threads: int | None = Field(None, ge=1, description="torch CPU threads while training (None = torch's)")


class GatingConfig(ListwiseConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "hidden": IntRange(4, 64, log=True),
        "learning_rate": FloatRange(1e-3, 0.1, log=True),
        "weight_decay": FloatRange(1e-6, 1e-2, log=True),
    }

    hidden: int = Field(16, ge=1, description="units of the gating network's hidden layer")
    score_features: bool = Field(True, description="also read each component's max z-score per user")
    content_dims: int = Field(32, ge=1, description="content vectors are reduced to this many dimensions")
    #: 1.0 was chosen on ML-100k validation users held out from the fit (docs/fusion.md, mean of 3 splits):
    #: NDCG@10 of warm users cut to 1-5 items 0.137 (none), 0.173 (0.25), 0.177 (0.5), 0.180 (1.0); real
    #: users' 0.200, 0.199, 0.201, 0.202.
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
        from fuserec.features import item_content_vectors
        from fuserec.plugins.fusers.stacking import _reduce

        content = _reduce(item_content_vectors(data.items), self.config.content_dims)
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

        module, self.training_ = fit_listwise(
            build, loss, lambda mod, rows: val.ndcg(fused(mod, rows), rows=rows), val.origin, cfg
        )
        self.training_ |= holdout_baselines(val, self.training_["holdout_rows"])
        self.fallback_ = fallback_component(val, self.training_, cfg.fallback)
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


# -- shared by the torch fusers -----------------------------------------------------------------------
TRAINING_KEYS = ("steps", "holdout_fused", "holdout_uniform", "holdout_best_single")


def truth_rows(val: ValidationScores, rows: np.ndarray) -> torch.Tensor:
    """``bool [len(rows), n]``: the validation positives of those validation users."""
    return torch.from_numpy(val.truth[rows].toarray() > 0)


def listwise_loss(logits: torch.Tensor, seen: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the catalogue (seen items excluded), averaged over a user's positives."""
    logp = torch.log_softmax(logits.masked_fill(seen, MASKED * 1e3), dim=1)
    positives = truth & ~seen
    count = positives.sum(dim=1)
    per_user = -torch.where(positives, logp, 0.0).sum(dim=1) / torch.clamp(count, min=1)
    keep = count > 0
    return per_user[keep].mean() if bool(keep.any()) else logits.sum() * 0.0


def fit_listwise(
    build: Callable[[], torch.nn.Module],
    loss: Callable[[torch.nn.Module, np.ndarray], torch.Tensor],
    holdout_ndcg: Callable[[torch.nn.Module, np.ndarray], float],
    origin: np.ndarray,
    cfg: ListwiseConfig,
) -> tuple[torch.nn.Module, dict]:
    """Adam on mini-batches of users; held-out NDCG@10 picks the steps; then refit on every user.

    ``origin[r]``: the user row ``r`` describes (:attr:`ValidationScores.origin`); rows of one user, a
    real one and its simulated cold copies, are held out together, so early stopping never scores a user
    the steps were learned on. Only real rows are judged: the copies are there to teach the model about
    short histories, and the number of steps is chosen for the users it will serve.

    ``build()`` must return freshly initialised parameters, the same each call (seeded). Returns the final
    module and a record: ``steps`` (chosen), ``holdout_fused`` (held-out NDCG@10 at those steps) and
    ``holdout_rows`` (which validation users were held out).
    """
    from fuserec.training import torch_threads

    rng = np.random.default_rng(cfg.seed)
    origin = np.asarray(origin, dtype=np.int64)
    n_users, n_rows = int(origin.max()) + 1 if len(origin) else 0, len(origin)
    order = rng.permutation(n_users)
    n_hold = round(cfg.holdout * n_users) if n_users >= 10 else 0
    held = np.zeros(n_users, dtype=bool)
    held[order[:n_hold]] = True
    # Copies of held-out users are neither learned from nor judged on: copies teach, real users judge.
    real = origin == np.arange(n_rows)
    hold, learn = np.flatnonzero(held[origin] & real), np.flatnonzero(~held[origin])

    def run(rows: np.ndarray, steps: int, check: np.ndarray | None) -> tuple[torch.nn.Module, int, float]:
        module = build()
        optimiser = torch.optim.Adam(module.parameters(), lr=cfg.learning_rate)
        batches = np.random.default_rng(cfg.seed + 1)
        queue: list[np.ndarray] = []
        best_step, best, best_state, stale = 0, -1.0, None, 0
        if check is not None:
            with torch.no_grad():
                best = holdout_ndcg(module, check)
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for step in range(1, steps + 1):
            if not queue:
                perm = batches.permutation(rows)
                queue = [perm[i : i + cfg.batch_users] for i in range(0, len(perm), cfg.batch_users)][::-1]
            batch = np.sort(queue.pop())
            optimiser.zero_grad()
            loss(module, batch).backward()
            optimiser.step()
            if check is not None and (step % cfg.eval_every == 0 or step == steps):
                with torch.no_grad():
                    score = holdout_ndcg(module, check)
                if score > best + 1e-9:
                    best_step, best, stale = step, score, 0
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        if best_state is not None:
            module.load_state_dict(best_state)
        return module, best_step if check is not None else steps, best

    with torch_threads(cfg.threads):
        if len(hold) == 0:
            module, steps, score = run(learn, cfg.steps, None)
            return module, {"steps": steps, "holdout_fused": np.nan, "holdout_rows": hold}
        module, steps, score = run(learn, cfg.steps, hold)
        if cfg.refit and steps > 0:  # steps == 0: the untrained (uniform) gate held out best; keep it
            module, _, _ = run(np.arange(n_rows), steps, None)
    return module, {"steps": steps, "holdout_fused": score, "holdout_rows": hold}


def holdout_baselines(val: ValidationScores, rows: np.ndarray) -> dict[str, float]:
    """Held-out NDCG@10 of equal z-score weights and of the best component alone (the bars to beat)."""
    if len(rows) == 0:
        return {"holdout_uniform": np.nan, "holdout_best_single": np.nan}
    idx = torch.from_numpy(rows)
    scores, seen = val.scores[:, idx], val.seen[idx]
    uniform = val.ndcg(masked_zscore(scores, seen).sum(dim=0), rows=rows)
    single = max(val.ndcg(scores[m], rows=rows) for m in range(len(scores)))
    return {"holdout_uniform": uniform, "holdout_best_single": single}


def fallback_component(val: ValidationScores, record: dict, enabled: bool) -> int:
    """The component to serve alone when the fuser did not beat it on held-out users, else -1.

    So a learned fuser is never worse than its best part on held-out validation users (as stacking's
    fallback), and the same configuration does not lose to that part on new data by learning noise.
    """
    hold = record["holdout_rows"]
    if not enabled or not len(hold) or record["holdout_fused"] > record["holdout_best_single"]:
        return -1
    idx = torch.from_numpy(hold)
    single = [val.ndcg(val.scores[i, idx], rows=hold) for i in range(len(val.scores))]
    return int(np.argmax(single))


def training_state(record: dict) -> dict[str, np.ndarray]:
    return {f"training_{k}": np.asarray(record[k], dtype=np.float64) for k in TRAINING_KEYS}


def restore_training(state: dict[str, np.ndarray]) -> dict:
    record = {k: float(state[f"training_{k}"]) for k in TRAINING_KEYS}
    record["steps"] = int(record["steps"])
    return record
