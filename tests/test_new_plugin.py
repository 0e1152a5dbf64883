"""Integration: plugins from `fuserec new-plugin` install, pass their own tests and run in `fuserec run`.

One algorithm and one fuser are generated and pip-installed with ``--target`` into one private folder put
on ``sys.path`` (and PYTHONPATH for subprocesses) rather than into the virtual environment: discovery
through entry points works the same, and neither the other tests of this run nor anyone else sharing
the environment ever see them. A single `fuserec run` trains the algorithm, fuses it with the generated
fuser and exports the fused model, so both kinds are checked end to end by one Prefect flow.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from typer.testing import CliRunner

from fuserec.cli import app
from fuserec.manifest import read_json
from fuserec.registry import FUSERS_GROUP, discover, plugin_info

from .conftest import SMALL, write_params

pytestmark = pytest.mark.integration

WIDE = {"COLUMNS": "250"}


class Generated(NamedTuple):
    """One plugin to generate: ``fuserec new-plugin name --kind kind``."""

    name: str
    kind: str
    distribution: str
    package: str


ALGORITHM = Generated("generated_cooc", "algorithm", "fuserec-generated-cooc", "fuserec_generated_cooc")
FUSER = Generated("generated_blend", "fuser", "fuserec-generated-blend", "fuserec_generated_blend")
PLUGINS = (ALGORITHM, FUSER)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Path], Path]]:
    """({name: generated folder}, the site folder both are installed in), on sys.path for this module only."""
    root = tmp_path_factory.mktemp("new-plugin")
    folders, site = {p.name: root / p.distribution for p in PLUGINS}, root / "site"
    for p in PLUGINS:
        args = ["new-plugin", p.name, "--kind", p.kind, "--dest", str(folders[p.name])]
        result = CliRunner().invoke(app, args, env=WIDE)
        assert result.exit_code == 0, result.output
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    installed = subprocess.run(  # one pip for both: it is the slow part of the setup
        [*pip, "--target", str(site), *map(str, folders.values())], capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    discover.cache_clear()
    try:
        yield folders, site
    finally:
        sys.path.remove(str(site))
        for p in PLUGINS:
            sys.modules.pop(p.package, None)
        importlib.invalidate_caches()
        discover.cache_clear()


def test_generated_code_is_lint_clean(plugins: tuple[dict[str, Path], Path]) -> None:
    folders, _ = plugins
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff is not None, "ruff is not installed next to this Python: pip install -e '.[dev]'"
    for folder in folders.values():
        for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
            result = subprocess.run([ruff, *args, "src", "tests"], cwd=folder, capture_output=True, text=True)
            assert result.returncode == 0, f"{folder.name}: {result.stdout}{result.stderr}"


def test_their_own_tests_pass_unedited(plugins: tuple[dict[str, Path], Path]) -> None:
    folders, site = plugins
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    # One pytest for both suites: a second interpreter would import torch and fuserec all over again.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            *(str(f / "tests") for f in folders.values()),
        ],
        cwd=next(iter(folders.values())).parent,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
    for p in PLUGINS:
        assert f"test_{p.package}.py" in result.stdout, f"{p.name}'s tests did not run"


def test_fuserec_runs_evaluates_and_exports_both(
    plugins: tuple[dict[str, Path], Path], tmp_path: Path, prefect_harness: None
) -> None:
    listed = CliRunner().invoke(app, ["plugins"], env=WIDE)
    row = next(line for line in listed.output.splitlines() if f" {ALGORITHM.name} " in line)
    assert ALGORITHM.distribution in row and "0.1.0" in row and "ok" in row, row
    fuser = plugin_info(FUSER.name, FUSERS_GROUP)
    assert (fuser.distribution, fuser.version) == (FUSER.distribution, "0.1.0")

    params = write_params(tmp_path, **SMALL)
    overrides = [
        *("--set", f"train.algorithms=[popularity,itemknn,{ALGORITHM.name}]"),
        *("--set", f"fuse.fusers=[{FUSER.name}]"),
        *("--set", f"export.algorithm={FUSER.name}"),  # the fused graph holds the generated algorithm too
    ]
    result = CliRunner().invoke(app, ["run", "--params", str(params), *overrides], env=WIDE)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"

    metrics = read_json(tmp_path / "outputs" / "metrics.json")
    models, fusers = metrics["models"], metrics["fusers"]
    assert set(models) == {"popularity", "itemknn", ALGORITHM.name}
    assert models[ALGORITHM.name]["ndcg@10"] > models["popularity"]["ndcg@10"], models
    assert set(fusers) == {FUSER.name}
    assert fusers[FUSER.name]["ndcg@10"] > models["popularity"]["ndcg@10"], metrics
    components = sorted(["popularity", "itemknn", ALGORITHM.name])
    fitted = read_json(tmp_path / "outputs" / "fusers" / FUSER.name / "manifest.json")
    assert (fitted["distribution"], fitted["components"]) == (FUSER.distribution, components)
    exported = read_json(tmp_path / "outputs" / "model" / "manifest.json")
    assert (exported["algorithm"]["name"], exported["algorithm"]["distribution"]) == (
        FUSER.name,
        FUSER.distribution,
    )
    assert exported["parity"]["scores_match"] and exported["parity"]["top_scores_match"]
