"""DVC versions the data: the raw files params select are a dependency of the pipeline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fuserec.config import DataConfig, load_params
from fuserec.stages.table import dvc_yaml, raw_data_dependency, settings_dependency, stale_raw_data

from .conftest import REPO, write_params

BIN = Path(sys.executable).parent
STAGE_ORDER = ["validate", "clean", "split", "train", "fuse", "export", "evaluate", "report"]


def test_the_raw_folder_is_a_dependency_of_validate_only(tmp_path: Path) -> None:
    assert raw_data_dependency(DataConfig()) is None  # synthetic: its settings are params
    data = DataConfig(source="csv", path=str(tmp_path / "raw"))
    raw = raw_data_dependency(data)
    assert raw == (tmp_path / "raw").as_posix()
    stages = yaml.safe_load(dvc_yaml(raw_data=raw))["stages"]
    assert stages["validate"]["deps"][0] == raw
    assert all(raw not in entry["deps"] for name, entry in stages.items() if name != "validate")


def test_a_dvc_yaml_for_other_data_is_refused_with_the_fix(tmp_path: Path) -> None:
    old, new = DataConfig(source="csv", path="old"), DataConfig(source="csv", path="new")
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text(dvc_yaml(raw_data=raw_data_dependency(old)))
    assert stale_raw_data(dvc_file, old) is None
    problem = stale_raw_data(dvc_file, new)
    assert problem is not None and "new" in problem and "fuserec dvc-yaml" in problem
    assert stale_raw_data(dvc_file, DataConfig()) is not None  # back to synthetic: "old" is stale too
    dvc_file.write_text(dvc_yaml())
    assert stale_raw_data(dvc_file, DataConfig()) is None
    assert "no raw data" in (stale_raw_data(dvc_file, new) or "")


def test_a_settings_folder_of_the_project_is_a_dependency_of_train_and_fuse(tmp_path: Path) -> None:
    data = DataConfig(source="csv", path="raw", settings_dir="settings")
    stages = yaml.safe_load(dvc_yaml(raw_data="raw", settings=settings_dependency(data)))["stages"]
    for name in ("train", "fuse"):
        assert "settings" in stages[name]["deps"] and "fuserec/dataset_settings" not in stages[name]["deps"]
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text(dvc_yaml(raw_data="raw"))  # generated before settings_dir was set
    problem = stale_raw_data(dvc_file, data)
    assert problem is not None and "settings" in problem and "fuserec dvc-yaml" in problem
    dvc_file.write_text(dvc_yaml(raw_data="raw", settings="settings"))
    assert stale_raw_data(dvc_file, data) is None


def _write_ratings(folder: Path, seed: int = 3) -> Path:
    """A small generic CSV source: 80 users x 60 items, ratings 1-5, distinct timestamps."""
    rng = np.random.default_rng(seed)
    rows = {
        (int(u), int(i)) for u, i in zip(rng.integers(0, 80, 2600), rng.integers(0, 60, 2600), strict=True)
    }
    pairs = sorted(rows)
    frame = pd.DataFrame(
        {
            "user_id": [u for u, _ in pairs],
            "item_id": [i for _, i in pairs],
            "rating": rng.choice([3, 4, 5], len(pairs), p=[0.2, 0.4, 0.4]),
            "timestamp": 1_000_000 + rng.permutation(len(pairs)),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "interactions.csv"
    frame.to_csv(path, index=False)
    return path


GIT = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t"]
FAST = {
    "train": {"algorithms": ["popularity", "itemknn"]},
    "fuse": {"fusers": ["borda"]},
    "evaluate": {"ks": [5, 10], "simulated_cold_users": 50},
    "export": {"algorithm": "popularity"},
}


# DVC experiments are git commits: an identity of their own, whatever the machine's git config holds
IDENTITY = {
    "GIT_AUTHOR_NAME": "fuserec tests",
    "GIT_AUTHOR_EMAIL": "tests@example.org",
    "GIT_COMMITTER_NAME": "fuserec tests",
    "GIT_COMMITTER_EMAIL": "tests@example.org",
}


def _env() -> dict[str, str]:
    return {**os.environ, **IDENTITY, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _fuserec(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "fuserec"), *args], cwd=project, capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _project(project: Path, data_path: str) -> Path:
    """A fresh git + DVC project: fuserec's code and DVC config, params on a CSV source, dvc.yaml for it."""
    project.mkdir(parents=True)
    for name in ("fuserec", ".dvc/config", ".dvc/plots", ".dvcignore"):
        src, dest = REPO / name, project / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    (project / "settings").mkdir()
    (project / "settings" / "csv.yaml").write_text("# this project's tuned settings\n{}\n")
    # settings_dir inside the project: `fuserec tune` writes there, never into the installed package
    write_params(project, data={"source": "csv", "path": data_path, "settings_dir": "settings"}, **FAST)
    params = project / "params.yaml"
    params.write_text(params.read_text().replace(str(project / "outputs"), "outputs"))
    _fuserec(project, "dvc-yaml")
    return project


