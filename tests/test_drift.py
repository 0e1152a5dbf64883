"""Drift check: identical data is quiet, a popularity shift is flagged, a broken feed stops the retrain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuserec.config import DriftConfig, load_params
from fuserec.stages.drift import BrokenFeedError, Interactions, check_drift, compare, psi
from fuserec.tasks.drift import drift

from .conftest import write_params

CFG = DriftConfig()


def zipf_frame(n: int = 5000, n_users: int = 300, n_items: int = 200, seed: int = 0) -> pd.DataFrame:
    """Interactions with a Zipf item popularity and a skewed user activity, like real feeds."""
    rng = np.random.default_rng(seed)
    item_p = 1.0 / np.arange(1, n_items + 1)
    user_p = 1.0 / np.sqrt(np.arange(1, n_users + 1))
    return pd.DataFrame(
        {
            "user_id": rng.choice(n_users, n, p=user_p / user_p.sum()),
            "item_id": rng.choice(n_items, n, p=item_p / item_p.sum()),
            "rating": rng.choice([1, 2, 3, 4, 5], n, p=[0.05, 0.1, 0.25, 0.35, 0.25]),
        }
    )


def frame_of(frame: pd.DataFrame, name: str) -> Interactions:
    return Interactions.from_frame(frame, name)


frames = st.integers(0, 10_000).map(lambda seed: zipf_frame(n=800, n_users=60, n_items=40, seed=seed))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=frames)
def test_identical_data_shows_no_drift(frame: pd.DataFrame) -> None:
    report = compare(frame_of(frame, "new"), frame_of(frame.copy(), "ref"), CFG)
    assert report["status"] == "ok", report
    stats = report["statistics"]
    assert stats["user_activity_psi"] < 1e-9 and stats["item_popularity_ks"] == 0.0
    assert stats["item_popularity_tv"] == 0.0 and stats["rating_mix_tv"] == 0.0
    assert stats["unknown_users_share"] == 0.0 and stats["volume_ratio"] == 1.0


def test_a_fresh_sample_of_the_same_process_is_not_drift() -> None:
    report = compare(frame_of(zipf_frame(seed=1), "new"), frame_of(zipf_frame(seed=2), "ref"), CFG)
    assert report["status"] == "ok", report["warnings"]


def test_shifted_popularity_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    ref = zipf_frame(seed=1)
    new = zipf_frame(seed=2)
    new["item_id"] = 199 - new["item_id"]  # yesterday's tail is today's head; the count shape is unchanged
    report = check_drift(frame_of(new, "new.csv"), frame_of(ref, "ref.parquet"), CFG)
    flagged = {w["statistic"] for w in report["warnings"]}
    assert report["status"] == "drift"
    assert "item_popularity_tv" in flagged, report
    assert report["statistics"]["item_popularity_tv"] > 0.5
    assert "item_popularity_tv" in caplog.text and "new.csv" in caplog.text


def test_psi_grows_with_the_shift() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 5000)
    assert psi(ref, rng.normal(0, 1, 5000)) < 0.05
    assert psi(ref, rng.normal(0.5, 1, 5000)) > 0.2
    assert psi(ref, rng.normal(2.0, 1, 5000)) > psi(ref, rng.normal(0.5, 1, 5000))


@pytest.mark.parametrize(
    ("break_it", "statistic", "param"),
    [
        (lambda f: f.iloc[:0], "rows", "the file has no interactions"),
        (lambda f: f.assign(rating=f["rating"] * 10), "bad_rating_share", "drift.max_bad_rating_share"),
        (lambda f: f.iloc[:200], "volume_ratio", "drift.min_volume_ratio"),
        (
            lambda f: f.assign(item_id=f["item_id"] + 10_000),
            "unknown_items_share",
            "drift.unknown_items_fail",
        ),
    ],
    ids=["empty", "ratings-out-of-range", "volume-collapse", "ids-renumbered"],
)
def test_a_broken_feed_raises_naming_file_statistic_and_threshold(
    tmp_path: Path, break_it, statistic: str, param: str
) -> None:
    ref = zipf_frame(seed=1)
    out = tmp_path / "drift_report.json"
    with pytest.raises(BrokenFeedError) as err:
        check_drift(
            frame_of(break_it(zipf_frame(seed=2)), "feed/interactions.csv"), frame_of(ref, "r"), CFG, out
        )
    message = str(err.value)
    assert "feed/interactions.csv" in message and statistic in message
    assert param in message and "params.yaml" in message and "drift.enabled=false" in message
    assert out.exists() and '"status": "broken"' in out.read_text()


def test_no_reference_still_catches_a_broken_feed() -> None:
    ok = compare(frame_of(zipf_frame(), "new"), None, CFG)
    assert ok["status"] == "ok" and ok["reference"] is None
    bad = compare(frame_of(zipf_frame().assign(rating=np.nan), "new"), None, CFG)
    assert bad["status"] == "ok", "an implicit feed (no ratings at all) is not broken"
    bad = compare(frame_of(zipf_frame().assign(rating=-1), "new"), None, CFG)
    assert bad["status"] == "broken"


def test_task_reads_the_source_and_the_served_reference(tmp_path: Path) -> None:
    """The task: a source vs the served training set of the same source -> ok; thresholds from params."""
    served = tmp_path / "served" / "current" / "validated"
    served.mkdir(parents=True)
    params_file = write_params(
        tmp_path,
        data={"synthetic": {"n_interactions": 2000, "seed": 3}},
        promote={"served_dir": str(tmp_path / "served")},
    )
    params = load_params(params_file)
    from fuserec.data.sources import load_source

    raw = load_source(params.data).interactions
    raw[["user_id", "item_id", "rating", "timestamp"]].to_parquet(served / "interactions.parquet")
    report = drift.fn(params)
    assert report["status"] == "ok" and report["reference"]["source"].endswith("interactions.parquet")
    assert (params.outputs_dir / "drift_report.json").exists()
    strict = load_params(params_file, ["drift.min_volume_ratio=2.0"])
    with pytest.raises(BrokenFeedError, match="volume_ratio"):
        drift.fn(strict)
