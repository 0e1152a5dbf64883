"""Typed view of ``params.yaml``: the one place configuration lives.

Each stage reads only its own section, so DVC can declare exactly the params a stage depends on.
Per-dataset settings (tuned hyper-parameters) live in ``<data.settings_dir>/<data.source>.yaml`` (by
default the files shipped in ``fuserec/dataset_settings``) and are merged under ``params.yaml``'s values,
so selecting a dataset also selects its tuned settings.

:func:`load_params` fails fast: besides the sections below, every ``algorithms.<name>`` and
``fusers.<name>`` entry is checked against its plugin's typed ``Config`` before any stage runs.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: The per-dataset settings shipped with fuserec (package data): the default of ``data.settings_dir``.
DATASET_SETTINGS_DIR = Path(__file__).resolve().parent / "dataset_settings"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticConfig(_Section):
    """Size and shape of the embedded synthetic dataset."""

    n_interactions: int = Field(
        default=20_000, ge=1_000, le=10_000_000, description="interactions generated (1,000 to 10,000,000)"
    )
    n_users: int | None = Field(
        default=None, ge=10, description="users; null = derived from n_interactions (about 50 events each)"
    )
    n_items: int | None = Field(
        default=None, ge=10, description="items; null = derived from n_interactions (about 30 events each)"
    )
    n_clusters: int = Field(
        default=8, ge=1, description="taste clusters users and items are drawn from (at most n_items)"
    )
    seed: int = Field(default=42, description="random seed: the same settings give identical data")


class ColumnMap(_Section):
    """Maps canonical column names to the columns of a generic CSV/Parquet source."""

    user_id: str = Field(default="user_id", description="column of the interactions file holding user ids")
    item_id: str = Field(default="item_id", description="column of the interactions file holding item ids")
    rating: str | None = Field(
        default="rating", description="column holding ratings; null = none (every row is a positive)"
    )
    timestamp: str | None = Field(
        default="timestamp", description="column holding event times in unix seconds; null = none"
    )


class GenericFiles(_Section):
    """File names (relative to ``data.path``) of a generic source; items and users are optional."""

    interactions: str = Field(
        default="interactions.csv", description="interactions file, relative to data.path (required)"
    )
    items: str | None = Field(
        default=None, description="item metadata file relative to data.path; null = none"
    )
    users: str | None = Field(
        default=None, description="user metadata file relative to data.path; null = none"
    )
    item_columns: dict[str, str] = Field(
        default_factory=dict, description="item columns to rename: canonical name -> column in the file"
    )
    user_columns: dict[str, str] = Field(
        default_factory=dict, description="user columns to rename: canonical name -> column in the file"
    )
    separator: str = Field(default=",", description="field separator of CSV files (one character)")


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
    """Where the interactions (and item / user metadata) come from."""

    source: Source = Field(
        default="synthetic",
        description="the loader: synthetic (generated), a MovieLens release, or csv / parquet files "
        "described by data.files and data.columns; also picks <settings_dir>/<source>.yaml",
    )
    path: str | None = Field(
        default=None,
        description="folder holding the source's files; null = data.cache_dir when data.download is set",
    )
    download: bool = Field(
        default=False, description="fetch a MovieLens archive into data.cache_dir when path is unset"
    )
    cache_dir: str = Field(
        default="~/.cache/fuserec", description="folder of downloaded archives (~ is expanded)"
    )
    settings_dir: str | None = Field(
        default=None,
        description="folder of per-dataset settings, <source>.yaml, layered over params.yaml; "
        "null = the ones shipped with fuserec (fuserec/dataset_settings); relative to the working folder",
    )
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="the generated dataset (data.source: synthetic)"
    )
    columns: ColumnMap = Field(
        default_factory=ColumnMap, description="interaction columns of a csv / parquet source"
    )
    files: GenericFiles = Field(default_factory=GenericFiles, description="files of a csv / parquet source")

    @property
    def settings_path(self) -> Path:
        """The folder of per-dataset settings: ``settings_dir``, else the packaged one."""
        return Path(self.settings_dir).expanduser() if self.settings_dir else DATASET_SETTINGS_DIR

    @property
    def settings_file(self) -> Path:
        """``<settings_dir>/<source>.yaml``: read by :func:`load_params`, written by ``fuserec tune``."""
        return self.settings_path / f"{self.source}.yaml"


class ValidateConfig(_Section):
    """The validate stage: rules every input row must pass before anything is learned."""

    max_reject_share: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="fail the stage when a table rejects more than this share of its rows (0 to 1)",
    )
    rating_min: float = Field(default=0.5, description="lowest valid rating; lower ones are rejected")
    rating_max: float = Field(default=5.0, description="highest valid rating; higher ones are rejected")
    timestamp_min: int = Field(default=0, description="earliest valid event time, unix seconds")
    timestamp_max: int = Field(
        default=4_102_444_800, description="latest valid event time, unix seconds (2100-01-01)"
    )
    sample_rows: int = Field(default=5, ge=0, description="rejected rows shown per rule in the report")


class CleanConfig(_Section):
    """The clean stage: which interactions count as positives."""

    implicit_threshold: float | None = Field(
        default=4.0, description="rating >= threshold is a positive; null keeps all"
    )
    kcore: int = Field(
        default=0, ge=0, description="iteratively keep users and items with >= kcore positives; 0 = off"
    )


class SplitConfig(_Section):
    """The split stage: train / test, and the same cut of train into train' / validation."""

    method: Literal["temporal_user", "leave_last_out", "global_time"] = Field(
        default="temporal_user",
        description="temporal_user: each user's latest test_fraction of positives to test; leave_last_out: "
        "each user's last positive; global_time: every event after one time cut",
    )
    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="share of positives held out (between 0 and 1, exclusive)"
    )
    min_user_positives: int = Field(
        default=5, ge=1, description="users with fewer positives stay train-only (per-user methods)"
    )


