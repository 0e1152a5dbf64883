"""Promotion: a worse candidate keeps the served model (and the log says why); a better one replaces it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuserec.config import load_params
from fuserec.manifest import read_json, write_json
from fuserec.stages import promote as promote_stage
from fuserec.stages.promote import (
    LOG_FILE,
    SERVED_PARTS,
    collect_garbage,
    migrate_legacy,
    promote_candidate,
    read_log,
    release_of,
    rollback,
)
from fuserec.tasks.promote import promote

from .conftest import SMALL, write_params


def fake_run(folder: Path, ndcg: float, algorithm: str = "itemknn") -> Path:
    """A run folder with just what promotion reads: metrics.json and an exported model folder."""
    write_json(folder / "metrics.json", {"models": {algorithm: {"ndcg@10": ndcg, "recall@10": ndcg}}})
    write_json(folder / "model" / "manifest.json", {"algorithm": {"name": algorithm}, "ndcg": ndcg})
    return folder


def served_ndcg(served: Path, pointer: str = "current") -> float:
    return read_json(served / pointer / "model" / "manifest.json")["ndcg"]


def releases(served: Path) -> list[str]:
    return sorted(p.name for p in (served / "releases").iterdir())


def pointed(served: Path, pointer: str) -> str:
    """The release a pointer names, checking that it is a relative symlink into releases/."""
    link = served / pointer
    assert link.is_symlink(), f"{pointer} must be a symlink"
    text = os.readlink(link)
    assert not os.path.isabs(text) and Path(text).parent == Path("releases"), text
    return Path(text).name


def test_first_candidate_is_always_promoted(tmp_path: Path) -> None:
    served = tmp_path / "served"
    decision = promote_candidate(fake_run(tmp_path / "a", 0.01), served, tolerance=0.0, algorithm="itemknn")
    assert decision.promoted and "nothing served" in decision.reason and decision.served_value is None
    assert served_ndcg(served) == 0.01
    assert read_log(served)[0]["decision"] == "promoted"


@pytest.mark.parametrize(
    ("candidate", "promoted"),
    [(0.200, True), (0.196, True), (0.195, True), (0.194, False), (0.100, False)],
)
def test_tolerance_boundary(tmp_path: Path, candidate: float, promoted: bool) -> None:
    served = tmp_path / "served"
    promote_candidate(fake_run(tmp_path / "old", 0.2), served, algorithm="itemknn", tolerance=0.005)
    decision = promote_candidate(
        fake_run(tmp_path / "new", candidate), served, algorithm="itemknn", tolerance=0.005
    )
    assert decision.promoted is promoted, decision.reason
    assert served_ndcg(served) == (candidate if promoted else 0.2)
    assert (served / "previous").exists() is promoted
    assert (served / "previous").is_symlink() is promoted
    assert len(releases(served)) == (2 if promoted else 1)
    rejected = list((served / "rejected").glob("*")) if (served / "rejected").exists() else []
    assert len(rejected) == (0 if promoted else 1)


def test_missing_metric_or_algorithm_says_how_to_fix(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", 0.1)
    with pytest.raises(KeyError, match=r"promote\.algorithm"):
        promote_candidate(run, tmp_path / "served", algorithm="stacking")
    with pytest.raises(KeyError, match=r"evaluate\.ks"):
        promote_candidate(run, tmp_path / "served", algorithm="itemknn", metric="ndcg@50")
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        promote_candidate(tmp_path / "nothing", tmp_path / "served")
    assert not (tmp_path / "served" / LOG_FILE).exists(), "a failed comparison must not log a decision"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One small real run (popularity + itemknn), exported twice: as itemknn and as popularity."""
    from fuserec.tasks.clean import clean
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export
    from fuserec.tasks.fuse import fuse
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    root = tmp_path_factory.mktemp("promote")
    sections = {
        **SMALL,
        "train": {"algorithms": ["popularity", "itemknn"]},
        "fuse": {"fusers": []},
        "export": {"algorithm": "itemknn"},
    }
    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train, fuse, export, evaluate):
        stage.fn(params)
    knn = params.outputs_dir
    pop = root / "outputs-popularity"
    shutil.copytree(knn, pop)
    shutil.rmtree(pop / "model")
    export.fn(load_params(root / "params.yaml", [f"outputs={pop}", "export.algorithm=popularity"]))
    return knn, pop


