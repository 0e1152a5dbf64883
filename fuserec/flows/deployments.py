"""The flows ``prefect.yaml`` deploys: nightly retrain, batch recommendations, ad hoc evaluation.

``nightly_retrain`` is the production loop: check the incoming data for drift (a broken feed fails the
run before anything is trained), retrain with :func:`~fuserec.flows.pipeline.train_pipeline` as a
subflow, promote the candidate only if it is not worse than the served model, and version the promoted
run with ``dvc push`` when a DVC remote is configured. ``batch_recommend`` scores users with the served
model (``prefect.yaml`` triggers it when a nightly run completes). ``evaluate`` re-runs the evaluate
stage alone, e.g. after changing ``evaluate.ks``.

Every flow takes ``params_file`` and ``overrides`` (``--set``-style ``dotted.key=value`` strings), so a
deployment's parameters are the same as the CLI's and ``params.yaml`` stays the one config.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task

import fuserec.flows.environment  # noqa: F401
from fuserec.config import Params, load_params
from fuserec.flows.deploy import env_cli
from fuserec.flows.pipeline import train_pipeline
from fuserec.flows.retries import RemoteCommandError, with_io_retries
from fuserec.stages.promote import CURRENT
from fuserec.tasks.drift import drift
from fuserec.tasks.evaluate import evaluate as evaluate_stage
from fuserec.tasks.promote import promote

DVC_TRACKED_OUTPUTS = "outputs"  # dvc.yaml's paths assume params.outputs == outputs


def dvc_remote(cwd: Path = Path(".")) -> str | None:
    """The default DVC remote's name, or None when the project has none (or is not a DVC repo)."""
    if not (cwd / ".dvc").is_dir():
        return None
    try:
        done = subprocess.run(
            [*env_cli("dvc"), "remote", "default"], cwd=cwd, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = done.stdout.strip()
    return name if done.returncode == 0 and name and "No default remote" not in name else None


@task(name="dvc-push")
def dvc_push(params: Params, cwd: Path = Path(".")) -> dict[str, Any]:
    """Record the promoted run in dvc.lock (``dvc commit``) and upload its outputs (``dvc push``).

    The Prefect flow writes ``outputs/`` itself rather than through ``dvc repro``, so ``dvc commit
    --force`` first hashes what is there into the cache and dvc.lock; commit dvc.lock to git afterwards.
    Skipped (with the reason returned) when no remote is set or the run is not in the DVC-tracked folder.
    """
    if Path(params.outputs).resolve() != (cwd / DVC_TRACKED_OUTPUTS).resolve():
        return {"pushed": False, "why": f"outputs={params.outputs} is not the dvc.yaml-tracked outputs/"}
    remote = dvc_remote(cwd)
    if remote is None:
        return {
            "pushed": False,
            "why": "no default DVC remote; add one with `dvc remote add -d local ../fuserec-dvc-remote`",
        }
    for args in (["commit", "--force"], ["push", "--remote", remote]):
        done = subprocess.run([*env_cli("dvc"), *args], cwd=cwd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RemoteCommandError(
                f"`dvc {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n"
                f"The model was promoted; fix the remote (`dvc remote list`) and run `dvc push` by hand."
            )
    return {"pushed": True, "remote": remote}


@flow(name="nightly-retrain", log_prints=True)
def nightly_retrain(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Drift check -> train pipeline (subflow) -> promotion -> ``dvc push`` if promoted and configured."""
    overrides = list(overrides or [])
    params = load_params(params_file, overrides)
    drift_report = with_io_retries(drift, params.retries)(params)
    print(f"drift: {drift_report.get('status')} ({len(drift_report.get('warnings', []))} warnings)")
    stages = train_pipeline(params_file, overrides)
    decision = with_io_retries(promote, params.retries)(params)
    pushed: dict[str, Any] = {"pushed": False, "why": "not promoted"}
    if decision["decision"] == "promoted":
        push = with_io_retries(dvc_push, params.retries)
        pushed = push(params) if params.promote.dvc_push else {"pushed": False, "why": "dvc_push off"}
    print(f"dvc: {pushed}")
    return {"drift": drift_report.get("status"), "stages": stages, "promotion": decision, "dvc": pushed}


@flow(name="batch-recommend", log_prints=True)
def batch_recommend(
    users_file: str | None = None,
    out: str | None = None,
    k: int = 10,
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Top-k of every listed user from the *served* model (``promote.served_dir/current``).

    ``users_file`` defaults to every user the served model knows; ``out`` to
    ``<served_dir>/recommendations.parquet``, so the post-retrain trigger needs no parameters.
    """
    from fuserec.serving.batch import recommend_batch

    params = load_params(params_file, list(overrides or []))
    # the release current points at now: a promotion during the batch cannot mix two releases' files
    served = (Path(params.promote.served_dir) / CURRENT).resolve()
    if not (served / "model").exists():
        raise FileNotFoundError(
            f"no served model in {served}; run the nightly-retrain deployment (or `fuserec run` and the "
            f"promote task) first, or set promote.served_dir"
        )
    if users_file is None:
        import pandas as pd

        users_file = str(Path(params.promote.served_dir) / "batch_users.parquet")
        pd.read_parquet(served / "clean" / "users.parquet", columns=["user_id"]).astype(str).to_parquet(
            users_file, index=False
        )
    target = Path(out) if out else Path(params.promote.served_dir) / "recommendations.parquet"
    summary = recommend_batch(served, users_file, target, k=k, progress=False)
    print(f"{summary.rows} rows for {summary.users} users -> {summary.out}")
    return {k_: str(v) if isinstance(v, Path) else v for k_, v in asdict(summary).items()}


@flow(name="evaluate", log_prints=True)
def evaluate(params_file: str = "params.yaml", overrides: list[str] | None = None) -> str:
    """The evaluate stage alone, on the models already in ``outputs/`` (e.g. after changing evaluate.ks)."""
    return evaluate_stage(load_params(params_file, list(overrides or [])))