class TrainConfig(_Section):
    """The train stage. Only ``seed`` (with each plugin's own config) changes what a plugin learns; the
    rest says how the fits are scheduled, so changing it never invalidates the cache."""

    algorithms: list[str] | Literal["all"] = Field(
        default="all", description="algorithm plugins to fit (fuserec.algorithms): all, or a list of names"
    )
    seed: int = Field(default=42, description="seed of every plugin that does not set its own")
    task_runner: Literal["threads", "dask"] = Field(
        default="threads",
        description="how `fuserec run` fits plugins concurrently (`fuserec stage train`: one by one)",
    )
    workers: int = Field(
        default=2, ge=1, description="plugins fitted at once (threads, or LocalCluster processes)"
    )
    dask_address: str | None = Field(
        default=None,
        description="scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786; null = LocalCluster",
    )
    threads_per_worker: int | None = Field(
        default=None,
        ge=1,
        description="torch/BLAS threads of each concurrent fit; null = cores // workers (>= 1)",
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
    """The evaluate stage: ranking metrics on the test split."""

    ks: list[int] = Field(
        default_factory=lambda: [5, 10, 20], description="list lengths every metric is computed at"
    )
    batch_size: int = Field(default=1024, ge=1, description="users scored per model call")
    rerank_diversity: list[float] = Field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        description="MMR diversity weights of the accuracy/diversity curve (re-ranking the exported scorer)",
    )
    rerank_novelty: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.4], description="novelty weights added to the curve"
    )
    simulated_cold_users: int = Field(
        default=2000,
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


#: ``export.algorithm`` value that serves whichever candidate the fuse stage found best on validation.
AUTO = "auto"


class ExportConfig(_Section):
    """The export stage: the ONNX graph that is served."""

    algorithm: str = Field(
        default=AUTO,
        description="the trained algorithm or fitted fuser to export, by name; auto = the fitted fuser or "
        "model fitted on train' that scores best on validation users it was not fitted on (tune.metric; "
        "outputs/selection.json says why)",
    )
    k: int = Field(default=10, ge=1, description="items the served graph returns per request")
    max_history: int = Field(
        default=512, ge=1, description="longest history the served graph reads (most recent kept)"
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime execution providers, in order of preference",
    )
    opset: int = Field(default=18, description="ONNX opset version of the exported graph")
    prepack: bool = Field(
        default=False,
        description="let onnxruntime pre-pack weights at load: a second copy of them for a few % speed",
    )
    rerank_diversity: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="MMR diversity weight applied inside the served graph (0 = off)",
    )
    rerank_novelty: float = Field(
        default=0.0, ge=0.0, description="novelty weight applied inside the served graph"
    )
    rerank_depth: int = Field(
        default=100, ge=1, description="the re-ranked pool: the scorer's top-N unseen items"
    )
    rerank_keep: int = Field(
        default=5, ge=0, description="leading slots of each list the re-ranking leaves alone"
    )
    rerank_order: Literal["score", "greedy"] = Field(default="score", description=RERANK_ORDER_HELP)
    new_items_budget: float = Field(
        default=0.001,
        ge=0.0,
        le=1.0,
        description="validation NDCG@k the side scorer of items without training interactions (and items "
        "added to the service) may cost to list them (fuserec.cold_items); 0 = never promote them",
    )

    @property
    def rerank_shape(self) -> dict[str, Any]:
        """Pool, head and order of every re-ranking: the served graph, the report's curve, the API."""
        return {"depth": self.rerank_depth, "keep": self.rerank_keep, "order": self.rerank_order}