def _commit(repo: Path, message: str) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=repo, check=True, capture_output=True)


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=_env(), capture_output=True, text=True)


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.mark.integration
def test_a_changed_rating_reruns_validate_and_everything_after_it(tmp_path: Path) -> None:
    ratings = _write_ratings(tmp_path / "raw")  # outside the project, where params point
    project = _project(tmp_path / "project", str(ratings.parent))
    params = project / "params.yaml"
    assert ratings.parent.as_posix() in (project / "dvc.yaml").read_text()

    first = _dvc(project, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _ran(first.stdout) == STAGE_ORDER

    untouched = _dvc(project, "repro")
    assert untouched.returncode == 0 and _ran(untouched.stdout) == [], untouched.stdout

    # One positive becomes a low rating: the positives change, so every stage from validate on reruns.
    frame = pd.read_csv(ratings)
    row = int(np.flatnonzero(frame["rating"].to_numpy() == 5)[0])
    frame.loc[row, "rating"] = 1
    frame.to_csv(ratings, index=False)
    assert "modified" in _dvc(project, "status").stdout
    second = _dvc(project, "repro")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert _ran(second.stdout) == STAGE_ORDER
    status = _dvc(project, "status")
    assert "up to date" in status.stdout.lower(), status.stdout

    # Two runs with different params compare: the changed NDCG@10 and the curves, against the commit.
    _commit(project, "first run")
    raw = yaml.safe_load(params.read_text())
    raw["algorithms"]["itemknn"] = {**(raw["algorithms"].get("itemknn") or {}), "k": 3}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    rerun = _dvc(project, "repro")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert _ran(rerun.stdout)[0] == "train" and "validate" not in _ran(rerun.stdout)
    diff = _dvc(project, "metrics", "diff", "--md")
    assert diff.returncode == 0, diff.stderr
    assert re.search(r"models\.itemknn\.ndcg@10 *\|[^|]*\|[^|]*\|", diff.stdout), diff.stdout
    assert "models.popularity.ndcg@10" not in diff.stdout  # unchanged metrics are not listed
    plots = _dvc(project, "plots", "diff", "-o", str(tmp_path / "plots"))
    assert plots.returncode == 0, plots.stdout + plots.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "itemknn.csv" in page and "HEAD" in page

    # Pointing params at other data without regenerating dvc.yaml is refused, not silently ignored.
    moved = _write_ratings(tmp_path / "other", seed=4).parent
    params.write_text(params.read_text().replace(str(ratings.parent), str(moved)))
    refused = _dvc(project, "repro")
    assert refused.returncode != 0
    assert "fuserec dvc-yaml" in refused.stdout + refused.stderr


@pytest.mark.integration
def test_imported_data_and_a_run_travel_through_a_remote_and_experiments_compare(tmp_path: Path) -> None:
    # A dataset versioned in another DVC repository, with its own remote.
    data_repo = tmp_path / "datasets"
    data_repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=data_repo, check=True)
    assert _dvc(data_repo, "init", "-q").returncode == 0
    _write_ratings(data_repo / "ratings")
    assert _dvc(data_repo, "add", "ratings").returncode == 0
    assert _dvc(data_repo, "remote", "add", "-d", "store", str(tmp_path / "data-remote")).returncode == 0
    assert _dvc(data_repo, "push").returncode == 0
    _commit(data_repo, "ratings v1")

    # The project imports it, points params at it, and runs.
    project = _project(tmp_path / "project", "imported")
    imported = _dvc(project, "import", str(data_repo), "ratings", "-o", "imported")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert (project / "imported" / "interactions.csv").exists() and (project / "imported.dvc").exists()
    _fuserec(project, "dvc-yaml")
    assert "- imported\n" in (project / "dvc.yaml").read_text()
    remote = tmp_path / "project-remote"
    assert _dvc(project, "remote", "add", "-d", "-f", "local", str(remote)).returncode == 0
    first = _dvc(project, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _ran(first.stdout) == STAGE_ORDER
    pushed = _dvc(project, "push")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    _commit(project, "run on imported ratings")

    # A fresh clone restores data and models from the remote: nothing is recomputed.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    pulled = _dvc(clone, "pull")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert (clone / "outputs" / "model" / "model.onnx").exists()
    again = _dvc(clone, "repro")
    assert again.returncode == 0 and _ran(again.stdout) == [], again.stdout + again.stderr

    # Two plugin settings as DVC experiments, listed with their metrics.
    for k in (3, 30):
        exp = _dvc(project, "exp", "run", "--name", f"knn{k}", "--set-param", f"algorithms.itemknn.k={k}")
        assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    shown = _dvc(project, "exp", "show", "--md", "--no-pager")
    assert shown.returncode == 0, shown.stderr
    for name in ("knn3", "knn30"):
        assert name in shown.stdout, shown.stdout
    assert "ndcg@10" in shown.stdout and "algorithms.itemknn.k" in shown.stdout, shown.stdout

    # fuserec tune records its best trial as an experiment too.
    tuned = _fuserec(
        project,
        "tune",
        "--set",
        "tune.algorithms=[itemknn]",
        "--set",
        "tune.n_trials=2",
        "--dvc-exp",
        "tuned",
    )
    assert "recorded experiment" in tuned.stdout
    assert "tuned" in _dvc(project, "exp", "show", "--md", "--no-pager").stdout


@pytest.mark.integration
def test_a_forgotten_user_leaves_the_outputs_and_the_dvc_cache_and_the_rerun_drops_them(
    tmp_path: Path,
) -> None:
    from fuserec.privacy.erasure import residue, subjects_for
    from fuserec.privacy.pseudonyms import Pseudonymiser, load_key

    ratings = _write_ratings(tmp_path / "raw")
    project = _project(tmp_path / "project", str(ratings.parent))
    first = _dvc(project, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    _commit(project, "first run")
    params = load_params(project / "params.yaml")
    pseudonymiser = Pseudonymiser.from_params(params)
    assert pseudonymiser is not None  # a CSV source: pseudonyms by default
    person = subjects_for(["7"], load_key(params.privacy), pseudonymiser.user)
    places = [project / "outputs", project / ".dvc" / "cache"]
    assert residue(places, person)  # their pseudonym is in the outputs and the cache

    _fuserec(project, "forget", "7")
    assert residue([project / "outputs"], person) == []
    rerun = _dvc(project, "repro")  # validate's outputs changed: it reruns, dropping the person's raw rows
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert _ran(rerun.stdout)[:1] == ["validate"], rerun.stdout[-3000:]
    report = json.loads((project / "outputs" / "validation_report.json").read_text())
    assert report["privacy"]["erased_rows"]["interactions"] > 0
    assert residue([project / "outputs"], person) == []
    _commit(project, "retrain after erasure")
    gc = _dvc(project, "gc", "--workspace", "--force")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert residue(places, person) == []
    assert (project / "erasures.jsonl").read_text().count("\n") == 1
