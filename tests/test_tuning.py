from pathlib import Path

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