class FuseConfig(_Section):
    """The fuse stage: which fuser plugins to learn, over which trained algorithms."""

    fusers: list[str] | Literal["all"] = Field(
        default="all", description="fuser plugins (fuserec.fusers); [] = none"
    )
    components: list[str] | Literal["all"] = Field(
        default="all",
        description="algorithms fused: every trained one, or a list (each must be in train.algorithms)",
    )


class TuneConfig(_Section):
    """``fuserec tune``: search each plugin's ``search_space`` on the validation carve only."""

    algorithms: list[str] | Literal["all"] = Field(
        default="all", description="algorithm plugins to tune: all, or a list of names"
    )
    n_trials: int = Field(default=20, ge=1, description="settings tried per plugin (the current one first)")
    timeout_s: float | None = Field(
        default=None, gt=0, description="seconds per algorithm; stops after the running trial; null = none"
    )
    metric: str = Field(
        default="ndcg@10", description="validation metric maximised, as metric@k (e.g. ndcg@10, recall@20)"
    )


class PromoteConfig(_Section):
    """Promotion of a retrained candidate (``outputs``) over the served model (``served_dir/current``)."""

    served_dir: str = Field(
        default="served", description="served model, decision log and rejected candidates"
    )
    metric: str = Field(default="ndcg@10", description="a key of metrics.json (higher is better)")
    algorithm: str | None = Field(
        default=None, description="whose metric decides; default: the exported one (export.algorithm)"
    )
    tolerance: float = Field(
        default=0.005,
        ge=0.0,
        description="promote unless the candidate is worse than served by more than this (absolute)",
    )
    dvc_push: bool = Field(
        default=True, description="dvc commit + push after a promotion when a remote is set"
    )


