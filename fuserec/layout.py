"""Where each stage reads and writes under ``params.outputs``; dvc.yaml declares the same paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
