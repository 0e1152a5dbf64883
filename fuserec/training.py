"""Training-loop pieces shared by the PyTorch plugins: device, validation carve, early stopping, log.

Every trainable plugin stops early on the same validation carve as the rest of fuserec (the protocol's
per-user temporal split applied to the data it is fitted on: fitted on the pipeline's train, that carve
IS the pipeline's train' / validation), then refits on all of its data for the best number of epochs.
So no early-stopping decision sees test, and the served model still learns from every training event.
Each epoch's check scores at most ``validation_users`` of the carve's users (one fixed sample for all
epochs), so on large data the check does not cost as much as the epoch it judges.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import AlgorithmConfig
from fuserec.histories import Histories
from fuserec.splitting import Carve, carve_validation

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

#: Columns of a plugin's ``training_log_`` rows (the train stage writes them as a DVC plots file).
LOG_COLUMNS = ("phase", "epoch", "loss", "val_ndcg@10")


class TorchConfig(AlgorithmConfig):
    """Settings every PyTorch plugin shares; plugins add their own fields by subclassing."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda | cuda:N")
    max_epochs: int = Field(50, ge=1, description="upper bound on epochs; early stopping usually ends sooner")
    early_stopping: bool = Field(True, description="stop on validation NDCG@10, then refit on all data")
    patience: int = Field(4, ge=1, description="epochs without a validation gain before stopping")
    validation_users: int | None = Field(
        10_000,
        ge=1,
        description="score at most this many validation users per epoch, a fixed sample (None = all)",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads while training (None = torch's)")
    progress: bool = Field(True, description="show a progress bar over epochs on stderr")


def resolve_device(spec: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else CPU; asking for CUDA without one is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={spec!r} was asked for, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). To fix: set the plugin's "
            "`device` to `auto` or `cpu` in params.yaml, or install a CUDA build of torch on a GPU machine."
        )
    return torch.device(spec)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def validation_ndcg(
    score: Callable[[Histories], np.ndarray],
    carve: Carve,
    k: int = 10,
    max_users: int | None = None,
) -> float:
    """NDCG@k of ``score`` on the carve: full ranking, the fit part's items excluded (as in evaluation)."""
    from fuserec.data.dataset import interactions_matrix
    from fuserec.metrics import evaluate_scores

    data = carve.fit
    users = np.unique(carve.truth["user"].to_numpy())
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(0).choice(users, max_users, replace=False))
    hist = data.histories()
    truth = interactions_matrix(carve.truth, data.n_users, data.n_items)
    metrics, _ = evaluate_scores(
        lambda rows: score(hist.select(rows)), users, data.matrix(), truth, [k], data.item_popularity(), 1024
    )
    return float(metrics[f"ndcg@{k}"])


class Trainer(Protocol):
    """What :func:`fit_early_stopped` drives: one epoch at a time, and scores for validation."""

    def train_epoch(self) -> float:
        """Run one epoch; return its mean training loss."""
        ...

    def score(self, histories: Histories) -> np.ndarray:
        """``float32 [len(histories), n_items]`` with the current parameters."""
        ...


T = TypeVar("T", bound=Trainer)


def epochs(n: int, desc: str, enabled: bool) -> Iterator[int]:
    """``1..n`` with a progress bar on stderr when ``enabled``."""
    from tqdm.auto import tqdm

    bar = tqdm(range(1, n + 1), desc=desc, unit="epoch", disable=not enabled, file=sys.stderr, leave=False)
    yield from bar


def fit_early_stopped(
    build: Callable[[Dataset], T], data: Dataset, config: TorchConfig, name: str
) -> tuple[T, list[dict[str, Any]]]:
    """Train ``build(train')`` while validation NDCG@10 improves, then ``build(data)`` for the best count.

    Returns the refitted trainer and the log (``LOG_COLUMNS`` rows: the validation phase, then the refit).
    Without a validation carve (tiny data) or with ``early_stopping`` off it trains ``max_epochs`` on data.
    """
    log: list[dict[str, Any]] = []
    n_epochs = config.max_epochs
    carve = carve_validation(data) if config.early_stopping else None
    if carve is not None:
        trainer = build(carve.fit)
        best, best_epoch, stale = -math.inf, 1, 0
        for epoch in epochs(config.max_epochs, f"{name} (validation)", config.progress):
            loss = trainer.train_epoch()
            ndcg = validation_ndcg(trainer.score, carve, max_users=config.validation_users)
            log.append({"phase": "validation", "epoch": epoch, "loss": loss, "val_ndcg@10": ndcg})
            if ndcg > best + 1e-6:
                best, best_epoch, stale = ndcg, epoch, 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
        n_epochs = best_epoch
    trainer = build(data)
    for epoch in epochs(n_epochs, f"{name} (fit)", config.progress):
        log.append({"phase": "fit", "epoch": epoch, "loss": trainer.train_epoch(), "val_ndcg@10": None})
    return trainer, log
