"""Listwise training shared by the torch fusers (gating, feature fusion).

Both learn on the validation carve with the same recipe: a softmax loss over the whole catalogue, Adam on
mini-batches of users, early stopping on held-out validation users, a refit on all of them, and a
fallback to the best component when the fuser does not beat it on the held-out users. One copy keeps the
two fusers' training comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import Field

from fuserec.fusion import (
    COLD_COPIES_HELP,
    HELD_OUT_DEPTH,
    FuserConfig,
    HeldOut,
    ValidationScores,
    masked_zscore,
)

MASKED = -1e4  # logit of a component without signal: exp underflows to exactly 0 in float32

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


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
    build: Callable[[], ModuleT],
    loss: Callable[[ModuleT, np.ndarray], torch.Tensor],
    holdout_ndcg: Callable[[ModuleT, np.ndarray], float],
    origin: np.ndarray,
    cfg: ListwiseConfig,
    holdout_top: Callable[[ModuleT, np.ndarray], np.ndarray] | None = None,
) -> tuple[ModuleT, dict[str, Any]]:
    """Adam on mini-batches of users; held-out NDCG@10 picks the steps; then refit on every user.

    ``origin[r]``: the user row ``r`` describes (:attr:`ValidationScores.origin`); rows of one user, a
    real one and its simulated cold copies, are held out together, so early stopping never scores a user
    the steps were learned on. Only real rows are judged: the copies are there to teach the model about
    short histories, and the number of steps is chosen for the users it will serve.

    ``build()`` must return freshly initialised parameters, the same each call (seeded). Returns the final
    module and a record: ``steps`` (chosen), ``holdout_fused`` (held-out NDCG@10 at those steps),
    ``holdout_rows`` (which validation users were held out) and ``holdout_top``: ``[(rows, lists)]``, the
    held-out users' top lists from ``holdout_top(module, rows)`` at those steps, before the refit saw them
    (empty without ``holdout_top`` or held-out users; :func:`held_out_lists` reads it).
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

    def run(rows: np.ndarray, steps: int, check: np.ndarray | None) -> tuple[ModuleT, int, float]:
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
            return module, {"steps": steps, "holdout_fused": np.nan, "holdout_rows": hold, "holdout_top": []}
        module, steps, score = run(learn, cfg.steps, hold)
        top = []
        if holdout_top is not None:
            with torch.no_grad():
                top = [(hold, holdout_top(module, hold))]
        if cfg.refit and steps > 0:  # steps == 0: the untrained (uniform) gate held out best; keep it
            module, _, _ = run(np.arange(n_rows), steps, None)
    return module, {"steps": steps, "holdout_fused": score, "holdout_rows": hold, "holdout_top": top}


def held_out_lists(val: ValidationScores, record: dict[str, Any], cfg: ListwiseConfig) -> HeldOut | None:
    """The :class:`~fuserec.fusion.HeldOut` lists in a :func:`fit_listwise` record: early stopping's users."""
    method = f"held out: {cfg.holdout:.0%} of validation users, which also chose the training steps"
    return val.held_out(record.pop("holdout_top", []), method)


def holdout_baselines(val: ValidationScores, rows: np.ndarray) -> dict[str, float]:
    """Held-out NDCG@10 of equal z-score weights and of the best component alone (the bars to beat)."""
    if len(rows) == 0:
        return {"holdout_uniform": np.nan, "holdout_best_single": np.nan}
    idx = torch.from_numpy(rows)
    scores, seen = val.scores[:, idx], val.seen[idx]
    uniform = val.ndcg(masked_zscore(scores, seen).sum(dim=0), rows=rows)
    single = max(val.ndcg(scores[m], rows=rows) for m in range(len(scores)))
    return {"holdout_uniform": uniform, "holdout_best_single": single}


def fallback_component(val: ValidationScores, record: dict[str, Any], enabled: bool) -> int:
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


def training_state(record: dict[str, Any]) -> dict[str, np.ndarray]:
    return {f"training_{k}": np.asarray(record[k], dtype=np.float64) for k in TRAINING_KEYS}


def restore_training(state: dict[str, np.ndarray]) -> dict[str, Any]:
    record = {k: float(state[f"training_{k}"]) for k in TRAINING_KEYS}
    record["steps"] = int(record["steps"])
    return record


def fit_on_validation(
    build: Callable[[], ModuleT],
    loss: Callable[[ModuleT, np.ndarray], torch.Tensor],
    fused: Callable[[ModuleT, np.ndarray], torch.Tensor],
    val: ValidationScores,
    cfg: ListwiseConfig,
    fallback: bool,
) -> tuple[ModuleT, dict[str, Any], HeldOut | None, int]:
    """:func:`fit_listwise` judged by ``fused``'s held-out NDCG and top lists, then what every listwise
    fuser keeps: the held-out lists (the export's choice compares them), the bars it had to beat, and the
    component to serve alone when it did not (:func:`fallback_component`)."""
    module, record = fit_listwise(
        build,
        loss,
        lambda mod, rows: val.ndcg(fused(mod, rows), rows=rows),
        val.origin,
        cfg,
        lambda mod, rows: val.top_k(fused(mod, rows), HELD_OUT_DEPTH, rows),
    )
    held_out = held_out_lists(val, record, cfg)
    record |= holdout_baselines(val, record["holdout_rows"])
    return module, record, held_out, fallback_component(val, record, fallback)
