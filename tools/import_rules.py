"""An import-linter contract that the built-in types cannot express: no reaching for private names.

``private_names``: a module under ``source_modules`` may not import a name that starts with ``_`` (or a
module whose path has such a part) from another "unit". Each package or module listed in ``units`` is
one unit (a plugin and its helper modules); any other module is a unit of its own, so a plugin may use
its own private helpers but never another plugin's, nor a core module's. ``lint-imports`` (run by
``make test``) loads this class through ``contract_types`` in ``.importlinter``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _unit(module: str, units: list[str]) -> str:
    for unit in units:
        if module == unit or module.startswith(unit + "."):
            return unit
    return module


def _source(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


class PrivateNamesContract(Contract):
    """Modules under ``source_modules`` import no private name of another unit of ``root``."""

    source_modules = fields.ListField(subfield=fields.StringField())
    units = fields.ListField(subfield=fields.StringField(), required=False, default=[])
    root = fields.StringField()

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        sources: list[str] = list(self.source_modules)  # type: ignore[call-overload]
        units: list[str] = list(self.units)  # type: ignore[call-overload]
        root = str(self.root)
        found: list[dict[str, Any]] = []
        for module in sorted(graph.modules):
            if not any(module == s or module.startswith(s + ".") for s in sources):
                continue
            path = _source(module)
            if path is None:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                targets: list[tuple[str, str | None]] = []
                if isinstance(node, ast.ImportFrom):
                    base = _absolute(module, node, path.name == "__init__.py")
                    targets = [(base, alias.name) for alias in node.names]
                elif isinstance(node, ast.Import):
                    targets = [(alias.name, None) for alias in node.names]
                for imported, name in targets:
                    if not (imported == root or imported.startswith(root + ".")):
                        continue
                    private_part = any(_is_private(p) for p in imported.split(".")[1:])
                    if not private_part and not (name and _is_private(name)):
                        continue
                    if _unit(module, units) == _unit(imported, units):
                        continue
                    found.append(
                        {"importer": module, "line": node.lineno, "imported": imported, "name": name or ""}
                    )
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for row in check.metadata["found"]:
            what = f"{row['imported']}.{row['name']}" if row["name"] else row["imported"]
            output.print_error(f"{row['importer']}:{row['line']} imports the private name {what}")
            output.new_line()
        output.print("Make the name public in its module (or move it to the core) and import that instead.")
        output.new_line()
