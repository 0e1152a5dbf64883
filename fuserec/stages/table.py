"""The stage table: what each pipeline stage reads, writes and depends on, declared once.

``dvc.yaml`` is generated from it (``fuserec dvc-yaml``; a test fails when the committed file differs),
the Prefect cache key of each stage hashes the inputs and params it declares
(:mod:`fuserec.flows.stages`), and the docs' stage reference is rendered from it. So a new input or
param is added here, in one place, and every consumer sees it.

Paths in ``inputs`` and ``outputs`` are relative to ``params.outputs``; paths in ``code`` are relative to
the repository root (DVC reruns a stage when they change; the Prefect cache keys code by the installed
distribution's version instead, so a wheel install caches too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fuserec.config import DataConfig

OutputKind = Literal["out", "metric", "plot"]


@dataclass(frozen=True)
class Output:
    """One file or folder a stage writes. ``metric`` and ``plot`` outputs are not cached by DVC."""

    path: str
    kind: OutputKind = "out"
    # In the DVC cache (pushed to a remote) or in git: outs default to the cache, metrics and plots to git.
    cache: bool | None = None
    x: str | None = None  # plot axes, for ``dvc plots``
    y: str | None = None


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: ``fuserec stage <name>`` runs :func:`fuserec.stages.<name>.<name>`."""

    name: str
    summary: str
    inputs: tuple[str, ...]
    outputs: tuple[Output, ...]
    params: tuple[str, ...]  # dotted params.yaml keys (a section, or one key of it)
    code: tuple[str, ...] = field(default=())
    reads_raw_data: bool = False  # depends on the files ``data.source`` / ``data.path`` select

    @property
    def output_paths(self) -> tuple[str, ...]:
        return tuple(o.path for o in self.outputs)


_TRAIN_CODE = ("fuserec/api.py", "fuserec/training.py", "fuserec/features.py", "fuserec/plugins")
SETTINGS_CODE = "fuserec/dataset_settings"
# The rating task (task: rating) runs under the same stage names: its code and params are every stage's too.
_RATING_CODE = (
    "fuserec/stages/rating",
    "fuserec/rating.py",
    "fuserec/rating_ops.py",
    "fuserec/rating_torch.py",
)
_RATING_FIT_CODE = (
    *_RATING_CODE,
    "fuserec/rating_fusion.py",
    "fuserec/rating_ensemble.py",
    "fuserec/rating_fuser.py",
    "fuserec/rating_meta.py",
    "fuserec/plugins/rating",
    "fuserec/plugins/rating_fusers",
)