class ServeConfig(_Section):
    """``fuserec serve``: the event store, API keys, and the limits that keep the service answering."""

    store: str | None = Field(
        default=None,
        description="SQLite event store; null = <promote.served_dir>/events.sqlite (outside every model "
        "folder, so promotions and re-exports never touch it)",
    )
    keys_file: str = Field(
        default="api_keys.json",
        description="hashed API keys (`fuserec keys add`); none = open access, allowed on loopback only",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0.0, description="a request waiting longer than this for the model gets a 504"
    )
    queue_size: int = Field(
        default=128,
        ge=1,
        description="histories waiting for the scoring worker; beyond it: 503 + Retry-After",
    )
    max_inflight: int = Field(
        default=64,
        ge=1,
        description="requests handled at once (health, ready, metrics aside); beyond it: 503 + Retry-After",
    )
    flood_inflight: int = Field(
        default=2,
        ge=1,
        description="the limit during a flood (from the first request that finds max_inflight in progress "
        "until arrivals fall back to completions): keeps the answered ones near unloaded latency",
    )
    max_queue_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="a request that waited longer than this for the scoring worker gets 503 + Retry-After "
        "instead of a late answer; 0 = no limit",
    )
    flood_queue_wait_ms: float = Field(
        default=10.0,
        ge=0.0,
        description="the same bound while a flood lasts (0 = max_queue_wait_ms): requests the flood's start "
        "left queued, and any that wait behind a batch, are refused rather than answered late",
    )
    max_batch: int = Field(default=32, ge=1, description="most queued histories scored in one model run")
    threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads (0 = one per core)")
    clock_skew_s: int = Field(
        default=300, ge=0, description="events dated later than now plus this many seconds get a 422"
    )
    history_cap: int = Field(
        default=10_000, ge=1, description="events kept per user in the store (the oldest go first)"
    )
    retention_days: float | None = Field(
        default=None,
        gt=0.0,
        description="events older than this leave the store (checked at start and hourly); null = kept",
    )
    watch_s: float = Field(
        default=5.0,
        ge=0.0,
        description="seconds between checks for a promoted or re-exported model to load; 0 = only "
        "POST /admin/reload",
    )


class DriftConfig(_Section):
    """Drift check of the incoming interactions against the last training set, before retraining."""

    enabled: bool = Field(default=True, description="run the drift check before retraining")
    reference: str | None = Field(
        default=None, description="reference interactions; default: the served run's, else the last run's"
    )
    bins: int = Field(default=10, ge=2, description="quantile bins of the population stability index")
    psi_warn: float = Field(
        default=0.2, gt=0.0, description="warn above this PSI of user activity / item popularity counts"
    )
    ks_warn: float = Field(
        default=0.2, gt=0.0, le=1.0, description="warn above this two-sample KS statistic of the same"
    )
    popularity_tv_warn: float = Field(
        default=0.3, gt=0.0, le=1.0, description="warn above this TV distance of item shares"
    )
    rating_tv_warn: float = Field(
        default=0.1, gt=0.0, le=1.0, description="warn above this TV distance of the rating mix"
    )
    unknown_users_warn: float = Field(
        default=0.5, ge=0.0, le=1.0, description="warn above this share of rows with new user ids"
    )
    unknown_items_warn: float = Field(
        default=0.1, ge=0.0, le=1.0, description="warn above this share of rows with new item ids"
    )
    unknown_users_fail: float = Field(
        default=0.95, ge=0.0, le=1.0, description="fail above this share of rows with new user ids"
    )
    unknown_items_fail: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fail above this share of rows with new item ids"
    )
    min_volume_ratio: float = Field(
        default=0.2, ge=0.0, description="fail when rows < this x the reference's"
    )
    max_bad_rating_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="fail when more ratings than this share are missing or out of range",
    )


#: Age groups of MovieLens-1M: each age becomes its group (under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+).
DEFAULT_AGE_BUCKETS = (18, 25, 35, 45, 50, 56)


