"""Every registered algorithm under the protocol: quality, fit time, scoring time, peak memory.

Usage:
    python benchmarks/algorithms.py --dataset movielens-100k [--data ../shared/data/ml-100k]
    python benchmarks/algorithms.py --dataset synthetic --size 1000000

Stages validate/clean/split run once into a scratch outputs folder; then each algorithm is fitted on
train and scored on test in its own subprocess (peak RSS is that process's own), with the settings that
``fuserec run`` would use for that dataset (params.yaml + fuserec/dataset_settings/<source>.yaml).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _overrides(args: argparse.Namespace, outputs: Path) -> list[str]:
    over = [f"outputs={outputs}", f"data.source={args.dataset}"]
    if args.dataset == "synthetic":
        over.append(f"data.synthetic.n_interactions={args.size}")
    else:
        over.append(f"data.path={args.data}")
    if args.split:
        over.append(f"split.method={args.split}")
    return over


def _run_one(name: str, params_file: str, overrides: list[str], queue: mp.Queue) -> None:
    import numpy as np

    from fuserec.artifacts import seed_everything
    from fuserec.config import load_params
    from fuserec.evaluation import evaluate_model, load_carve
    from fuserec.registry import get_algorithm

    params = load_params(params_file, overrides)
    carve = load_carve(params.outputs_dir, "test")
    cls = get_algorithm(name)
    config = cls.Config.model_validate({"seed": params.train.seed, **params.algorithm_config(name)})
    seed_everything(config.seed)
    start = time.perf_counter()
    algo = cls(config).fit(carve.fit)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_model(algo, carve.fit, carve.truth, [10], params.evaluate.batch_size)
    eval_s = time.perf_counter() - start
    users = np.unique(carve.truth["user"].to_numpy())[:256]
    hist = carve.fit.histories().select(users)
    start = time.perf_counter()
    algo.score(hist)
    score_ms = 1000 * (time.perf_counter() - start) / len(users)
    queue.put(
        {
            "algorithm": name,
            "config": config.model_dump(mode="json"),
            **{k: metrics[k] for k in ("ndcg@10", "recall@10", "hr@10", "coverage@10")},
            "fit_s": round(fit_s, 3),
            "evaluate_s": round(eval_s, 3),
            "score_ms_per_user_batch256": round(score_ms, 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )


def _run_implicit(params_file: str, overrides: list[str], queue: mp.Queue) -> None:
    """Plain ``implicit`` ALS at fuserec's als settings on the same training matrix: the speed reference.

    Quality uses implicit's own user factors (training users only: it has no history fold-in), so the
    row shows what the fold-in costs or gains as well as the fit-time ratio.
    """
    import numpy as np
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from fuserec.config import load_params
    from fuserec.evaluation import evaluate_model, load_carve
    from fuserec.histories import Histories
    from fuserec.plugins.als import ALS

    params = load_params(params_file, overrides)
    carve = load_carve(params.outputs_dir, "test")
    cfg = ALS.Config.model_validate({"seed": params.train.seed, **params.algorithm_config("als")})
    matrix = carve.fit.matrix()
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=cfg.factors,
            regularization=cfg.regularization,
            alpha=1.0 + cfg.alpha,  # implicit scales the matrix by alpha; fuserec's confidence is 1 + alpha
            iterations=cfg.iterations,
            num_threads=cfg.num_threads,
            random_state=cfg.seed,
        )
        start = time.perf_counter()
        model.fit(matrix, show_progress=False)
        fit_s = time.perf_counter() - start

    class _Factors:
        def score(self, histories: Histories) -> np.ndarray:  # histories of training users: factor rows
            return np.asarray(model.user_factors[histories.users] @ model.item_factors.T, dtype=np.float32)

    metrics = evaluate_model(
        _Factors(), carve.fit, carve.truth, [10], params.evaluate.batch_size, segments=False
    )
    queue.put(
        {
            "algorithm": "implicit-als",
            "config": {
                "factors": cfg.factors,
                "regularization": cfg.regularization,
                "alpha": 1.0 + cfg.alpha,
                "iterations": cfg.iterations,
            },
            **{k: metrics[k] for k in ("ndcg@10", "recall@10", "hr@10", "coverage@10")},
            "fit_s": round(fit_s, 3),
            "evaluate_s": None,
            "score_ms_per_user_batch256": None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    parser.add_argument("--size", type=int, default=100_000, help="synthetic interactions")
    parser.add_argument("--algorithms", default="all", help="comma-separated plugin names")
    parser.add_argument("--split", default=None, help="split.method override, e.g. leave_last_out")
    parser.add_argument("--no-implicit", action="store_true", help="skip the implicit ALS reference row")
    args = parser.parse_args()

    from fuserec.config import load_params
    from fuserec.registry import resolve_names
    from fuserec.tasks.clean import clean
    from fuserec.tasks.split import split
    from fuserec.tasks.validate import validate

    scratch = Path(tempfile.mkdtemp(prefix="fuserec-bench-"))
    overrides = _overrides(args, scratch / "outputs")
    params_file = str(REPO / "params.yaml")
    params = load_params(params_file, overrides)
    start = time.perf_counter()
    for stage in (validate, clean, split):
        stage.fn(params)
    prep_s = time.perf_counter() - start
    names = resolve_names("all" if args.algorithms == "all" else args.algorithms.split(","))
    rows = []
    ctx = mp.get_context("spawn")
    jobs = [(name, _run_one, (name, params_file, overrides)) for name in names]
    if "als" in names and not args.no_implicit:
        jobs.insert(names.index("als") + 1, ("implicit-als", _run_implicit, (params_file, overrides)))
    for name, target, job_args in jobs:
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(*job_args, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            rows.append({"algorithm": name, "error": f"exit code {proc.exitcode}"})
            continue
        rows.append(queue.get())
        print(json.dumps(rows[-1]), flush=True)
    tag = args.dataset if args.dataset != "synthetic" else f"synthetic-{args.size}"
    tag += f"-{args.split}" if args.split else ""
    result = {"dataset": tag, "prepare_s": round(prep_s, 2), "python": sys.version.split()[0], "rows": rows}
    fits = {r["algorithm"]: r.get("fit_s") for r in rows}
    if fits.get("als") and fits.get("implicit-als"):
        result["als_fit_time_ratio_vs_implicit"] = round(fits["als"] / fits["implicit-als"], 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"algorithms-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    header = "".join(
        f"{h:>{w}}" if i else f"{h:<{w}}"
        for i, (h, w) in enumerate(
            [
                ("algorithm", 12),
                ("ndcg@10", 9),
                ("recall@10", 11),
                ("hr@10", 8),
                ("cov@10", 8),
                ("fit s", 9),
                ("ms/user", 9),
                ("RSS MB", 9),
            ]
        )
    )
    print(f"\n{tag} (validate+clean+split {prep_s:.1f} s)\n{header}")
    for r in rows:
        if "error" in r:
            print(f"{r['algorithm']:<12} {r['error']}")
            continue
        print(
            f"{r['algorithm']:<12}{r['ndcg@10']:>9.4f}{r['recall@10']:>11.4f}{r['hr@10']:>8.4f}"
            f"{r['coverage@10']:>8.4f}{r['fit_s']:>9.2f}"
            f"{r['score_ms_per_user_batch256'] or float('nan'):>9.3f}"
            f"{r['peak_rss_mb']:>9.0f}"
        )
    if "als_fit_time_ratio_vs_implicit" in result:
        print(
            "als fit time / implicit's at the same settings, same run: "
            f"{result['als_fit_time_ratio_vs_implicit']}"
        )


if __name__ == "__main__":
    main()
