"""The shared training loop: device choice, validation carve, early stopping with refit, the log."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from fuserec.data.dataset import Dataset
from fuserec.histories import Histories
from fuserec.splitting import carve_validation
from fuserec.stages.train import write_training_log
from fuserec.testing import planted_dataset
from fuserec.training import (
    LOG_COLUMNS,
    TorchConfig,
    fit_early_stopped,
    resolve_device,
    torch_threads,
    validation_ndcg,
)


def test_device_auto_and_a_clear_error_without_cuda() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="To fix"):
            resolve_device("cuda")
    with pytest.raises(ValidationError):
        TorchConfig(device="gpu")


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_validation_carve_holds_out_each_users_latest_positives() -> None:
    data = planted_dataset()
    carve = carve_validation(data)
    assert carve is not None
    assert len(carve.fit.interactions) + len(carve.truth) == len(data.interactions)
    last_fit = carve.fit.interactions.groupby("user")["timestamp"].max()
    first_truth = carve.truth.groupby("user")["timestamp"].min()
    assert (first_truth >= last_fit.reindex(first_truth.index)).all()
    tiny = data.with_interactions(data.interactions.groupby("user").head(2))  # < 5 positives each
    assert carve_validation(tiny) is None


class _PeakTrainer:
    """Ranks by popularity at epoch ``peak`` only (anti-popularity otherwise): validation peaks there."""

    def __init__(self, data: Dataset, peak: int) -> None:
        self.data, self.peak, self.epoch = data, peak, 0
        self.popularity = data.item_popularity().astype(np.float32)

    def train_epoch(self) -> float:
        self.epoch += 1
        return 1.0 / self.epoch

    def score(self, histories: Histories) -> np.ndarray:
        sign = 1.0 if self.epoch == self.peak else -1.0
        return np.tile(sign * self.popularity, (len(histories), 1))


def test_early_stopping_picks_the_best_epoch_and_refits_on_all_data() -> None:
    data = planted_dataset()
    built: list[int] = []

    def build(d: Dataset) -> _PeakTrainer:
        built.append(len(d.interactions))
        return _PeakTrainer(d, peak=3)

    config = TorchConfig(max_epochs=20, patience=2, progress=False)
    trainer, log = fit_early_stopped(build, data, config, "peak")
    frame = pd.DataFrame(log)
    assert list(frame.columns) == list(LOG_COLUMNS)
    validation = frame[frame["phase"] == "validation"]
    assert validation["epoch"].tolist() == [1, 2, 3, 4, 5]  # best at 3, two stale epochs, stop
    assert validation["val_ndcg@10"].idxmax() == validation.index[2]
    assert (frame["phase"] == "fit").sum() == 3 and trainer.epoch == 3
    assert built[0] < built[1] == len(data.interactions)  # train' first, then everything


def test_without_early_stopping_it_trains_max_epochs_on_all_data() -> None:
    data = planted_dataset()
    config = TorchConfig(max_epochs=4, early_stopping=False, progress=False)
    trainer, log = fit_early_stopped(lambda d: _PeakTrainer(d, 1), data, config, "plain")
    assert trainer.epoch == 4 and [r["phase"] for r in log] == ["fit"] * 4


def test_validation_ndcg_prefers_the_better_scorer() -> None:
    carve = carve_validation(planted_dataset())
    assert carve is not None
    good, bad = _PeakTrainer(carve.fit, 1), _PeakTrainer(carve.fit, 1)
    good.epoch = 1
    assert validation_ndcg(good.score, carve) > validation_ndcg(bad.score, carve)
    assert 0.0 <= validation_ndcg(good.score, carve, max_users=10) <= 1.0


def test_training_log_is_written_as_csv_and_stale_ones_removed(tmp_path: Path) -> None:
    class Logged:
        training_log_: ClassVar[list[dict]] = [{"phase": "fit", "epoch": 1, "loss": 0.5, "val_ndcg@10": None}]

    path = tmp_path / "curves" / "m.csv"
    assert write_training_log(Logged(), path) == path  # type: ignore[arg-type]
    assert pd.read_csv(path)["loss"].tolist() == [0.5]
    assert write_training_log(object(), path) is None  # type: ignore[arg-type]
    assert not path.exists()
