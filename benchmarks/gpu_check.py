"""CUDA check of the trainable plugins: CUDA training matches CPU, and the ONNX model runs on CUDA.

Usage (on a machine with a GPU):
    python benchmarks/gpu_check.py [--data ../shared/data/ml-100k] [--algorithms multvae,sasrec,twotower,kg]

For each plugin: fit on the ML-100k training carve with ``device: cpu`` and with ``device: cuda`` (same
seed, same validation-chosen settings), score test once each, and report both NDCG@10 and their
difference (GPU kernels are not bit-identical to CPU ones, so "within noise" means |diff| <= --tol).
Then export the CPU-fitted model to ONNX and run it under onnxruntime with ``CUDAExecutionProvider``
named explicitly, asserting that the session's first provider IS CUDA and that its scores match the
CPU session's. Where onnxruntime has no CUDA provider, it says so and records the check as not run:
there is no silent fallback to CPU. Exit code 0: every check that ran passed; 1: a check failed;
2: torch sees no CUDA device (nothing was run). Writes ``benchmarks/results/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CUDA = "CUDAExecutionProvider"


def _fit_and_score(name: str, params: Any, device: str) -> tuple[float, float, Any]:
    from fuserec.artifacts import seed_everything
    from fuserec.evaluation import evaluate_model, load_carve
    from fuserec.registry import get_algorithm

    carve = load_carve(params.outputs_dir, "test")
    cls = get_algorithm(name)
    config = cls.Config.model_validate(
        {"seed": params.train.seed, **params.algorithm_config(name), "device": device, "progress": False}
    )
    seed_everything(config.seed)
    start = time.perf_counter()
    algo = cls(config).fit(carve.fit)
    seconds = time.perf_counter() - start
    metrics = evaluate_model(algo, carve.fit, carve.truth, [10], 1024, segments=False)
    return float(metrics["ndcg@10"]), seconds, algo


def _onnx_on_cuda(algo: Any, folder: Path, probe: Any) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from fuserec.onnx_model import OnnxRecommender, export_onnx

    available = ort.get_available_providers()
    if CUDA not in available:
        return {"ran": False, "why": f"onnxruntime {ort.__version__} has no {CUDA} (available: {available})"}
    path = export_onnx(algo, folder / "model.onnx", k=10)
    cpu = OnnxRecommender(path, ["CPUExecutionProvider"])
    gpu = OnnxRecommender(path, [CUDA])
    if gpu.providers[0] != CUDA:
        return {
            "ran": True,
            "passed": False,
            "why": f"session providers are {gpu.providers}, not {CUDA} first",
        }
    cpu_scores, _, _ = cpu.run(probe)
    gpu_scores, _, _ = gpu.run(probe)
    diff = float(np.abs(cpu_scores - gpu_scores).max())
    scale = float(np.abs(cpu_scores).max()) or 1.0
    return {
        "ran": True,
        "passed": diff <= 1e-4 * max(scale, 1.0),
        "providers": gpu.providers,
        "max_abs_diff": diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"))
    parser.add_argument("--algorithms", default="multvae,sasrec,twotower,kg")
    parser.add_argument("--tol", type=float, default=0.01, help="allowed |NDCG@10 cuda - cpu|")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); nothing run"
        )
        return 2
    from fuserec.config import load_params
    from fuserec.tasks.clean import clean
    from fuserec.tasks.split import split
    from fuserec.tasks.validate import validate

    scratch = Path(tempfile.mkdtemp(prefix="fuserec-gpu-"))
    params = load_params(
        str(REPO / "params.yaml"),
        [f"outputs={scratch / 'outputs'}", "data.source=movielens-100k", f"data.path={args.data}"],
    )
    for stage in (validate, clean, split):
        stage.fn(params)
    from fuserec.evaluation import load_carve

    probe = load_carve(params.outputs_dir, "test").fit.histories().select(list(range(64))).to_padded(200)
    rows, ok = [], True
    for name in args.algorithms.split(","):
        cpu_ndcg, cpu_s, cpu_algo = _fit_and_score(name, params, "cpu")
        gpu_ndcg, gpu_s, _ = _fit_and_score(name, params, "cuda")
        within = abs(gpu_ndcg - cpu_ndcg) <= args.tol
        onnx = _onnx_on_cuda(cpu_algo, scratch / name, probe)
        ok &= within and onnx.get("passed", True)
        rows.append(
            {
                "algorithm": name,
                "cpu_ndcg@10": round(cpu_ndcg, 4),
                "cuda_ndcg@10": round(gpu_ndcg, 4),
                "within_tol": within,
                "cpu_fit_s": round(cpu_s, 1),
                "cuda_fit_s": round(gpu_s, 1),
                "onnx_cuda": onnx,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(0), "tol": args.tol, "rows": rows, "passed": ok}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
