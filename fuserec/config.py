"""Typed view of ``params.yaml``: the one place configuration lives.

Each stage reads only its own section, so DVC can declare exactly the params a stage depends on.
Per-dataset settings (tuned hyper-parameters) live in ``configs/datasets/<data.source>.yaml`` and are
merged under ``params.yaml``'s values, so selecting a dataset also selects its tuned settings.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATASET_SETTINGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "datasets"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticConfig(_Section):
    """Size and shape of the embedded synthetic dataset."""

    n_interactions: int = Field(20_000, ge=1_000, le=10_000_000)
    n_users: int | None = Field(None, ge=10, description="default: derived from n_interactions")
    n_items: int | None = Field(None, ge=10, description="default: derived from n_interactions")
    n_clusters: int = Field(8, ge=1)
    seed: int = 42


class ColumnMap(_Section):
    """Maps canonical column names to the columns of a generic CSV/Parquet source."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    rating: str | None = "rating"
    timestamp: str | None = "timestamp"


class GenericFiles(_Section):
    """File names (relative to ``data.path``) of a generic source; items and users are optional."""

    interactions: str = "interactions.csv"
    items: str | None = None
    users: str | None = None
    item_columns: dict[str, str] = Field(default_factory=dict, description="canonical -> source column")
    user_columns: dict[str, str] = Field(default_factory=dict, description="canonical -> source column")
    separator: str = ","


Source = Literal[
    "synthetic",
    "movielens-100k",
    "movielens-1m",
    "movielens-10m",
    "movielens-latest",
    "movielens-latest-small",  # the same files as movielens-latest; its own name picks its download
    "csv",
    "parquet",
]


class DataConfig(_Section):
    source: Source = "synthetic"
    path: str | None = None
    download: bool = Field(
        False, description="fetch a MovieLens archive into data.cache_dir when path is unset"
    )
    cache_dir: str = "~/.cache/fuserec"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    columns: ColumnMap = Field(default_factory=ColumnMap)
    files: GenericFiles = Field(default_factory=GenericFiles)


class ValidateConfig(_Section):
    max_reject_share: float = Field(0.05, ge=0.0, le=1.0)
    rating_min: float = 0.5
    rating_max: float = 5.0
    timestamp_min: int = Field(0, description="unix seconds")
    timestamp_max: int = Field(4_102_444_800, description="unix seconds (2100-01-01)")
    sample_rows: int = Field(5, ge=0, description="rejected rows shown per rule in the report")


class CleanConfig(_Section):
    implicit_threshold: float | None = Field(
        4.0, description="rating >= threshold is a positive; null keeps all"
    )
    kcore: int = Field(0, ge=0, description="iteratively keep users and items with >= kcore positives")


class SplitConfig(_Section):
    method: Literal["temporal_user", "leave_last_out", "global_time"] = "temporal_user"
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    min_user_positives: int = Field(5, ge=1)


class TrainConfig(_Section):
    """The train stage. Only ``seed`` (with each plugin's own config) changes what a plugin learns; the
    rest says how the fits are scheduled, so changing it never invalidates the cache."""

    algorithms: list[str] | Literal["all"] = "all"
    seed: int = 42
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="how `fuserec run` fits plugins concurrently (`fuserec stage train`: one by one)",
    )
    workers: int = Field(2, ge=1, description="plugins fitted at once (threads, or LocalCluster processes)")
    dask_address: str | None = Field(
        None, description="scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786; null = LocalCluster"
    )
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch/BLAS threads of each concurrent fit; null = cores // workers (>= 1)"
    )

    @model_validator(mode="after")
    def _dask_address_needs_dask(self) -> TrainConfig:
        if self.dask_address and self.task_runner != "dask":
            raise ValueError(
                f"train.dask_address is {self.dask_address!r} but train.task_runner is "
                f"{self.task_runner!r}; set train.task_runner: dask to use that scheduler"
            )
        return self