class PrivacyConfig(_Section):
    """People's data in the pipeline: pseudonymous user ids, the user attributes kept, how long events
    are trained on (docs/privacy.md). Pseudonyms and minimisation happen at validate, retention at clean."""

    pseudonymise: bool | Literal["auto"] = Field(
        default="auto",
        description="replace user ids at validate by a keyed hash (HMAC-SHA-256, 63 bits), so every later "
        "stage, artifact and the model hold pseudonyms; auto = on for every source but synthetic",
    )
    key_env: str = Field(
        default="FUSEREC_PSEUDONYM_KEY",
        description="environment variable holding the pseudonym key (read before key_file)",
    )
    key_file: str = Field(
        default="~/.config/fuserec/pseudonym.key",
        description="file holding the pseudonym key when key_env is unset (~ is expanded); keep it out of "
        "the repository and the outputs",
    )
    drop_user_columns: list[str] = Field(
        default_factory=lambda: ["zip"],
        description="user attributes never kept, even when a plugin declares them (zip codes by default)",
    )
    age_buckets: list[int] | None = Field(
        default_factory=lambda: list(DEFAULT_AGE_BUCKETS),
        description="lower edges of the age groups the users' age is replaced by (labels like 25-34); "
        "null = exact ages kept",
    )
    cold_start_attributes: list[str] = Field(
        default_factory=lambda: ["age", "gender", "occupation"],
        description="user attributes kept for the service's cold-start rule besides those the trained "
        "plugins declare ([] = only the plugins')",
    )
    erasures: str = Field(
        default="erasures.jsonl",
        description="the erasure register and audit log (`fuserec forget`, DELETE /users/{id}): a keyed "
        "hash per person erased, never an id; validate drops their rows from the raw data",
    )
    retention_days: float | None = Field(
        default=None,
        gt=0.0,
        description="clean drops interactions older than this many days before the newest one in the "
        "data (counted in clean/summary.json); null = every interaction is trained on",
    )

    @field_validator("age_buckets")
    @classmethod
    def _increasing(cls, edges: list[int] | None) -> list[int] | None:
        if edges is not None and (not edges or any(b <= a for a, b in itertools.pairwise(edges))):
            raise ValueError(
                "privacy.age_buckets must be a non-empty, strictly increasing list of ages, e.g. "
                "[18, 25, 35, 45, 50, 56], or null to keep exact ages"
            )
        if edges is not None and edges[0] < 1:
            raise ValueError(
                "privacy.age_buckets: the first edge must be at least 1 (ages below it form a group)"
            )
        return edges

    def enabled(self, source: str) -> bool:
        """Whether ids are pseudonymised for ``source`` (``auto``: every source but synthetic)."""
        return source != "synthetic" if self.pseudonymise == "auto" else bool(self.pseudonymise)


class RatingTaskConfig(_Section):
    """The rating task (``task: rating``): predict how a user would rate items, measured by RMSE and MAE.

    Every stage after clean reads it; the ranking task ignores it (docs/concepts/rating.md).
    """

    protocol: Literal["temporal", "kfold"] = Field(
        default="temporal",
        description="temporal: each user's latest split.test_fraction of ratings to test (docs/protocol.md); "
        "kfold: shuffled ratings in `folds` equal folds, the protocol Surprise publishes its benchmark on",
    )
    folds: int = Field(default=5, ge=2, le=20, description="kfold: folds of the cross-validation")
    seed: int = Field(default=42, description="seed of the kfold shuffle and the validation folds")
    raters: list[str] | Literal["all"] = Field(
        default="all", description="rater plugins to fit (entry-point group fuserec.raters): all, or names"
    )
    fusers: list[str] | Literal["all"] = Field(
        default="all", description="rating fusers learned on the validation folds: all, or names; [] = none"
    )
    validation_folds: int = Field(
        default=5,
        ge=2,
        le=20,
        description="the fusers learn from out-of-fold predictions: every rater is refitted this many times "
        "on the other folds of train",
    )
    export: str = Field(
        default="auto",
        description="the served predictor: auto = the lowest validation RMSE among fusers and raters, or a "
        "rater or fuser by name",
    )
    max_history: int = Field(default=1024, ge=1, description="rated history entries the served graph reads")
    cold_user_max: int = Field(
        default=5, ge=0, description="segment cold_users: test users with at most this many training ratings"
    )


