"""``fuserec new-plugin``: a ready, installable plugin distribution rendered from ``templates/<kind>/``.

A new plugin should start from something that installs and passes the conformance kit, so its author
changes working code instead of filling in stubs. Templates are files on disk (not strings in this module)
so a new kind is a new folder; see ``fuserec/templates/README.md`` for the rendering rules.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

from fuserec.api import API_VERSION
from fuserec.registry import ALGORITHMS_GROUP

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE_SUFFIX = ".tmpl"
PACKAGE_TOKEN = "PACKAGE"  # a path component holding it is renamed to the package name
DEFAULT_KIND = "algorithm"
# Kinds announced but not generated yet: kind -> why, shown to whoever asks for one.
PLANNED_KINDS: dict[str, str] = {
    "fuser": "fuser plugins arrive with the fuser API, and their template with it; "
    "until then only --kind algorithm can be generated",
}
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
MAX_NAME_LENGTH = 40


class ScaffoldError(ValueError):
    """The plugin cannot be generated as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from the one the author chose, so they stay consistent across files."""

    name: str  # entry-point name and params.yaml key (algorithms.<name>)
    distribution: str  # what pip installs: fuserec-<name>
    package: str  # the import package: fuserec_<name>
    class_name: str  # the Algorithm subclass: CamelCase of name

    @classmethod
    def from_name(cls, name: str) -> PluginNames:
        check_name(name)
        return cls(
            name=name,
            distribution="fuserec-" + name.replace("_", "-"),
            package="fuserec_" + name,
            class_name="".join(part[:1].upper() + part[1:] for part in name.split("_") if part),
        )

    def variables(self) -> dict[str, str]:
        """What ``$...`` placeholders in templates expand to."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "package": self.package,
            "class_name": self.class_name,
            "api_version": API_VERSION,
            "fuserec_version": md.version("fuserec"),
        }


def check_name(name: str) -> None:
    """A plugin name is a lower-case Python identifier: it is a params.yaml key and part of a module name."""
    if not NAME_PATTERN.fullmatch(name) or name.endswith("_") or "__" in name:
        suggestion = re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", name.lower())).strip("_")
        hint = f"; for example {suggestion!r}" if NAME_PATTERN.fullmatch(suggestion) else ""
        raise ScaffoldError(
            f"plugin name {name!r} is not valid: use lower-case letters, digits and single underscores, "
            f"starting with a letter (it becomes the entry-point name, the params.yaml key "
            f"algorithms.<name> and the package fuserec_<name>){hint}"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ScaffoldError(f"plugin name {name!r} is longer than {MAX_NAME_LENGTH} characters")
    builtins = {ep.name for ep in md.distribution("fuserec").entry_points if ep.group == ALGORITHMS_GROUP}
    if name in builtins:
        raise ScaffoldError(
            f"plugin name {name!r} is already a built-in fuserec algorithm; choose another name "
            f"(the built-ins are {', '.join(sorted(builtins))})"
        )


def kinds() -> list[str]:
    """Kinds that can be generated: one template folder each."""
    return sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def check_kind(kind: str) -> Path:
    if kind in kinds():
        return TEMPLATES / kind
    if kind in PLANNED_KINDS:
        raise ScaffoldError(f"--kind {kind}: {PLANNED_KINDS[kind]}")
    raise ScaffoldError(f"unknown --kind {kind!r}; choose one of: {', '.join(kinds())}")


def render(template_dir: Path, dest: Path, variables: dict[str, str]) -> list[Path]:
    """Write ``template_dir``'s files under ``dest``: ``.tmpl`` files rendered, others copied."""
    written = []
    for source in sorted(p for p in template_dir.rglob("*") if p.is_file()):
        rel = source.relative_to(template_dir)
        if "__pycache__" in rel.parts:
            continue
        parts = [part.replace(PACKAGE_TOKEN, variables["package"]) for part in rel.parts]
        target = dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.name.endswith(TEMPLATE_SUFFIX):
            target = target.with_name(target.name.removesuffix(TEMPLATE_SUFFIX))
            try:
                text = Template(source.read_text()).substitute(variables)
            except (KeyError, ValueError) as exc:  # a template bug, not the user's: name the file
                raise ScaffoldError(f"template {source} has a bad placeholder: {exc!r}") from exc
            target.write_text(text)
        else:
            shutil.copyfile(source, target)
        written.append(target)
    return written


def new_plugin(name: str, dest: str | Path | None = None, kind: str = DEFAULT_KIND) -> Path:
    """Generate plugin ``name`` of ``kind`` into the new folder ``dest`` (default ``./fuserec-<name>``).

    Refuses an existing ``dest`` rather than mixing generated files into someone's work.
    """
    template_dir = check_kind(kind)
    names = PluginNames.from_name(name)
    folder = Path(dest) if dest is not None else Path.cwd() / names.distribution
    if folder.exists():
        raise ScaffoldError(
            f"{folder} already exists; nothing was written. Choose another folder with --dest, "
            f"or remove it first"
        )
    folder.mkdir(parents=True)
    try:
        render(template_dir, folder, names.variables())
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # never leave a half-generated package behind
        raise
    return folder
