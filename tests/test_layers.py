"""The layers stand the right way up: import contracts, thin task wrappers, one stage table."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fuserec.caching import cache_key
from fuserec.config import Params
from fuserec.stages.table import STAGES, dvc_stages, dvc_yaml

from .conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_hold() -> None:
    result = subprocess.run([str(LINT_IMPORTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def test_the_private_names_contract_catches_a_plugin_reaching_into_another(tmp_path: Path) -> None:
    """The custom contract is not vacuous: a tiny package that breaks it is reported, line and name."""
    pkg = tmp_path / "toy"
    (pkg / "plugins").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text(
        "def _helper() -> int:\n    return 1\n\n\ndef public() -> int:\n    return 2\n"
    )
    (pkg / "plugins" / "__init__.py").write_text("")
    (pkg / "plugins" / "a.py").write_text("def _mine() -> int:\n    return 3\n")
    (pkg / "plugins" / "b.py").write_text(
        "from toy.core import public\nfrom toy.plugins.a import (\n    _mine,\n)\n"
    )
    (tmp_path / "tools").symlink_to(REPO / "tools")
    (tmp_path / ".importlinter").write_text(
        textwrap.dedent(
            """\
            [importlinter]
            root_packages =
                toy
            contract_types =
                private_names: tools.import_rules.PrivateNamesContract

            [importlinter:contract:p]
            name = no private names
            type = private_names
            root = toy
            source_modules =
                toy
            units =
                toy.plugins.a
                toy.plugins.b
            """
        )
    )
    result = subprocess.run([str(LINT_IMPORTS)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "toy.plugins.b:2 imports the private name toy.plugins.a._mine" in result.stdout, result.stdout
    assert "toy.core.public" not in result.stdout


def test_the_service_loads_without_prefect_or_any_stage() -> None:
    code = (
        "import sys, fuserec.serving.app\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'typer')"
        " or m.startswith(('fuserec.stages', 'fuserec.tasks', 'fuserec.flows')))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def _wraps_a_stage(value: ast.expr) -> bool:
    """``task(name=...)(stage.<fn>)``: Prefect's task decorator applied to a stage function, nothing else."""
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Call)
        and isinstance(value.func.func, ast.Name)
        and value.func.func.id == "task"
        and not value.func.args
        and len(value.args) == 1
        and isinstance(value.args[0], ast.Attribute)
        and isinstance(value.args[0].value, ast.Name)
        and value.args[0].value.id == "stage"
    )


def _task_module_violations(path: Path) -> list[str]:
    """Statements of a ``fuserec/tasks`` module other than imports and ``name = task(...)(stage.name)``."""
    tree = ast.parse(path.read_text())
    bad = []
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if not (isinstance(node, ast.Assign) and _wraps_a_stage(node.value)):
            bad.append(f"{path.name}:{node.lineno}")
    return bad


def test_task_modules_are_thin_wrappers_over_the_stage_functions() -> None:
    modules = sorted((REPO / "fuserec" / "tasks").glob("*.py"))
    assert {p.stem for p in modules} >= {s.name for s in STAGES}
    bad = [v for p in modules for v in _task_module_violations(p)]
    assert bad == [], f"logic in fuserec/tasks (move it to fuserec/stages): {bad}"
    # and the check bites: a function body is not a wrapper
    assert _task_module_violations(REPO / "fuserec" / "stages" / "split.py")


def test_dvc_yaml_is_generated_from_the_stage_table() -> None:
    from fuserec.config import load_params
    from fuserec.stages.table import raw_data_dependency, settings_dependency

    committed = (REPO / "dvc.yaml").read_text()
    params = load_params(REPO / "params.yaml")
    data = params.data
    raw, settings = raw_data_dependency(data), settings_dependency(data)
    expected = dvc_yaml(raw_data=raw, settings=settings, erasures=params.privacy.erasures)
    assert committed == expected, "dvc.yaml is stale: run `fuserec dvc-yaml` and commit it"
    assert list(yaml.safe_load(committed)["stages"]) == [s.name for s in STAGES]