class CacheConfig(_Section):
    """Prefect task caching of ``fuserec run``; ``fuserec stage`` and DVC never read it.

    A stage's key is the SHA-256 of the files it reads, the params sections it reads and its plugins'
    distribution versions; a hit also needs the stage's recorded output files unchanged on disk.
    """

    enabled: bool = Field(default=True, description="reuse a stage's results when its key is unchanged")
    dir: str | None = Field(default=None, description="results and output records; null = <outputs>/.cache")
    refresh: bool = Field(default=False, description="recompute every stage and overwrite its cache entry")


class RetriesConfig(_Section):
    """Retries of the tasks that read or write storage or a remote (validate, drift, promote, dvc-push).

    Only transient I/O errors retry (:func:`fuserec.flows.retries.is_transient`): a missing file, a permission
    error or bad data fails at once, since waiting would not change them.
    """

    attempts: int = Field(default=3, ge=0, description="retries after the first failure; 0 = none")
    delay_s: float = Field(
        default=2.0, ge=0.0, description="first wait in seconds; doubled at every retry (exponential)"
    )
    jitter: float = Field(default=0.5, ge=0.0, description="each wait varies by up to this share of it")


class Params(_Section):
    """All of ``params.yaml``."""

    outputs: str = Field(default="outputs", description="folder every stage writes into (the run folder)")
    task: Literal["ranking", "rating"] = Field(
        default="ranking",
        description="ranking: top-k lists from implicit positives; rating: predicted ratings (RMSE, MAE)",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="where the data comes from")
    validate_: ValidateConfig = Field(
        default_factory=ValidateConfig, alias="validate", description="the validate stage's rules"
    )
    clean: CleanConfig = Field(default_factory=CleanConfig, description="what counts as a positive")
    split: SplitConfig = Field(default_factory=SplitConfig, description="how positives are held out")
    train: TrainConfig = Field(default_factory=TrainConfig, description="which plugins are fitted, and how")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="metrics on the test split")
    fuse: FuseConfig = Field(default_factory=FuseConfig, description="which fusers combine which algorithms")
    export: ExportConfig = Field(default_factory=ExportConfig, description="the served ONNX graph")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="`fuserec tune`'s search")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="task caching of `fuserec run`")
    retries: RetriesConfig = Field(default_factory=RetriesConfig, description="retries of I/O tasks")
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="promotion of a retrained run")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="drift check before retraining")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the HTTP service")
    rating: RatingTaskConfig = Field(
        default_factory=RatingTaskConfig, description="the rating task (task: rating)"
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="pseudonymous ids, minimised attributes, retention"
    )
    algorithms: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="each algorithm plugin's config by plugin name, checked against that plugin's Config",
    )
    fusers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="each fuser plugin's config by plugin name, checked against that plugin's Config",
    )
    raters: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="each rater plugin's config by plugin name (task: rating), checked against its Config",
    )
    rating_fusers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="each rating fuser's config by plugin name (task: rating), checked against its Config",
    )

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

    def rater_config(self, name: str) -> dict[str, Any]:
        return dict(self.raters.get(name) or {})

    def rating_fuser_config(self, name: str) -> dict[str, Any]:
        return dict(self.rating_fusers.get(name) or {})


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


class MissingDatasetSettingsWarning(UserWarning):
    """``data.source`` is a real dataset but ``data.settings_dir`` holds no ``<source>.yaml`` for it."""


def settings_file(source: str, settings_dir: str | Path | None = None) -> Path:
    """``<settings_dir>/<source>.yaml``; ``settings_dir`` None means the packaged settings."""
    folder = Path(settings_dir).expanduser() if settings_dir else DATASET_SETTINGS_DIR
    return folder / f"{source}.yaml"


