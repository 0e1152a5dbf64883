"""``AlgorithmTests``: the aggregate pytest class every plugin's tests subclass (built-ins included)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from fuserec.api import Algorithm
from fuserec.data.dataset import Dataset
from fuserec.testing import checks
from fuserec.testing.data import planted_dataset


class AlgorithmTests:
    """Subclass and set ``algorithm`` (and optionally ``config`` and ``bad_configs``).

    ``config``: the settings the checks fit with (keep them small and fast).
    ``bad_configs``: dicts of values the Config must reject, e.g. ``[{"k": 0}]``.
    """

    algorithm: ClassVar[type[Algorithm]]
    config: ClassVar[dict[str, Any] | None] = None
    bad_configs: ClassVar[list[dict[str, Any]]] = []
    parity_tolerance: ClassVar[float] = 1e-4

    @pytest.fixture(scope="class")
    def data(self) -> Dataset:
        return planted_dataset()

    @pytest.fixture(scope="class")
    def fitted(self, data: Dataset) -> Algorithm:
        return checks.make(self.algorithm, self.config).fit(data)

    def test_config_round_trips_and_rejects_bad_values(self) -> None:
        checks.check_config(self.algorithm, self.config, self.bad_configs)

    def test_scores_shape_dtype_finite(self, fitted: Algorithm, data: Dataset) -> None:
        checks.check_scores(fitted, checks.probe_histories(data))

    def test_empty_history_and_cold_item(self, fitted: Algorithm, data: Dataset) -> None:
        scores = checks.check_scores(fitted, checks.probe_histories(data))
        assert scores.shape[1] == data.n_items  # the cold item (never interacted with) is scored too

    def test_fit_is_deterministic(self, data: Dataset) -> None:
        checks.check_deterministic(self.algorithm, self.config, data, checks.probe_histories(data))

    def test_seen_items_can_be_excluded(self, fitted: Algorithm, data: Dataset) -> None:
        checks.check_exclusion(fitted, checks.probe_histories(data))

    def test_save_load_without_pickle(self, fitted: Algorithm, data: Dataset) -> None:
        checks.check_save_load(fitted, checks.probe_histories(data))

    def test_onnx_export_matches_python(self, fitted: Algorithm, data: Dataset) -> None:
        checks.check_onnx_parity(fitted, checks.probe_histories(data), self.parity_tolerance)

    def test_recovers_planted_structure(self, data: Dataset) -> None:
        checks.check_planted_structure(self.algorithm, self.config, data)