def test_every_declared_code_path_exists_and_every_stage_has_a_function() -> None:
    import importlib

    for s in STAGES:
        for path in s.code:
            assert (REPO / path).exists(), f"stage {s.name} declares missing code {path}"
        assert callable(getattr(importlib.import_module(f"fuserec.stages.{s.name}"), s.name))
    # each stage's inputs are produced by an earlier stage
    produced: set[str] = set()
    for s in STAGES:
        for needed in s.inputs:
            assert any(needed == p or needed.startswith(p + "/") for p in produced), (s.name, needed)
        produced.update(s.output_paths)


# How a stage module spells the params it reads, mapped to the keys that declare them.
ALIASES = {"validate_": "validate", "algorithm_config": "algorithms", "fuser_config": "fusers"}
NOT_PARAMS = {"outputs", "outputs_dir", "yaml", "cache_dir"}
PROPERTIES = {"export.rerank_shape": ("export.rerank_depth", "export.rerank_keep", "export.rerank_order")}


def _params_read(path: Path) -> set[str]:
    """Dotted keys of every ``params.a`` / ``params.a.b`` attribute chain in a stage module."""
    keys = set()
    tree = ast.parse(path.read_text())
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id == "params" and chain:
            parts = [ALIASES.get(p, p) for p in reversed(chain)][:2]
            if parts[0] not in NOT_PARAMS:
                keys.add(".".join(parts))
    return keys


@pytest.mark.parametrize("decl", STAGES, ids=lambda s: s.name)
def test_a_stage_reads_only_params_it_declares(decl: object) -> None:
    stage = decl  # a fuserec.stages.table.Stage
    read = _params_read(REPO / "fuserec" / "stages" / f"{stage.name}.py")  # type: ignore[attr-defined]
    declared = stage.params  # type: ignore[attr-defined]
    expanded = {k2 for k in read for k2 in PROPERTIES.get(k, (k,))}
    missing = sorted(k for k in expanded if not any(k == d or k.startswith(d + ".") for d in declared))
    assert missing == [], f"{stage.name} reads {missing}, undeclared in fuserec/stages/table.py"


def test_the_params_check_bites() -> None:
    fake = REPO / "fuserec" / "stages" / "evaluate.py"
    assert "export.rerank_shape" in _params_read(fake) and "train.seed" in _params_read(fake)


def test_evaluate_is_rekeyed_by_every_param_it_declares(tmp_path: Path) -> None:
    from fuserec.flows.stages import stage_spec

    base = Params.model_validate({"outputs": str(tmp_path / "out")})
    key = cache_key(stage_spec("evaluate", base))
    for override in (
        {"export": {"rerank_keep": 3}},
        {"export": {"rerank_depth": 7}},
        {"export": {"algorithm": "ease"}},
        {"train": {"seed": 1}},
        {"evaluate": {"ks": [5]}},
    ):
        raw = base.model_dump(by_alias=True)
        for section, values in override.items():
            raw[section] = {**raw[section], **values}
        assert cache_key(stage_spec("evaluate", Params.model_validate(raw))) != key, override
    # what evaluate does not read leaves its key alone
    raw = base.model_dump(by_alias=True)
    raw["export"] = {**raw["export"], "opset": raw["export"]["opset"] + 1}
    assert cache_key(stage_spec("evaluate", Params.model_validate(raw))) == key


def test_dvc_metrics_and_plots_live_in_git_unless_declared_cached() -> None:
    declared = {f"outputs/{o.path}": o.cache for s in STAGES for o in s.outputs}
    for entry in dvc_stages().values():
        for section in ("metrics", "plots"):
            for item in entry.get(section, []):
                ((path, options),) = item.items()
                assert options["cache"] is bool(declared[path])
    assert dvc_stages()["train"]["plots"][0]["outputs/curves"]["cache"] is True  # may be an empty folder


def test_every_layout_path_is_a_declared_stage_output(tmp_path: Path) -> None:
    """Layout (where code finds a file) and the stage table (who writes it) name the same paths."""
    from fuserec.layout import Layout

    layout = Layout(tmp_path)
    declared = {p for s in STAGES for p in s.output_paths}
    for name in dir(Layout):
        value = getattr(layout, name) if isinstance(getattr(Layout, name, None), property) else None
        if not isinstance(value, Path) or value == tmp_path:
            continue
        relative = value.relative_to(tmp_path).as_posix()
        if name == "export":
            assert relative == "model"
        assert any(relative == p or relative.startswith(p + "/") for p in declared), (name, relative)