def dataset_settings(source: str, settings_dir: str | Path | None = None) -> dict[str, Any]:
    """Per-dataset settings (e.g. tuned hyper-parameters) selected by ``data.source``; empty if none.

    A real dataset (any source but ``synthetic``) without a settings file is allowed, with a
    :class:`MissingDatasetSettingsWarning` naming the file looked for: its plugins run on params.yaml's
    values, untuned for that dataset.
    """
    path = settings_file(source, settings_dir)
    if not path.exists():
        if source != "synthetic":
            warnings.warn(
                f"no per-dataset settings for data.source={source!r}: {path} does not exist, so "
                f"params.yaml's values (untuned for this dataset) are used. Run `fuserec tune` to write "
                f"that file, or set data.settings_dir to the folder that holds {path.name}",
                MissingDatasetSettingsWarning,
                stacklevel=3,
            )
        return {}
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise ValueError(
            f"{path} must hold a mapping of params sections (e.g. algorithms: ...), not a "
            f"{type(settings).__name__}; fix that file or point data.settings_dir elsewhere"
        )
    return settings


# -- plugin settings: every algorithms.<name> / fusers.<name> entry against its plugin's Config ------------


class PluginSettingsError(ValueError):
    """Plugin entries (``algorithms.<name>``, ``fusers.<name>``) their plugins reject, and how to fix them."""


@dataclass(frozen=True)
class ParamsLayers:
    """The layers merged into :class:`Params`, so an error can name the file or ``--set`` to fix."""

    params_file: Path | None = None
    params_raw: dict[str, Any] = field(default_factory=dict)
    settings_file: Path | None = None
    settings_raw: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()

    def origins(self, keys: list[str]) -> list[str]:
        """Where ``keys`` (e.g. ``["algorithms", "ease", "l22"]``) was set, lowest precedence first."""
        found = []
        for file, raw in ((self.params_file, self.params_raw), (self.settings_file, self.settings_raw)):
            node: Any = raw
            for key in keys:
                node = node.get(key) if isinstance(node, dict) else None
            if node is not None and file is not None:
                found.append(str(file))
        for text in self.overrides:
            path = text.partition("=")[0].strip().split(".")
            n = min(len(path), len(keys))
            if path[:n] == keys[:n]:
                found.append(f"--set {text}")
        return found

    def where(self, keys: list[str], effective: bool = False) -> str:
        """The file(s) or ``--set`` to edit for ``keys``; ``effective``: only the layer whose value won."""
        places = self.origins(keys) or self.origins(keys[:2])
        if not places:
            return "params.yaml or your --set"
        return places[-1] if effective else " and ".join(places)


_SECTIONS = (
    ("algorithms", "fuserec.algorithms", "algorithm"),
    ("fusers", "fuserec.fusers", "fuser"),
    ("raters", "fuserec.raters", "rater"),
    ("rating_fusers", "fuserec.rating_fusers", "rating fuser"),
)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


def _entry_problems(
    section: str,
    name: str,
    entry: dict[str, Any],
    seed: int,
    plugin: str,
    model: type[BaseModel],
    layers: ParamsLayers,
) -> list[str]:
    """What ``model`` (a plugin's Config) rejects in ``entry``, built as the stage builds it."""
    where = f"{section}.{name}"
    fields = model.model_fields
    accepted = set(fields) | {f.alias for f in fields.values() if f.alias}
    valid = ", ".join(fields)
    problems = []
    unknown = [] if model.model_config.get("extra") == "allow" else [k for k in entry if k not in accepted]
    for key in unknown:
        problems.append(
            f"{where}: unknown key {key!r} for {plugin}{_did_you_mean(key, list(fields))} "
            f"Valid keys of {name!r}: {valid}. To go on, rename or remove {where}.{key} in "
            f"{layers.where([section, name, key])}"
        )
    known = {k: v for k, v in entry.items() if k not in unknown}
    try:
        model.model_validate({"seed": seed, **known})
    except ValidationError as exc:
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]]
            at = ".".join([where, *loc])
            got = f" (got {error['input']!r})" if loc and "input" in error else ""
            problems.append(
                f"{at}: {error['msg']}{got}, for {plugin}. To go on, fix {at} in "
                f"{layers.where([section, name, *loc[:1]], effective=True)}"
            )
    except Exception as exc:  # a plugin validator that raises something pydantic does not wrap
        problems.append(
            f"{where}: {type(exc).__name__}: {exc}, for {plugin}. To go on, fix {where} in "
            f"{layers.where([section, name])}"
        )
    return problems