def exported(folder: Path) -> str:
    return read_json(folder / "model" / "manifest.json")["algorithm"]["name"]


def test_worse_candidate_keeps_served_model_and_better_one_replaces_it(
    tmp_path: Path, two_runs: tuple[Path, Path]
) -> None:
    knn, pop = two_runs
    served = tmp_path / "served"
    knn_value = read_json(knn / "metrics.json")["models"]["itemknn"]["ndcg@10"]
    pop_value = read_json(pop / "metrics.json")["models"]["popularity"]["ndcg@10"]
    assert knn_value > pop_value + 0.01, "the synthetic data must separate the two for this test to mean much"

    first = promote_candidate(pop, served, algorithm="popularity", tolerance=0.005)
    assert first.promoted and exported(served / "current") == "popularity"

    better = promote_candidate(knn, served, algorithm="itemknn", tolerance=0.005)
    assert better.promoted, better.reason
    assert exported(served / "current") == "itemknn" and exported(served / "previous") == "popularity"
    assert Path(better.kept_at) == served / "releases" / pointed(served, "current")
    assert (served / "current" / "split" / "train.parquet").exists()  # what batch scoring reads

    worse = promote_candidate(pop, served, algorithm="popularity", tolerance=0.005)
    assert not worse.promoted
    assert exported(served / "current") == "itemknn", "a rejected candidate must not touch the served model"
    kept = Path(worse.kept_at)
    assert kept.parent == served / "rejected" and exported(kept) == "popularity"

    log = read_log(served)
    assert [entry["decision"] for entry in log] == ["promoted", "promoted", "rejected"]
    last = log[-1]
    assert last["candidate_value"] == pytest.approx(pop_value)
    assert last["served_value"] == pytest.approx(knn_value)
    assert last["tolerance"] == 0.005 and last["decided_at"].endswith("Z")
    assert "worse than served" in last["reason"] and "served model is kept" in last["reason"]
    assert last["candidate_metrics"]["ndcg@10"] == pytest.approx(pop_value)
    assert last["served_metrics"]["ndcg@10"] == pytest.approx(knn_value)


