"""The deep family (multvae, sasrec, twotower) under the protocol: fit time, NDCG@10, rare-item NDCG@10.

Usage (from the repository root):
    python benchmarks/deep_family.py                           # temporal 80/20 per user (PROTOCOL.md), test
    python benchmarks/deep_family.py --split leave_last_out    # sasrec: HR@10 / NDCG@10 on each last item
    python benchmarks/deep_family.py --carve validation        # fit on train', score validation (tuning)

The data goes through the real stages (validate, clean, split: ``stage.fn(params)``) into a scratch
outputs folder; each plugin is then built as the train stage builds it (``seed`` = ``train.seed``, its
settings from params.yaml + configs/datasets/<source>.yaml, i.e. its defaults unless ``--set`` says
otherwise), fitted on the full train (or train' for ``--carve validation``), timed, and scored by
:func:`fuserec.tasks.evaluate.evaluate_model`: full ranking over the catalog, training items excluded.
"rare ndcg@10" is the ``rare_items`` segment of :mod:`fuserec.segments`: only test interactions whose
item had fewer than 5 training positives count (users with at least one of them).

Choices are made on ``--carve validation`` only; ``--carve test`` is the one-off measurement. Each
plugin's early stopping uses its own temporal 80/20 carve of the data it is fitted on, whatever
``--split`` says (:func:`fuserec.training.validation_carve`).

Measured once on test (2026-11-29, plugin defaults, seed 42, torch threads 1, on 2 CPU cores shared with
another job; fit_s is wall time of ``fit`` including early stopping and the refit):

    name         fit_s  ndcg@10 recall@10   hr@10 rare ndcg@10 rare users
    multvae       36.1   0.1318    0.1132  0.5469       0.0000        330
    sasrec        85.8   0.1648    0.1525  0.6386       0.0025        330
    twotower       8.9   0.1356    0.1157  0.5586       0.0101        330

    --split leave_last_out (each user's last positive; full catalog, training items excluded):
    sasrec        81.6   0.0652    0.1301  0.1301       0.0000         59

multvae, re-tuned on the validation carve (anneal_cap 0, batch 512, dropout 0.85; then recency-weighted
input, boost 10, half-life 5 items; see the plugin's docstring for every setting tried) and measured once
on test: NDCG@10 0.1533 (seed 42, fit 45.2 s), 0.1546 (seed 1, 40.4 s), 0.1543 (seed 2, 38.9 s)
(``--algorithms multvae --set train.seed=N``). With the binary input it had been 0.1315 / 0.1364 / 0.1265.

The same script gives EASE 0.1445 and popularity 0.0771 (``--algorithms ease,popularity``), the
protocol's anchors, so the data path and metrics are exact. Under leave_last_out EASE gets HR@10 0.1066,
NDCG@10 0.0547.
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
    from fuserec.evaluation import load_carve
    from fuserec.registry import get_algorithm
    from fuserec.tasks.evaluate import evaluate_model
    from fuserec.tasks.train import seed_everything

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
