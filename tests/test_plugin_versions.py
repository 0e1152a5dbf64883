"""The versioned contract: a plugin built for another major api_version is refused, and says why.

The refusal must name the plugin, its distribution, the version it declares and the versions this fuserec
supports, wherever it surfaces: `fuserec plugins`, and the error raised when a run asks for it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuserec.api import API_VERSION, SUPPORTED_API_MAJORS, api_major
from fuserec.cli import app
from fuserec.registry import PluginError, available, discover, get_algorithm, resolve_names

from .conftest import REPO
from .plugin_fixtures import install_broken_plugins, on_path

DIST, VERSION, MODULE = "fuserec-versioned-plugins", "2.3.0", "fuserec_versioned_plugins"
SUPPORTED = f"{SUPPORTED_API_MAJORS[0]}.x"
DECLARED = {"later_minor": "1.7", "next_major": "2.0", "old_major": "0.9", "unparsable": "one"}


@pytest.fixture
def versioned(tmp_path: Path) -> Iterator[None]:
    """One distribution, on disk as pip lays it out, holding a plugin per declared api_version."""
    info = tmp_path / f"{MODULE}-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
    entries = "".join(f"{name} = {MODULE}:{name.title().replace('_', '')}\n" for name in DECLARED)
    (info / "entry_points.txt").write_text(f"[fuserec.algorithms]\n{entries}")
    classes = "".join(
        f"\n\nclass {name.title().replace('_', '')}(Popularity):\n    api_version = {declared!r}\n"
        for name, declared in DECLARED.items()
    )
    (tmp_path / f"{MODULE}.py").write_text(f"from fuserec.plugins.popularity import Popularity\n{classes}")
    sys.path.insert(0, str(tmp_path))
    discover.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(MODULE, None)
        discover.cache_clear()


def test_a_newer_minor_of_a_supported_major_loads(versioned: None) -> None:
    assert "later_minor" in available()
    assert get_algorithm("later_minor").api_version == "1.7"


@pytest.mark.parametrize("name", ["next_major", "old_major", "unparsable"])
def test_another_major_is_refused_naming_everything(versioned: None, name: str) -> None:
    info = next(p for p in discover() if p.name == name)
    assert not info.ok and info.api_version == DECLARED[name] and info.cls is None
    for requested in (name, [name]):
        with pytest.raises(PluginError) as err:
            get_algorithm(name) if isinstance(requested, str) else resolve_names(requested)
        message = str(err.value)
        for part in (repr(name), DIST, VERSION, f"api_version {DECLARED[name]}", SUPPORTED, API_VERSION):
            assert part in message, (part, message)
    assert name not in resolve_names("all")  # a run over every plugin skips it; the others still train


def test_fuserec_plugins_shows_the_refusal_on_the_plugin_row(versioned: None) -> None:
    result = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    row = next(line for line in result.output.splitlines() if " next_major " in line)
    for part in (DIST, VERSION, "2.0", SUPPORTED):
        assert part in row, (part, row)
    assert "ok" in next(line for line in result.output.splitlines() if " later_minor " in line)


def test_the_message_quoted_in_the_docs_is_the_real_one(tmp_path: Path) -> None:
    with on_path(install_broken_plugins(tmp_path)), pytest.raises(PluginError) as err:
        get_algorithm("future")
    assert f"\n{err.value}\n" in (REPO / "docs" / "concepts" / "plugins.md").read_text()


def test_api_major_parses_major_minor() -> None:
    assert api_major("1.0") == 1 and api_major("12.3") == 12
    with pytest.raises(ValueError, match=r"not MAJOR\.MINOR"):
        api_major("one")
