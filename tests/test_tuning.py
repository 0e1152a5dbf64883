from pathlib import Path

import pytest
import yaml

from fuserec.tasks.clean import clean
from fuserec.tasks.split import split
from fuserec.tasks.validate import validate
from fuserec.tuning import tune


def test_tune_searches_on_validation_and_writes_settings(small_params, tmp_path: Path, monkeypatch) -> None:
    params = small_params.model_copy(
        update={"tune": small_params.tune.model_copy(update={"algorithms": ["itemknn"], "n_trials": 3})}
    )
    for stage in (validate, clean, split):
        stage.fn(params)
    # A test split that would make any test-reading tuner fail loudly: tuning must never open it.
    test_file = params.outputs_dir / "split" / "test.parquet"
    test_file.unlink()
    records = tune(params, settings_dir=tmp_path / "settings")
    record = records["itemknn"]
    assert record["carve"] == "validation" and len(record["trials"]) == 3
    assert record["best_value"] == max(t["ndcg@10"] for t in record["trials"])
    # Trial 0 is the current setting, so tuning never reports worse than what was configured.
    assert record["trials"][0]["config"]["k"] == params.algorithms["itemknn"]["k"]
    written = yaml.safe_load((tmp_path / "settings" / "synthetic.yaml").read_text())
    assert written["algorithms"]["itemknn"] == {k: v for k, v in record["best"].items() if k != "seed"}


@pytest.mark.integration
def test_the_tune_flow_runs_trials_concurrently_and_matches_the_plain_search(
    small_params, tmp_path: Path, prefect_harness: None
) -> None:
    from fuserec.flows.tuning import run_tune

    params = small_params.model_copy(
        update={
            "tune": small_params.tune.model_copy(update={"algorithms": ["itemknn"], "n_trials": 4}),
            "train": small_params.train.model_copy(update={"workers": 2, "task_runner": "threads"}),
        }
    )
    for stage in (validate, clean, split):
        stage.fn(params)
    plain = tune(params, settings_dir=tmp_path / "plain", batch=2)["itemknn"]
    flowed = run_tune(params, tmp_path / "flow")["itemknn"]
    # optuna proposed the same two batches of two and heard the same values back, in the same order
    assert [t["config"] for t in flowed["trials"]] == [t["config"] for t in plain["trials"]]
    assert [t["ndcg@10"] for t in flowed["trials"]] == [t["ndcg@10"] for t in plain["trials"]]
    assert len({t["config"]["k"] for t in flowed["trials"]}) > 1  # a batch is spread, not one setting twice
    written = [(tmp_path / run / "synthetic.yaml").read_text() for run in ("flow", "plain")]
    assert written[0] == written[1]
