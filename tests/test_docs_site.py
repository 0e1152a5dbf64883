"""The documentation site's generated Reference pages cover what the code declares.

``docs/hooks.py`` renders the CLI, ``params.yaml``, HTTP API and stage pages from the code at build time;
these tests compare each page with the code it comes from, independently of how the page walks it, so a
command, a key, a route or a stage the generator skips fails here. The full ``--strict`` site build runs
in ``make docs`` (and ``make test``).
"""

from __future__ import annotations

import importlib.util
import re
from types import ModuleType

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuserec_docs_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaf_keys(model: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a pydantic model, walked here rather than by the generator."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _leaf_keys(annotation, f"{key}.")
        else:
            keys.append(key)
    return keys


def test_every_params_key_is_documented(hooks: ModuleType) -> None:
    from fuserec.config import Params

    page = hooks.params_reference()
    expected = _leaf_keys(Params)
    assert len(expected) > 50  # the walk found the nested sections, not only the top level
    missing = [key for key in expected if f"| `{key}` |" not in page]
    assert not missing, f"params keys missing from reference/params.md: {missing}"
    assert sorted(hooks.params_keys()) == sorted(expected)


def test_every_plugin_setting_is_documented(hooks: ModuleType) -> None:
    from fuserec.registry import ALGORITHMS_GROUP, FUSERS_GROUP, discover

    page = hooks.params_reference()
    expected = [
        f"{section}.{info.name}.{field}"
        for group, section in ((ALGORITHMS_GROUP, "algorithms"), (FUSERS_GROUP, "fusers"))
        for info in discover(group)
        if info.ok and info.cls is not None
        for field in info.cls.Config.model_fields
    ]
    assert any(key.startswith("algorithms.itemknn.") for key in expected)
    assert any(key.startswith("fusers.stacking.") for key in expected)
    missing = [key for key in expected if f"| `{key}` |" not in page]
    assert not missing, f"plugin settings missing from reference/params.md: {missing}"


def test_every_cli_command_and_option_is_documented(hooks: ModuleType) -> None:
    import typer.main

    from fuserec.cli import app

    group = typer.main.get_command(app)
    page = hooks.cli_reference()
    assert {"run", "stage", "serve", "recommend"} <= set(group.commands)
    for name, command in group.commands.items():
        assert f"## `fuserec {name}`" in page, f"command {name!r} missing from reference/cli.md"
        section = page.split(f"## `fuserec {name}`", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "hidden", False):
                for opt in param.opts:
                    assert f"`{opt}`" in section, f"option {opt} of {name!r} missing from reference/cli.md"


def test_every_http_route_is_documented(hooks: ModuleType) -> None:
    app = hooks.openapi_app()
    page = hooks.http_reference()
    routes = [
        (method, route.path)
        for route in app.routes
        if getattr(route, "include_in_schema", False)
        for method in sorted(getattr(route, "methods", ()) or ())
        if method != "HEAD"
    ]
    assert ("POST", "/recommend") in routes and ("GET", "/explain") in routes
    for method, path in routes:
        assert f"## `{method} {path}`" in page, f"{method} {path} missing from reference/http-api.md"
    assert "`GET /metrics`" in page  # served outside the OpenAPI schema, documented all the same
    for schema in ("RecommendIn", "EventsIn"):
        assert f"### `{schema}`" in page


def test_every_stage_is_documented(hooks: ModuleType) -> None:
    from fuserec.stages import STAGES

    page = hooks.stages_reference()
    assert len(STAGES) >= 8
    for stage in STAGES:
        assert f"## `{stage.name}`" in page
        section = page.split(f"## `{stage.name}`", 1)[1].split("\n## ", 1)[0]
        for key in stage.params:
            assert f"[`{key}`](params.md#" in section, f"param {key} of stage {stage.name} not listed"
        for output in stage.outputs:
            assert f"`{output.path}`" in section


def test_generated_pages_are_not_committed(hooks: ModuleType) -> None:
    # they are rendered at build time; a committed copy would silently go stale (the hook refuses it)
    for page in hooks.PAGES:
        assert not (REPO / "docs" / page).exists(), f"docs/{page} is generated: delete it"


def test_nav_lists_every_page(hooks: ModuleType) -> None:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may hold python tags (none today); ignore any so the nav can be read with safe_load
    _Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_Loader)
    listed = set(re.findall(r"[\w./-]+\.md", str(config["nav"])))
    written = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert written <= listed, f"pages not in mkdocs.yml's nav: {sorted(written - listed)}"
    assert listed - written == set(hooks.PAGES), "nav names a page that is neither written nor generated"


def test_docs_speak_of_no_issue_or_dated_rerun() -> None:
    pages = [p for p in (REPO / "docs").rglob("*.md") if p.name != "results.md"]
    bad = re.compile(r"\bissue \d|must-show|\b20\d\d-\d\d-\d\d\b|\bp = \d", re.IGNORECASE)
    found = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in pages for m in bad.finditer(p.read_text())]
    assert not found, f"lab notes in the docs (keep them to results.md): {found}"
