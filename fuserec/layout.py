"""Where each stage reads and writes under ``params.outputs``: the one place that names those files.

The stage table (:mod:`fuserec.stages.table`) and the service read these names from here, so a path is
spelled once and a reader (the service, the test kit) never imports a stage to learn it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLIT_FILES = {
    "train": "train.parquet",
    "test": "test.parquet",
    "train_inner": "train_inner.parquet",
    "valid": "valid.parquet",
}
RATINGS_FILE = "ratings.parquet"  # clean/: every deduplicated interaction, positives and not, ids mapped
MODEL_FILE = "model.onnx"  # model/: the one exported graph
CATALOG_FILE = "catalog.parquet"  # model/: the exported graph's items, row = item index
USERS_FILE = "users.parquet"  # model/ and clean/: the users table
REPORT_FILE = "report.html"
GATING_FILE = "gating_weights.csv"
RERANK_CURVE_FILE = "rerank_curve.csv"
DRIFT_REPORT_FILE = "drift_report.json"
SELECTION_FILE = "selection.json"  # the fuse stage's validation score of every candidate for export


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def validated(self) -> Path:
        return self.root / "validated"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects"

    @property
    def validation_report(self) -> Path:
        return self.root / "validation_report.json"

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.models / name

    @property
    def inner_models(self) -> Path:
        """The fused components refitted on train' (what fusers learn from on validation)."""
        return self.root / "inner_models"

    def inner_model(self, name: str) -> Path:
        return self.inner_models / name

    @property
    def fusers(self) -> Path:
        """Fitted fusers (combination parameters only: the components are the trained models)."""
        return self.root / "fusers"

    def fuser(self, name: str) -> Path:
        return self.fusers / name

    @property
    def selection(self) -> Path:
        """Validation scores of the candidates; the best is what ``export.algorithm: auto`` serves."""
        return self.root / SELECTION_FILE

    @property
    def curves(self) -> Path:
        """Per-model training curves (epoch, loss, validation NDCG) of trainable plugins: DVC plots."""
        return self.root / "curves"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def export(self) -> Path:
        return self.root / "model"

    def split_file(self, part: str) -> Path:
        """``split/<part>.parquet`` for ``train``, ``test``, ``train_inner`` (train') or ``valid``."""
        return self.split / SPLIT_FILES[part]

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def gating_weights(self) -> Path:
        return self.root / GATING_FILE

    @property
    def rerank_curve(self) -> Path:
        return self.root / RERANK_CURVE_FILE