def check_plugin_settings(params: Params, layers: ParamsLayers | None = None) -> None:
    """Check every ``algorithms.<name>`` / ``fusers.<name>`` entry against its plugin's ``Config``.

    Only the plugins named there are imported. Each entry is validated as the train / fuse stages build
    it (``{"seed": train.seed, **entry}``), with unknown keys an error even if a plugin's Config would
    ignore them. Raises :class:`PluginSettingsError` listing every problem: the key, the plugin (entry
    point and distribution), its valid keys and where to fix it. A plugin that is registered but cannot
    be imported is skipped with a warning (the stage that needs it reports why).
    """
    from fuserec.registry import find, registered  # lazy: the registry imports the plugin API

    layers = layers or ParamsLayers()
    problems: list[str] = []
    for section, group, kind in _SECTIONS:
        entries: dict[str, dict[str, Any]] = getattr(params, section)
        for name, entry in entries.items():
            info = find(name, group)
            if info is None:
                names = registered(group)
                problems.append(
                    f"{section}.{name}: no {kind} plugin named {name!r} is registered in the entry-point "
                    f"group {group}{_did_you_mean(name, names)} Registered: {', '.join(names) or 'none'}. "
                    f"To go on, rename or remove {section}.{name} in {layers.where([section, name])}, "
                    f"or install the distribution that provides {name!r}"
                )
                continue
            if info.cls is None:
                warnings.warn(
                    f"{section}.{name} is not checked: plugin {name!r} from {info.distribution} "
                    f"{info.version} cannot be loaded ({info.error})",
                    stacklevel=2,
                )
                continue
            plugin = (
                f"{kind} plugin {name!r} ({info.target}, distribution {info.distribution} {info.version})"
            )
            model: type[BaseModel] = getattr(info.cls, "Config", BaseModel)
            problems += _entry_problems(section, name, entry, params.train.seed, plugin, model, layers)
    if len(problems) == 1:
        raise PluginSettingsError(problems[0])
    if problems:
        raise PluginSettingsError(
            f"{len(problems)} problems in plugin settings:\n" + "\n".join(f"- {p}" for p in problems)
        )


def load_params(
    path: str | Path = "params.yaml", overrides: list[str] | None = None, check_plugins: bool = True
) -> Params:
    """Read params.yaml, layer the dataset's settings over it, then apply ``--set`` overrides.

    Precedence (highest first): overrides, ``<data.settings_dir>/<data.source>.yaml``, params.yaml,
    defaults. The dataset file holds what was tuned for that dataset (``fuserec tune`` writes it), so it
    beats the generic values in params.yaml; an explicit ``--set`` beats both. ``data.source`` and
    ``data.settings_dir`` themselves come from params.yaml and the overrides.

    Then, unless ``check_plugins`` is false, every plugin entry is checked against its plugin's Config
    (:func:`check_plugin_settings`), so a typo fails here rather than after the stages before train ran.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run from the project root or pass --params PATH")
    raw = yaml.safe_load(path.read_text()) or {}
    overrides = list(overrides or [])
    with_overrides = apply_overrides(raw, overrides)
    data = with_overrides.get("data") or {}
    source = str(data.get("source", "synthetic"))
    settings_dir = data.get("settings_dir")
    settings = dataset_settings(source, settings_dir)
    params = Params.model_validate(apply_overrides(_deep_merge(raw, settings), overrides))
    if check_plugins:
        layers = ParamsLayers(path, raw, settings_file(source, settings_dir), settings, tuple(overrides))
        check_plugin_settings(params, layers)
    return params
