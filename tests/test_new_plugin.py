"""Integration: a plugin from `fuserec new-plugin` installs, passes its own tests and runs in `fuserec run`.

The plugin is pip-installed with ``--target`` into a private folder put on ``sys.path`` (and PYTHONPATH for
subprocesses) rather than into the virtual environment: discovery through entry points works the same,
and neither the other tests of this session nor anyone else sharing the environment ever see it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuserec.cli import app
from fuserec.manifest import read_json
from fuserec.registry import discover

from .conftest import SMALL, write_params

pytestmark = pytest.mark.integration

NAME = "generated_cooc"
DISTRIBUTION, PACKAGE = "fuserec-generated-cooc", "fuserec_generated_cooc"
WIDE = {"COLUMNS": "250"}


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(generated folder, site folder it is installed in), on sys.path for this module only."""
    root = tmp_path_factory.mktemp("new-plugin")
    folder, site = root / DISTRIBUTION, root / "site"
    result = CliRunner().invoke(app, ["new-plugin", NAME, "--dest", str(folder)], env=WIDE)
    assert result.exit_code == 0, result.output
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    installed = subprocess.run([*pip, "--target", str(site), str(folder)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    discover.cache_clear()
    try:
        yield folder, site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(PACKAGE, None)
        importlib.invalidate_caches()
        discover.cache_clear()


def test_generated_code_is_lint_clean(plugin: tuple[Path, Path]) -> None:
    folder, _ = plugin
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed next to this Python (pip install -e '.[dev]')")
    for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        result = subprocess.run([ruff, *args, "src", "tests"], cwd=folder, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_its_own_tests_pass_unedited(plugin: tuple[Path, Path]) -> None:
    folder, site = plugin
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_fuserec_lists_runs_evaluates_and_exports_it(
    plugin: tuple[Path, Path], tmp_path: Path, prefect_harness: None
) -> None:
    listed = CliRunner().invoke(app, ["plugins"], env=WIDE)
    row = next(line for line in listed.output.splitlines() if f" {NAME} " in line)
    assert DISTRIBUTION in row and "0.1.0" in row and "ok" in row, row

    params = write_params(tmp_path, **SMALL)
    overrides = ["--set", f"train.algorithms=[popularity,{NAME}]", "--set", f"export.algorithm={NAME}"]
    result = CliRunner().invoke(app, ["run", "--params", str(params), *overrides], env=WIDE)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"

    models = read_json(tmp_path / "outputs" / "metrics.json")["models"]
    assert set(models) == {"popularity", NAME}
    assert models[NAME]["ndcg@10"] > models["popularity"]["ndcg@10"], models
    exported = read_json(tmp_path / "outputs" / "model" / "manifest.json")
    assert (exported["algorithm"]["name"], exported["algorithm"]["distribution"]) == (NAME, DISTRIBUTION)
    assert exported["parity"]["scores_match"] and exported["parity"]["top_scores_match"]