def test_task_uses_params(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    knn, _ = two_runs
    params_file = write_params(tmp_path, promote={"served_dir": str(tmp_path / "served"), "tolerance": 0.0})
    params = load_params(params_file, [f"outputs={knn}", "export.algorithm=itemknn"])
    result = promote.fn(params)
    assert (
        result["decision"] == "promoted" and result["algorithm"] == "itemknn" and result["tolerance"] == 0.0
    )
    assert (tmp_path / "served" / "current" / "promotion.json").exists()


def test_batch_recommend_flow_scores_every_served_user(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    """The batch-recommend deployment's flow reads the served model, not the last run's outputs."""
    import pandas as pd

    from fuserec.flows.deployments import batch_recommend

    knn, _ = two_runs
    served = tmp_path / "served"
    params_file = write_params(tmp_path, promote={"served_dir": str(served)})
    with pytest.raises(FileNotFoundError, match="no served model"):
        batch_recommend.fn(params_file=str(params_file))
    promote_candidate(knn, served, algorithm="itemknn")
    result = batch_recommend.fn(k=5, params_file=str(params_file))
    rows = pd.read_parquet(served / "recommendations.parquet")
    n_users = pd.read_parquet(served / "current" / "clean" / "users.parquet")["user_id"].nunique()
    assert result["users"] == n_users and len(rows) == 5 * n_users == result["rows"]
    assert rows.groupby("user_id")["rank"].max().eq(5).all()


# -- releases and pointers ------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_current_is_a_relative_link_to_a_complete_release(tmp_path: Path) -> None:
    served = tmp_path / "served"
    run = fake_run(tmp_path / "a", 0.1)
    (run / "events.sqlite").write_text("a service's store in the candidate: never copied")
    decision = promote_candidate(run, served, algorithm="itemknn")
    name = pointed(served, "current")
    assert releases(served) == [name] and Path(decision.kept_at) == served / "releases" / name
    assert release_of(served) == (served / "releases" / name).resolve()
    assert release_of(served, "previous") is None and not os.path.lexists(served / "previous")
    record = read_json(served / "current" / "promotion.json")
    assert record["release"] == name and record["value"] == 0.1
    assert not (served / "current" / "events.sqlite").exists() and "events.sqlite" not in SERVED_PARTS
    assert sorted(p.name for p in served.iterdir()) == ["current", "promotions.jsonl", "releases"]


def test_promotions_keep_exactly_the_current_and_previous_releases(tmp_path: Path) -> None:
    served = tmp_path / "served"
    for ndcg in (0.1, 0.2, 0.3, 0.4):
        assert promote_candidate(
            fake_run(tmp_path / f"run{ndcg}", ndcg), served, algorithm="itemknn"
        ).promoted
    assert releases(served) == sorted([pointed(served, "current"), pointed(served, "previous")])
    assert served_ndcg(served) == 0.4 and served_ndcg(served, "previous") == 0.3
    assert len(set(releases(served))) == 2  # promotions within one second get distinct names


def test_rollback_swaps_the_pointers_and_is_logged(tmp_path: Path) -> None:
    served = tmp_path / "served"
    promote_candidate(fake_run(tmp_path / "a", 0.1), served, algorithm="itemknn")
    with pytest.raises(FileNotFoundError, match="nothing to roll back to"):
        rollback(served)
    promote_candidate(fake_run(tmp_path / "b", 0.2), served, algorithm="itemknn")
    new, old = pointed(served, "current"), pointed(served, "previous")

    back = rollback(served)
    assert (pointed(served, "current"), pointed(served, "previous")) == (old, new)
    assert served_ndcg(served) == 0.1 and served_ndcg(served, "previous") == 0.2
    assert Path(back.restored).name == old and Path(back.replaced).name == new
    assert back.restored_record["value"] == 0.1 and back.replaced_record["value"] == 0.2
    entry = read_log(served)[-1]
    assert entry["decision"] == "rolled-back" and entry["restored"] == back.restored
    assert releases(served) == sorted([old, new]), "a rollback deletes nothing"

    rollback(served)  # rolling back the rollback serves the newer release again
    assert served_ndcg(served) == 0.2 and served_ndcg(served, "previous") == 0.1
    assert [e["decision"] for e in read_log(served)] == ["promoted", "promoted", "rolled-back", "rolled-back"]


def test_rollback_without_an_atomic_exchange_still_swaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = tmp_path / "served"
    promote_candidate(fake_run(tmp_path / "a", 0.1), served, algorithm="itemknn")
    promote_candidate(fake_run(tmp_path / "b", 0.2), served, algorithm="itemknn")
    monkeypatch.setattr(promote_stage, "exchange", lambda a, b: False)
    rollback(served)
    assert served_ndcg(served) == 0.1 and served_ndcg(served, "previous") == 0.2
    assert sorted(p.name for p in served.iterdir()) == ["current", "previous", "promotions.jsonl", "releases"]


def legacy_served(served: Path) -> None:
    """A served folder of the older layout: current/ and previous/ as real folders."""
    fake_run(served / "previous", 0.1)
    fake_run(served / "current", 0.2)
    write_json(
        served / "current" / "promotion.json", {"algorithm": "itemknn", "promoted_at": "2020-01-02T03:04:05Z"}
    )


def test_a_legacy_served_folder_is_migrated_on_the_next_promotion(tmp_path: Path) -> None:
    served = tmp_path / "served"
    legacy_served(served)
    model_file = served / "current" / "model" / "manifest.json"
    inode = model_file.stat().st_ino
    decision = promote_candidate(fake_run(tmp_path / "new", 0.3), served, algorithm="itemknn", tolerance=0.0)
    assert decision.promoted and decision.served_value == 0.2, decision.reason
    current, previous = pointed(served, "current"), pointed(served, "previous")
    assert served_ndcg(served) == 0.3 and served_ndcg(served, "previous") == 0.2
    assert previous == "20200102T030405Z", "a migrated release is named after its promotion time"
    # moved (hard-linked), not copied: the old served files are the same files
    assert (served / "previous" / "model" / "manifest.json").stat().st_ino == inode
    # the legacy previous is two steps back now: only current and previous remain
    assert releases(served) == sorted([current, previous])


def test_migration_alone_keeps_what_is_served(tmp_path: Path) -> None:
    served = tmp_path / "served"
    legacy_served(served)
    made = migrate_legacy(served)
    assert [p.name for p in made] == ["20200102T030405Z", "legacy-previous"]
    assert (
        pointed(served, "current") == "20200102T030405Z" and pointed(served, "previous") == "legacy-previous"
    )
    assert served_ndcg(served) == 0.2 and served_ndcg(served, "previous") == 0.1
    assert sorted(p.name for p in served.iterdir()) == ["current", "previous", "releases"]
    assert migrate_legacy(served) == [], "a migrated folder has nothing left to migrate"
    rollback(served)
    assert served_ndcg(served) == 0.1


def test_a_crash_before_the_pointer_moves_keeps_the_old_release_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = tmp_path / "served"
    promote_candidate(fake_run(tmp_path / "a", 0.1), served, algorithm="itemknn")
    old = pointed(served, "current")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        promote_candidate(fake_run(tmp_path / "b", 0.2), served, algorithm="itemknn")
    monkeypatch.undo()
    assert pointed(served, "current") == old and served_ndcg(served) == 0.1
    assert (served / "current" / "metrics.json").exists() and (served / "current" / "promotion.json").exists()
    assert releases(served) == [old], "the release nothing names is removed"
    assert sorted(p.name for p in served.iterdir()) == ["current", "promotions.jsonl", "releases"]
    assert [e["decision"] for e in read_log(served)] == ["promoted"], "an unfinished promotion is not logged"


def test_leftovers_of_a_killed_promotion_are_collected(tmp_path: Path) -> None:
    served = tmp_path / "served"
    promote_candidate(fake_run(tmp_path / "a", 0.1), served, algorithm="itemknn")
    orphan = fake_run(served / "releases" / "20000101T000000Z", 0.5)  # copied, never pointed to
    staging = fake_run(served / "releases" / f".staging-x-{dead_pid()}", 0.5)
    live = fake_run(served / "releases" / f".staging-y-{os.getpid()}", 0.5)
    assert sorted(collect_garbage(served)) == sorted([orphan, staging])
    assert live.exists() and served_ndcg(served) == 0.1


def test_a_release_holding_an_event_store_is_never_deleted(tmp_path: Path) -> None:
    served = tmp_path / "served"
    promote_candidate(fake_run(tmp_path / "a", 0.1), served, algorithm="itemknn")
    first = pointed(served, "current")
    (served / "current" / "events.sqlite").write_text("events a service recorded")  # served without --store
    for ndcg in (0.2, 0.3):
        promote_candidate(fake_run(tmp_path / f"run{ndcg}", ndcg), served, algorithm="itemknn")
    assert first in releases(served) and len(releases(served)) == 3
    assert (served / "releases" / first / "events.sqlite").read_text() == "events a service recorded"
    assert not (served / "current" / "events.sqlite").exists(), "promotion never copies an event store"