STAGES: tuple[Stage, ...] = (
    Stage(
        "validate",
        "Load the raw source and check every row with Great Expectations; quarantine the rejects.",
        inputs=(),
        outputs=(Output("validated"), Output("rejects"), Output("validation_report.json", "metric")),
        # the attributes kept are those the trained plugins declare (train.algorithms); the key itself is
        # no param: the Prefect cache keys on its fingerprint, DVC needs `dvc repro -f` after a rotation
        params=(
            "data",
            "validate",
            "privacy.pseudonymise",
            "privacy.key_env",
            "privacy.key_file",
            "privacy.drop_user_columns",
            "privacy.age_buckets",
            "privacy.cold_start_attributes",
            "train.algorithms",
        ),
        code=("fuserec/stages/validate.py", "fuserec/data", "fuserec/privacy"),
        reads_raw_data=True,  # the files params choose: see raw_data_dependency
    ),
    Stage(
        "clean",
        "Drop expired interactions, deduplicate, keep the positives, map ids to contiguous indices.",
        inputs=("validated",),
        outputs=(Output("clean"),),
        params=("clean", "privacy.retention_days"),
        code=("fuserec/stages/clean.py", "fuserec/data/dataset.py", "fuserec/privacy/minimise.py"),
    ),
    Stage(
        "split",
        "Per-user temporal split into train / test, and train into train' / validation.",
        inputs=("clean/interactions.parquet", "clean/ratings.parquet"),
        outputs=(Output("split"),),
        params=("task", "split", "rating.protocol", "rating.folds", "rating.seed"),
        code=("fuserec/stages/split.py", "fuserec/splitting.py", *_RATING_CODE),
    ),
    Stage(
        "train",
        "Fit every algorithm plugin on train, and the fused ones on train' too.",
        inputs=("clean", "split"),
        outputs=(
            Output("models"),
            Output("inner_models"),
            # cached: a folder that may be empty (no trainable plugin), which git cannot carry to a clone
            Output("curves", "plot", x="epoch", y="loss", cache=True),
        ),
        # not train.task_runner / workers / dask_address: they do not change what is learned
        params=(
            "data.source",
            "data.settings_dir",
            "train.algorithms",
            "train.seed",
            "algorithms",
            "fuse.components",
            "task",
            "rating.raters",
            "raters",
        ),
        code=("fuserec/stages/train.py", *_TRAIN_CODE, SETTINGS_CODE, *_RATING_FIT_CODE),
    ),
    Stage(
        "fuse",
        "Learn every fuser on the validation carve from the components fitted on train'; score every "
        "fuser and component there on users it was not fitted on, for export.algorithm: auto.",
        inputs=("clean", "split", "models", "inner_models"),
        outputs=(Output("fusers"), Output("selection.json", "metric")),
        params=(
            "data.source",
            "data.settings_dir",
            "train.seed",
            "fuse",
            "fusers",
            "tune.metric",  # what the candidates for export are scored by
            "task",
            "rating",
            "raters",
        ),
        code=(
            *_RATING_FIT_CODE,
            "fuserec/stages/fuse.py",
            "fuserec/fusion.py",
            "fuserec/listwise.py",
            "fuserec/selection.py",
            *_TRAIN_CODE,
            SETTINGS_CODE,
        ),
    ),
    Stage(
        "export",
        "One ONNX graph of the chosen scorer, checked against Python under onnxruntime.",
        inputs=("clean", "split", "models", "fusers", "selection.json"),
        outputs=(Output("model"),),
        params=(
            "export",
            "clean.implicit_threshold",
            "validate.rating_min",
            "validate.rating_max",
            "task",
            "rating.export",
            "rating.max_history",
        ),
        code=(
            *_RATING_FIT_CODE,
            "fuserec/rating_onnx.py",
            "fuserec/stages/export.py",
            "fuserec/onnx_model.py",
            "fuserec/parity.py",
            "fuserec/rerank.py",
            "fuserec/explain_states.py",
            "fuserec/cold_items.py",
            "fuserec/features.py",
        ),
    ),
    Stage(
        "evaluate",
        "Full-ranking metrics of every model and fuser, and of the exported graph under onnxruntime "
        "(served), on test, by segment, with significance.",
        inputs=("clean", "split", "models", "fusers", "selection.json", "model"),
        outputs=(
            Output("metrics.json", "metric"),
            Output("plots", "plot", x="k", y="ndcg"),
            Output("rerank_curve.csv", "plot", x="diversity@10", y="ndcg@10"),
        ),
        params=(
            "evaluate",
            "split",  # written into metrics.json's protocol
            "clean.implicit_threshold",
            "train.seed",  # draws the simulated cold users
            "export.algorithm",  # the re-ranking curve and the served row are the exported scorer's
            "export.rerank_depth",
            "export.rerank_keep",
            "export.rerank_order",
            "task",
            "rating",
            "raters",  # kfold: the cross-validation refits the raters
        ),
        code=(
            *_RATING_FIT_CODE,
            "fuserec/rating_onnx.py",
            "fuserec/rating_metrics.py",
            "fuserec/stages/evaluate.py",
            "fuserec/evaluation.py",
            "fuserec/metrics.py",
            "fuserec/segments.py",
            "fuserec/significance.py",
            "fuserec/rerank.py",
            "fuserec/onnx_model.py",
            "fuserec/cold_items.py",
        ),
    ),
    Stage(
        "report",
        "A self-contained HTML report of the metrics, segments and gating weights.",
        inputs=("clean", "split", "models", "fusers", "selection.json", "metrics.json"),
        outputs=(Output("report.html", cache=False), Output("gating_weights.csv", "plot", x="segment")),
        params=("task",),
        code=("fuserec/stages/report.py", "fuserec/html_report.py", "fuserec/stages/rating"),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The declaration of stage ``name``; the error lists the stages there are."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")


def param_value(raw: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a params dict (``None`` where a level is missing)."""
    value: Any = raw
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def raw_data_dependency(data: DataConfig) -> str | None:
    """The folder of raw files that ``data`` selects, as a DVC dependency; None for generated data.

    Why a generated dvc.yaml rather than a template: the path is a params choice, DVC cannot interpolate
    a missing one (the synthetic source has none), and this way a new ``data.path`` is one
    ``fuserec dvc-yaml`` away, which ``fuserec stage validate`` insists on (:func:`stale_raw_data`).
    """
    if data.source == "synthetic":
        return None  # the generator's settings are the ``data`` params, already a dependency
    from fuserec.data.sources import source_path

    return source_path(data).as_posix()


def settings_dependency(data: DataConfig) -> str:
    """The per-dataset settings folder ``data`` uses, as a DVC dependency (``data.settings_dir``, else
    the packaged one): a tuned settings file changes what train and fuse learn."""
    return Path(data.settings_dir).expanduser().as_posix() if data.settings_dir else SETTINGS_CODE


def _code_deps(s: Stage, settings: str) -> list[str]:
    return [settings if c == SETTINGS_CODE else c for c in s.code]


def dvc_stages(
    outputs: str = "outputs",
    raw_data: str | None = None,
    settings: str = SETTINGS_CODE,
    erasures: str | None = None,
) -> dict[str, Any]:
    """The ``stages:`` mapping of dvc.yaml for an outputs folder, in pipeline order.

    ``raw_data`` (:func:`raw_data_dependency`) becomes a dependency of the stages that read raw data, and
    ``settings`` (:func:`settings_dependency`) the settings folder of the stages that read it. So does
    ``erasures`` (``privacy.erasures``): validate drops the people it lists from the raw data, and without
    the dependency DVC would check the erased rows back out of its cache instead of rerunning.
    """
    stages: dict[str, Any] = {}
    for s in STAGES:
        entry: dict[str, Any] = {"cmd": f"fuserec stage {s.name}"}
        raw = [d for d in (raw_data, erasures) if d] if s.reads_raw_data else []
        entry["deps"] = [*raw, *_code_deps(s, settings), *(f"{outputs}/{p}" for p in s.inputs)]
        if s.params:
            entry["params"] = list(s.params)
        for kind, section in (("out", "outs"), ("metric", "metrics"), ("plot", "plots")):
            listed: list[Any] = []
            for o in s.outputs:
                if o.kind != kind:
                    continue
                path = f"{outputs}/{o.path}"
                if kind == "out":
                    listed.append(path if o.cache is not False else {path: {"cache": False}})
                    continue
                options: dict[str, Any] = {"cache": bool(o.cache)}
                options |= {axis: v for axis, v in (("x", o.x), ("y", o.y)) if v is not None}
                listed.append({path: options})
            if listed:
                entry[section] = listed
        stages[s.name] = entry
    return stages


DVC_HEADER = """\
# Generated from fuserec/stages/table.py and params.yaml by `fuserec dvc-yaml`: edit the stage table or
# params.yaml, then run it again; do not edit this file. Each stage runs the same code as the Prefect flow
# (`fuserec stage NAME`). Paths assume `outputs: outputs` in params.yaml. The raw files that data.source
# and data.path select are a dependency of validate, so changing one reruns the pipeline from there.
"""


def dvc_yaml(
    outputs: str = "outputs",
    raw_data: str | None = None,
    settings: str = SETTINGS_CODE,
    erasures: str | None = None,
) -> str:
    """dvc.yaml's text, generated from :data:`STAGES` and the data, settings and register params select."""
    import yaml

    stages = dvc_stages(outputs, raw_data, settings, erasures)
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=110)
    return DVC_HEADER + body


def stale_raw_data(
    dvc_file: Path, data: DataConfig, outputs: str = "outputs", erasures: str | None = None
) -> str | None:
    """Why ``dvc_file`` would let DVC miss a change of the raw data or settings ``data`` selects, or None.

    A dvc.yaml whose validate stage does not depend on the current raw folder (``data.path`` changed since
    it was generated) would rerun nothing when those files change: the metrics would silently describe
    the old data. The same holds for the settings folder of train and fuse (``data.settings_dir``).
    """
    import yaml

    raw = raw_data_dependency(data)
    settings = settings_dependency(data)
    wanted = [d for d in (raw, erasures) if d]
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    for s in STAGES:
        if s.name not in stages:
            continue
        deps = [str(d) for d in stages[s.name].get("deps", [])]
        if SETTINGS_CODE in s.code and settings not in deps:
            return (
                f"{dvc_file} does not declare the settings folder {settings} (data.settings_dir) as a "
                f"dependency of the {s.name} stage, so `dvc repro` would miss a change of its settings. "
                "To fix: run `fuserec dvc-yaml` and commit the new dvc.yaml"
            )
        if not s.reads_raw_data:
            continue
        known = {*_code_deps(s, settings), *(f"{outputs}/{p}" for p in s.inputs)}
        declared = [d for d in deps if d not in known]
        if declared != wanted:
            return (
                f"{dvc_file} declares {declared or 'no raw data'} as the raw data of the {s.name} stage, "
                f"but params select {raw or 'generated (synthetic) data'}, so `dvc repro` would miss a "
                "change of those files. To fix: run `fuserec dvc-yaml` and commit the new dvc.yaml"
            )
    return None
