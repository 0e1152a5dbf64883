from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuserec.cli import app
from fuserec.registry import PluginError, available, discover, get_algorithm, plugin_info, resolve_names

from .plugin_fixtures import BROKEN_DIST, BROKEN_VERSION, install_broken_plugins, on_path


def test_builtins_are_found_through_entry_points() -> None:
    infos = {p.name: p for p in discover()}
    for name in ("popularity", "itemknn"):
        assert infos[name].ok, infos[name].error
        assert infos[name].distribution == "fuserec"
        assert infos[name].api_version == "1.0"


def test_broken_plugins_are_reported_and_the_rest_load(tmp_path: Path) -> None:
    with on_path(install_broken_plugins(tmp_path)):
        infos = {p.name: p for p in discover()}
        broken, future = infos["broken"], infos["future"]
        assert (broken.distribution, broken.version) == (BROKEN_DIST, BROKEN_VERSION)
        assert "a_module_that_does_not_exist" in broken.error
        assert "2.0" in future.error and "1.x" in future.error and BROKEN_DIST in future.error
        assert {"popularity", "itemknn"} <= set(available())
        assert "broken" not in resolve_names("all")
        with pytest.raises(PluginError, match=f"{BROKEN_DIST} {BROKEN_VERSION}"):
            get_algorithm("broken")
        result = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "250"})
        assert result.exit_code == 0
        assert "broken" in result.output and BROKEN_DIST in result.output and "popularity" in result.output


def test_unknown_name_lists_what_is_available() -> None:
    with pytest.raises(PluginError, match="available"):
        plugin_info("nope")


def test_rating_counterparts_are_registered_raters_and_listed_as_capabilities() -> None:
    from fuserec.registry import ALGORITHMS_GROUP, RATERS_GROUP, available, capabilities, discover

    raters = set(available(RATERS_GROUP))
    declared = {i.name: i for i in discover(ALGORITHMS_GROUP) if getattr(i.cls, "rating_counterpart", None)}
    assert {"itemknn", "userknn"} <= set(declared)
    for name, info in declared.items():
        counterpart = info.cls.rating_counterpart  # type: ignore[union-attr]
        assert counterpart in raters, f"{name} names {counterpart!r}, which is not a registered rater"
        assert f"predicts ratings as rater {counterpart!r}" in capabilities(info)
    neural = next(i for i in discover(RATERS_GROUP) if i.name == "neural")
    assert capabilities(neural) == ["predicts ratings", "reads user attributes"]
