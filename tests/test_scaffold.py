"""`fuserec new-plugin` writes a complete, consistent distribution and refuses what it cannot do safely."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuserec import scaffold
from fuserec.api import API_VERSION
from fuserec.cli import app
from fuserec.scaffold import PluginNames, ScaffoldError, new_plugin

WIDE = {"COLUMNS": "250"}  # rich wraps at the terminal width; keep messages on one line
LINE_LENGTH = 110  # what the generated pyproject gives ruff


def test_names_derive_from_one_choice() -> None:
    names = PluginNames.from_name("my_algo2")
    assert (names.distribution, names.package, names.class_name) == (
        "fuserec-my-algo2",
        "fuserec_my_algo2",
        "MyAlgo2",
    )


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("My-Algo", "my_algo"), ("1st", None), ("a__b", "a_b"), ("cooc_", "cooc"), ("", None), ("a b", "a_b")],
)
def test_invalid_names_are_refused_with_a_fix(name: str, suggestion: str | None) -> None:
    with pytest.raises(ScaffoldError, match="is not valid: use lower-case letters") as err:
        PluginNames.from_name(name)
    if suggestion:
        assert f"for example {suggestion!r}" in str(err.value)


@pytest.mark.parametrize("kind", ["algorithm", "fuser"])
def test_builtin_names_of_either_kind_are_refused(kind: str) -> None:
    # A fuser named like an algorithm (or the reverse) would clash in the fuse stage and in metrics.json.
    with pytest.raises(ScaffoldError, match="already a built-in fuserec algorithm"):
        new_plugin("itemknn", Path("unused"), kind=kind)
    with pytest.raises(ScaffoldError, match="already a built-in fuserec fuser"):
        new_plugin("weighted", Path("unused"), kind=kind)


def test_unknown_kinds_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    assert scaffold.kinds() == ["algorithm", "fuser"]
    with pytest.raises(ScaffoldError, match="choose one of: algorithm, fuser"):
        new_plugin("cooc", tmp_path / "x", kind="ranker")
    assert not (tmp_path / "x").exists()


def test_an_existing_folder_is_never_touched(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(ScaffoldError, match="already exists; nothing was written"):
        new_plugin("cooc", dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_generated_files_are_complete_and_consistent(tmp_path: Path) -> None:
    folder = new_plugin("cooc", tmp_path / "pkg")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "pyproject.toml",
        "src/fuserec_cooc/__init__.py",
        "src/fuserec_cooc/py.typed",
        "tests/test_fuserec_cooc.py",
    ]
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["project"]["name"] == "fuserec-cooc"
    assert project["project"]["entry-points"]["fuserec.algorithms"] == {"cooc": "fuserec_cooc:Cooc"}
    module = (folder / "src/fuserec_cooc/__init__.py").read_text()
    ast.parse(module)
    assert f'api_version: ClassVar[str] = "{API_VERSION}"' in module and "class Cooc(Algorithm)" in module
    tests = (folder / "tests/test_fuserec_cooc.py").read_text()
    ast.parse(tests)
    assert "class TestCooc(AlgorithmTests):\n    algorithm = Cooc\n" in tests
    for path in folder.rglob("*"):
        if path.is_file():
            assert "$" not in path.read_text(), f"unrendered placeholder in {path}"


def test_generated_fuser_is_complete_and_consistent(tmp_path: Path) -> None:
    folder = new_plugin("blend", tmp_path / "pkg", kind="fuser")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "pyproject.toml",
        "src/fuserec_blend/__init__.py",
        "src/fuserec_blend/py.typed",
        "tests/test_fuserec_blend.py",
    ]
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["project"]["name"] == "fuserec-blend"
    assert project["project"]["entry-points"] == {"fuserec.fusers": {"blend": "fuserec_blend:Blend"}}
    module = (folder / "src/fuserec_blend/__init__.py").read_text()
    ast.parse(module)
    assert f'api_version: ClassVar[str] = "{API_VERSION}"' in module
    assert "class Blend(Fuser)" in module and "class BlendConfig(FuserConfig)" in module
    tests = (folder / "tests/test_fuserec_blend.py").read_text()
    ast.parse(tests)
    assert "class TestBlend(FuserTests):\n    fuser = Blend\n" in tests
    assert 'plugin_info("blend", FUSERS_GROUP)' in tests
    readme = (folder / "README.md").read_text()
    assert "--kind fuser" in readme and "fusers:\n  blend:" in readme
    for path in folder.rglob("*"):
        if path.is_file():
            assert "$" not in path.read_text(), f"unrendered placeholder in {path}"


@pytest.mark.parametrize("kind", ["algorithm", "fuser"])
def test_the_longest_name_still_fits_the_line_length(tmp_path: Path, kind: str) -> None:
    name = "a" * scaffold.MAX_NAME_LENGTH
    folder = new_plugin(name, tmp_path / "long", kind=kind)
    for path in folder.rglob("*.py"):
        longest = max(len(line) for line in path.read_text().splitlines())
        assert longest <= LINE_LENGTH, f"{path.name}: a line of {longest} characters"
    with pytest.raises(ScaffoldError, match="longer than"):
        PluginNames.from_name(name + "a")


def test_a_broken_template_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    templates = tmp_path / "templates"
    (templates / "algorithm").mkdir(parents=True)
    (templates / "algorithm" / "a.txt").write_text("fine")
    (templates / "algorithm" / "b.txt.tmpl").write_text("$no_such_variable")
    monkeypatch.setattr(scaffold, "TEMPLATES", templates)
    with pytest.raises(ScaffoldError, match=r"b\.txt\.tmpl has a bad placeholder"):
        new_plugin("cooc", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_generates_and_reports_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["new-plugin", "cooc", "--dest", str(tmp_path / "p")], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "fuserec-cooc written to" in result.output
    assert "train.algorithms=[popularity,cooc]" in result.output  # the next steps, markup not eaten
    again = runner.invoke(app, ["new-plugin", "cooc", "--dest", str(tmp_path / "p")], env=WIDE)
    assert again.exit_code == 2 and "already exists" in again.output
    fuser = runner.invoke(
        app, ["new-plugin", "blend", "--kind", "fuser", "--dest", str(tmp_path / "f")], env=WIDE
    )
    assert fuser.exit_code == 0, fuser.output
    assert "fuserec-blend written to" in fuser.output and (tmp_path / "f" / "src" / "fuserec_blend").is_dir()
    assert "--set 'fuse.fusers=[blend]' --set export.algorithm=blend" in fuser.output
    unknown = runner.invoke(app, ["new-plugin", "blend", "--kind", "ranker"], env=WIDE)
    assert unknown.exit_code == 2 and "choose one of: algorithm, fuser" in unknown.output
    bad = runner.invoke(app, ["new-plugin", "My-Algo"], env=WIDE)
    assert bad.exit_code == 2 and "'my_algo'" in bad.output
