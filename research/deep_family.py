"""The deep family (multvae, sasrec, twotower) under the protocol: fit time, NDCG@10, rare-item NDCG@10.

Usage (from the repository root):
    python research/deep_family.py                           # temporal 80/20 per user (the protocol), test
    python research/deep_family.py --split leave_last_out    # sasrec: HR@10 / NDCG@10 on each last item
    python research/deep_family.py --carve validation        # fit on train', score validation (tuning)

The data goes through the real stages (validate, clean, split: ``stage.fn(params)``) into a scratch
outputs folder; each plugin is then built as the train stage builds it (``seed`` = ``train.seed``, its
settings from params.yaml + fuserec/dataset_settings/<source>.yaml, i.e. its defaults unless ``--set`` says
otherwise), fitted on the full train (or train' for ``--carve validation``), timed, and scored by
:func:`fuserec.tasks.evaluate.evaluate_model`: full ranking over the catalog, training items excluded.
"rare ndcg@10" is the ``rare_items`` segment of :mod:`fuserec.segments`: only test interactions whose
item had fewer than 5 training positives count (users with at least one of them).

Choices are made on ``--carve validation`` only; ``--carve test`` is the one-off measurement. Each
plugin's early stopping uses its own temporal 80/20 carve of the data it is fitted on, whatever
``--split`` says (:func:`fuserec.splitting.carve_validation`).

``--algorithms ease,popularity`` reproduces the protocol's anchors, a check of the data path and the
metrics. What it measured is in ``research/FINDINGS.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("/work/shared/data/ml-100k")
FAMILY = ("multvae", "sasrec", "twotower")
COLUMNS = (
    ("name", 10, None),
    ("fit_s", 8, ".1f"),
    ("ndcg@10", 9, ".4f"),
    ("recall@10", 10, ".4f"),
    ("hr@10", 8, ".4f"),
    ("rare ndcg@10", 13, ".4f"),
    ("rare users", 11, "d"),
)


def prepare(params_file: str, overrides: list[str]) -> tuple[Any, float]:
    """Run validate, clean and split (the pipeline's own task functions) into ``outputs``."""
    from fuserec.config import load_params
    from fuserec.tasks.clean import clean
    from fuserec.tasks.split import split
    from fuserec.tasks.validate import validate

    params = load_params(params_file, overrides)
    start = time.perf_counter()
    for stage in (validate, clean, split):
        stage.fn(params)
    return params, time.perf_counter() - start


def measure(name: str, params: Any, carve_name: str) -> dict[str, Any]:
    """Fit ``name`` as the train stage would, on the carve's fit part; score the carve's truth."""
    from fuserec.artifacts import seed_everything
    from fuserec.evaluation import evaluate_model, load_carve
    from fuserec.registry import get_algorithm

    carve = load_carve(params.outputs_dir, carve_name)
    cls = get_algorithm(name)
    config = cls.Config.model_validate({"seed": params.train.seed, **params.algorithm_config(name)})
    seed_everything(config.seed)
    algo = cls(config)
    start = time.perf_counter()
    algo.fit(carve.fit)
    fit_s = time.perf_counter() - start
    metrics = evaluate_model(algo, carve.fit, carve.truth, [10], params.evaluate.batch_size)
    rare = metrics["segments"]["rare_items"]
    epochs = [r["epoch"] for r in getattr(algo, "training_log_", []) if r["phase"] == "fit"]
    return {
        "name": name,
        "fit_s": fit_s,
        "ndcg@10": metrics["ndcg@10"],
        "recall@10": metrics["recall@10"],
        "hr@10": metrics["hr@10"],
        "coverage@10": metrics["coverage@10"],
        "n_users": metrics["n_users"],
        "rare ndcg@10": rare.get("ndcg@10", 0.0),
        "rare users": rare.get("n_users", 0),
        "fit_epochs": max(epochs, default=None),
        "config": config.model_dump(mode="json"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(COLUMNS))
    lines = [head]
    for row in rows:
        cells = []
        for i, (key, width, fmt) in enumerate(COLUMNS):
            value = row.get(key)
            text = "-" if value is None else format(value, fmt) if fmt else str(value)
            cells.append(f"{text:<{width}}" if i == 0 else f"{text:>{width}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of the ML-100k files")
    parser.add_argument("--outputs", default="/tmp/deep/outputs", help="scratch outputs folder")
    parser.add_argument(
        "--split",
        default="temporal_user",
        choices=("temporal_user", "leave_last_out"),
        help="split.method; leave_last_out holds out each user's last positive (default plugins: sasrec)",
    )
    parser.add_argument("--carve", default="test", choices=("test", "validation"))
    parser.add_argument("--algorithms", default=None, help="comma-separated subset of " + ",".join(FAMILY))
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra params override, e.g. algorithms.sasrec.hidden=128 (validation carve only, for tuning)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    outputs = args.outputs if args.split == "temporal_user" else f"{args.outputs}-{args.split}"
    overrides = [
        f"outputs={outputs}",
        "data.source=movielens-100k",
        f"data.path={args.data}",
        f"split.method={args.split}",
        *args.sets,
    ]
    default = FAMILY if args.split == "temporal_user" else ("sasrec",)
    names = args.algorithms.split(",") if args.algorithms else list(default)
    params, prep_s = prepare(str(REPO / "params.yaml"), overrides)
    print(f"validate+clean+split {prep_s:.1f} s -> {outputs}; split {args.split}; carve {args.carve}")
    if args.sets:
        print("overrides: " + " ".join(args.sets))
    rows = []
    for name in names:
        rows.append(measure(name, params, args.carve))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"}), flush=True)
    print(f"\nML-100k, split {args.split}, carve {args.carve} ({rows[0]['n_users']} users, full catalog)")
    print(table(rows))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"split": args.split, "carve": args.carve, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