RERANK_ORDER_HELP = (
    "how the re-ranked items are listed: 'score' (the diverse set in the scorer's order) or 'greedy' (in "
    "the order MMR picked them); diversity is the same, 'score' lost less NDCG@10 on validation"
)


class EvaluateConfig(_Section):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    batch_size: int = Field(1024, ge=1)
    rerank_diversity: list[float] = Field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        description="MMR diversity weights of the accuracy/diversity curve (re-ranking the exported scorer)",
    )
    rerank_novelty: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.4], description="novelty weights added to the curve"
    )
    simulated_cold_users: int = Field(
        2000,
        ge=0,
        description="warm test users (at most this many) also scored from only their latest 1-5 training "
        "items: the segment cold_simulated, a cold-start measure on more users than the real cold ones "
        "(0 = off)",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_to_export(cls, data: Any) -> Any:
        """The curve re-ranks with the served shape; a second copy of it here could drift from it."""
        moved = sorted(k for k in ("rerank_keep", "rerank_order") if isinstance(data, dict) and k in data)
        if moved:
            raise ValueError(
                f"evaluate.{moved[0]} moved to export.{moved[0]}: the curve re-ranks as the served model "
                "does (export.rerank_depth, rerank_keep, rerank_order); set it there instead"
            )
        return data

    @field_validator("ks")
    @classmethod
    def _positive(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("evaluate.ks must be a non-empty list of positive integers, e.g. [5, 10, 20]")
        return sorted(set(ks))


class ExportConfig(_Section):
    algorithm: str = "stacking"
    k: int = Field(10, ge=1)
    max_history: int = Field(
        512, ge=1, description="longest history the served graph reads (most recent kept)"
    )
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    opset: int = 18
    prepack: bool = Field(
        False,
        description="let onnxruntime pre-pack weights at load: a second copy of them for a few % speed",
    )
    rerank_diversity: float = Field(
        0.0, ge=0.0, lt=1.0, description="MMR diversity weight applied inside the served graph (0 = off)"
    )
    rerank_novelty: float = Field(0.0, ge=0.0, description="novelty weight applied inside the served graph")
    rerank_depth: int = Field(100, ge=1, description="the re-ranked pool: the scorer's top-N unseen items")
    rerank_keep: int = Field(5, ge=0, description="leading slots of each list the re-ranking leaves alone")
    rerank_order: Literal["score", "greedy"] = Field("score", description=RERANK_ORDER_HELP)

    @property
    def rerank_shape(self) -> dict[str, Any]:
        """Pool, head and order of every re-ranking: the served graph, the report's curve, the API."""
        return {"depth": self.rerank_depth, "keep": self.rerank_keep, "order": self.rerank_order}


class FuseConfig(_Section):
    """The fuse stage: which fuser plugins to learn, over which trained algorithms."""

    fusers: list[str] | Literal["all"] = Field("all", description="fuser plugins (fuserec.fusers); [] = none")
    components: list[str] | Literal["all"] = Field(
        "all", description="algorithms fused: every trained one, or a list (each must be in train.algorithms)"
    )


class TuneConfig(_Section):
    """``fuserec tune``: search each plugin's ``search_space`` on the validation carve only."""

    algorithms: list[str] | Literal["all"] = "all"
    n_trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0, description="per algorithm; stops after the running trial")
    metric: str = "ndcg@10"


class PromoteConfig(_Section):
    """Promotion of a retrained candidate (``outputs``) over the served model (``served_dir/current``)."""

    served_dir: str = Field("served", description="served model, decision log and rejected candidates")
    metric: str = Field("ndcg@10", description="a key of metrics.json (higher is better)")
    algorithm: str | None = Field(None, description="whose metric decides; default: export.algorithm")
    tolerance: float = Field(
        0.005, ge=0.0, description="promote unless the candidate is worse than served by more than this"
    )
    dvc_push: bool = Field(True, description="dvc commit + push after a promotion when a remote is set")


class DriftConfig(_Section):
    """Drift check of the incoming interactions against the last training set, before retraining."""

    enabled: bool = True
    reference: str | None = Field(
        None, description="reference interactions; default: the served run's, else the last run's"
    )
    bins: int = Field(10, ge=2, description="quantile bins of the population stability index")
    psi_warn: float = Field(0.2, gt=0.0, description="PSI of user activity / item popularity counts")
    ks_warn: float = Field(0.2, gt=0.0, le=1.0, description="two-sample KS statistic of the same")
    popularity_tv_warn: float = Field(0.3, gt=0.0, le=1.0, description="TV distance of item shares")
    rating_tv_warn: float = Field(0.1, gt=0.0, le=1.0, description="TV distance of the rating mix")
    unknown_users_warn: float = Field(0.5, ge=0.0, le=1.0, description="share of rows with new user ids")
    unknown_items_warn: float = Field(0.1, ge=0.0, le=1.0, description="share of rows with new item ids")
    unknown_users_fail: float = Field(0.95, ge=0.0, le=1.0)
    unknown_items_fail: float = Field(0.5, ge=0.0, le=1.0)
    min_volume_ratio: float = Field(0.2, ge=0.0, description="fail when rows < this x the reference's")
    max_bad_rating_share: float = Field(
        0.5, ge=0.0, le=1.0, description="fail when more ratings than this are missing or out of range"
    )


class CacheConfig(_Section):
    """Prefect task caching of ``fuserec run`` (``docs/scaling.md``); ``fuserec stage`` / DVC never read it.

    A stage's key is the SHA-256 of the files it reads, the params sections it reads and its plugins'
    distribution versions; a hit also needs the stage's recorded output files unchanged on disk.
    """

    enabled: bool = True
    dir: str | None = Field(None, description="results and output records; null = <outputs>/.cache")
    refresh: bool = Field(False, description="recompute every stage and overwrite its cache entry")


class RetriesConfig(_Section):
    """Retries of the tasks that read or write storage or a remote (validate, drift, promote, dvc-push).

    Only transient I/O errors retry (:func:`fuserec.retries.is_transient`): a missing file, a permission
    error or bad data fails at once, since waiting would not change them.
    """

    attempts: int = Field(3, ge=0, description="retries after the first failure; 0 = none")
    delay_s: float = Field(2.0, ge=0.0, description="first wait; doubled at every retry (exponential)")
    jitter: float = Field(0.5, ge=0.0, description="each wait varies by up to this share of it")


class Params(_Section):
    """All of ``params.yaml``."""

    outputs: str = "outputs"
    data: DataConfig = Field(default_factory=DataConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    algorithms: dict[str, dict[str, Any]] = Field(default_factory=dict)
    fusers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def outputs_dir(self) -> Path:
        return Path(self.outputs)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir).expanduser() if self.cache.dir else self.outputs_dir / ".cache"

    def algorithm_config(self, name: str) -> dict[str, Any]:
        return dict(self.algorithms.get(name) or {})

    def fuser_config(self, name: str) -> dict[str, Any]:
        return dict(self.fusers.get(name) or {})


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so lists and numbers work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not KEY=VALUE; write e.g. --set data.source=movielens-100k")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return out


def dataset_settings(source: str, settings_dir: Path = DATASET_SETTINGS_DIR) -> dict[str, Any]:
    """Per-dataset settings (e.g. tuned hyper-parameters) selected by ``data.source``; empty if none."""
    path = settings_dir / f"{source}.yaml"
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml, layer the dataset's settings over it, then apply ``--set`` overrides.

    Precedence (highest first): overrides, ``configs/datasets/<data.source>.yaml``, params.yaml, defaults.
    The dataset file holds what was tuned for that dataset (``fuserec tune`` writes it), so it beats the
    generic values in params.yaml; an explicit ``--set`` beats both.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run from the project root or pass --params PATH")
    raw = yaml.safe_load(path.read_text()) or {}
    with_overrides = apply_overrides(raw, overrides or [])
    source = (with_overrides.get("data") or {}).get("source", "synthetic")
    merged = apply_overrides(_deep_merge(raw, dataset_settings(source)), overrides or [])
    return Params.model_validate(merged)
