"""``fuserec deploy``: the deployments of ``prefect.yaml`` on this machine, with no cloud account.

Four steps, each also usable alone (the integration test drives them one by one):

1. :func:`start_server` - ``prefect server start --host 127.0.0.1`` with analytics off, its SQLite database
   under ``PREFECT_HOME``; skipped when a server already answers at the API URL;
2. :func:`ensure_work_pool` - the ``process`` work pool ``prefect.yaml`` names (``fuserec-local``);
3. :func:`deploy` - ``prefect --no-prompt deploy --all`` (or ``--name X``) from the repository root, so the
   worker later runs flows from this checkout;
4. :func:`start_worker` - ``prefect worker start --pool fuserec-local``: picks up scheduled and triggered
   runs and executes each in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

import fuserec.flows.environment  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
POOL = "fuserec-local"
DEFAULT_PORT = 4200


def api_url(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and side-by-side servers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def env_cli(name: str) -> list[str]:
    """The ``name`` CLI (prefect, dvc) of this interpreter's environment, whatever PATH says (a worker
    started by cron has a bare PATH): the script beside the interpreter, else ``python -m name``."""
    beside = Path(sys.executable).with_name(name)
    return [str(beside)] if beside.exists() else [sys.executable, "-m", name]


def server_env(
    url: str, home: str | Path | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of every process that talks to the server: where it is, no analytics, no tracking."""
    env = dict(os.environ if base is None else base)
    env |= {
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    if home is not None:
        env["PREFECT_HOME"] = str(home)  # the server's SQLite database lives here
    return env


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, timeout: float = 180.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until ``url``/health answers; fail fast if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(url):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the Prefect server exited with code {process.returncode} before answering at {url}; "
                f"run `prefect server start --host 127.0.0.1` by hand to see why (port taken?)"
            )
        time.sleep(0.5)
    raise TimeoutError(
        f"no Prefect server answered at {url}/health within {timeout:.0f} s; a first start migrates the "
        f"database and can take a minute on a busy machine - retry, or start it by hand to see its log"
    )


def start_server(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    home: str | Path | None = None,
    log: Path | None = None,
    timeout: float = 180.0,
) -> subprocess.Popen[bytes]:
    """``prefect server start`` in its own process group (so :func:`stop` ends it and its children)."""
    url = api_url(host, port)
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - outlives this call
    process = subprocess.Popen(
        [*env_cli("prefect"), "server", "start", "--host", host, "--port", str(port)],
        env=server_env(url, home) | {"PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "false")},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_healthy(url, timeout, process)
    return process


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM the process group started by this module, SIGKILL after ``timeout``; returns the exit code."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)
    return int(process.returncode)


def ensure_work_pool(url: str, name: str = POOL) -> None:
    """Create the ``process`` work pool ``prefect.yaml`` deploys to, unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


def deploy(url: str, names: list[str] | None = None, cwd: Path = REPO, timeout: float = 300.0) -> str:
    """``prefect --no-prompt deploy`` of ``names`` (default: all of prefect.yaml); returns its output."""
    targets = [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    done = subprocess.run(
        [*env_cli("prefect"), "--no-prompt", "deploy", *targets],
        cwd=cwd,
        env=server_env(url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`prefect deploy {' '.join(targets)}` failed ({done.returncode}) in {cwd}:\n"
            f"{(done.stdout + done.stderr)[-3000:]}\nCheck prefect.yaml and that the work pool exists "
            f"(`prefect work-pool ls`)."
        )
    return done.stdout


def start_worker(
    url: str,
    pool: str = POOL,
    cwd: Path = REPO,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``prefect worker start --pool POOL`` in its own process group; flow runs are its subprocesses."""
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - outlives this call
    return subprocess.Popen(
        [*env_cli("prefect"), "worker", "start", "--pool", pool, "--type", "process"],
        cwd=cwd,
        env=server_env(url) | dict(env or {}),
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
        start_new_session=True,
    )


def run(
    host: str, port: int, names: list[str] | None, worker: bool, echo: Callable[[str], object] = print
) -> None:
    """What ``fuserec deploy`` does: reuse or start a server, create the pool, deploy, then serve runs."""
    url = api_url(host, port)
    server = None
    if healthy(url):
        echo(f"using the Prefect server at {url}")
    else:
        echo(f"starting a Prefect server at {url} (analytics off; database under PREFECT_HOME)")
        server = start_server(host, port)
    try:
        ensure_work_pool(url)
        echo(deploy(url, names).strip())
        if not worker:
            echo(f"deployed; start a worker with: PREFECT_API_URL={url} prefect worker start --pool {POOL}")
            if server is not None:
                echo(f"the server keeps running as process {server.pid}; stop it with: kill -- -{server.pid}")
                server = None  # keep it
            return
        echo(f"worker on pool {POOL}: scheduled and triggered runs execute here; Ctrl-C stops it")
        process = start_worker(url)
        try:
            process.wait()
        except KeyboardInterrupt:
            stop(process)
    finally:
        if server is not None:
            stop(server)
