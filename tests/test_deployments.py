"""prefect.yaml's nightly-retrain on a real local Prefect server, scheduled, run by a worker.

A server on a free loopback port (its database under a temp PREFECT_HOME), the ``process`` work pool,
``prefect deploy --all`` from the repository root, the cron schedule read back from the
server, a run triggered with ``run_deployment`` on tiny synthetic data and executed by a worker process,
then the server stopped by its process id. Slow (about a minute on 2 cores): it starts real processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fuserec.flows.deploy import (
    api_url,
    deploy,
    ensure_work_pool,
    free_port,
    start_server,
    start_worker,
    stop,
)
from fuserec.manifest import read_json
from fuserec.stages.promote import read_log

from .conftest import SMALL, write_params

RUN_TIMEOUT_S = 150


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} not written)"


def test_nightly_retrain_deployment_on_a_local_server(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    url = api_url(port=port)
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = start_server(port=port, home=tmp_path / "prefect-home", log=server_log, timeout=150)
    try:
        ensure_work_pool(url)
        deploy(url)  # prefect --no-prompt deploy --all
        served = tmp_path / "served"
        params_file = write_params(
            tmp_path,
            **{
                **SMALL,
                "data": {"synthetic": {"n_interactions": 2000, "seed": 7}},
                "train": {"algorithms": ["popularity", "itemknn"]},
                "fuse": {"fusers": []},
                "export": {"algorithm": "itemknn"},
                "promote": {"served_dir": str(served)},
            },
        )
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            names = {d.name for d in client.read_deployments()}
            assert names == {"nightly-retrain", "batch-recommend", "evaluate"}
            batch = client.read_deployment_by_name("batch-recommend/batch-recommend")
            triggered = [a for a in client.read_automations() if getattr(a.actions[0], "deployment_id", None)]
            assert any(a.actions[0].deployment_id == batch.id for a in triggered), (
                "post-retrain trigger missing"
            )
            deployment = client.read_deployment_by_name("nightly-retrain/nightly-retrain")
            assert deployment.work_pool_name == "fuserec-local"
            assert deployment.parameters == {"params_file": "params.yaml", "overrides": []}
            (schedule,) = deployment.schedules
            assert schedule.schedule.cron == "0 3 * * *"
            assert schedule.schedule.timezone == "Europe/Berlin"
            assert schedule.slug == "nightly-retrain-0300-berlin" and schedule.active

            run = run_deployment(
                "nightly-retrain/nightly-retrain",
                parameters={"params_file": str(params_file), "overrides": []},
                timeout=0,
            )
            worker = start_worker(url, log=worker_log, env={"PREFECT_WORKER_QUERY_SECONDS": "2"})
            try:
                deadline = time.monotonic() + RUN_TIMEOUT_S
                state = client.read_flow_run(run.id).state
                while time.monotonic() < deadline and not (state and state.is_final()):
                    time.sleep(2)
                    state = client.read_flow_run(run.id).state
            finally:
                stop(worker)
        assert state is not None and state.is_completed(), (
            f"flow run ended as {state!r}\n--- worker log ---\n{_tail(worker_log)}"
        )
        # the run did the whole loop: drift report, a trained candidate, the first promotion
        outputs = tmp_path / "outputs"
        assert read_json(outputs / "drift_report.json")["status"] in ("ok", "drift")
        assert (outputs / "metrics.json").exists() and (served / "current" / "model").is_dir()
        (decision,) = read_log(served)
        assert decision["decision"] == "promoted" and decision["algorithm"] == "itemknn"
    finally:
        code = stop(server)
    assert server.poll() is not None, f"server still running (exit code {code})"
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


def test_dvc_push_is_skipped_with_a_reason_when_it_cannot_apply(tmp_path: Path) -> None:
    """Outside the dvc.yaml-tracked outputs/ or with no default remote, the flow says why it did not push."""
    from fuserec.config import load_params
    from fuserec.flows.deployments import dvc_push, dvc_remote

    params = load_params(write_params(tmp_path))  # outputs under tmp_path, not ./outputs
    skipped = dvc_push.fn(params)
    assert skipped["pushed"] is False and "not the dvc.yaml-tracked" in skipped["why"]
    assert dvc_remote(tmp_path) is None  # not a DVC repo
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "outputs").mkdir(exist_ok=True)
    local = load_params(tmp_path / "params.yaml", [f"outputs={tmp_path / 'outputs'}"])
    result = dvc_push.fn(local, cwd=tmp_path)
    assert result["pushed"] is False and "dvc remote add -d" in result["why"]
