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
from fuserec.registry import ALGORITHMS_GROUP, FUSERS_GROUP

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE_SUFFIX = ".tmpl"
PACKAGE_TOKEN = "PACKAGE"  # a path component holding it is renamed to the package name
DEFAULT_KIND = "algorithm"
# kind -> the `fuserec run` that tries a freshly installed plugin of that kind ({name} is its name).
RUN_HINTS: dict[str, str] = {
    "algorithm": "fuserec run --set 'train.algorithms=[popularity,{name}]' --set export.algorithm={name}",
    "fuser": "fuserec run --set 'train.algorithms=[popularity,itemknn]' --set 'fuse.fusers=[{name}]' "
    "--set export.algorithm={name}",
}
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
MAX_NAME_LENGTH = 40


class ScaffoldError(ValueError):
    """The plugin cannot be generated as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from the one the author chose, so they stay consistent across files."""

    name: str  # entry-point name and params.yaml key (algorithms.<name> or fusers.<name>)
    distribution: str  # what pip installs: fuserec-<name>
    package: str  # the import package: fuserec_<name>
    class_name: str  # the Algorithm or Fuser subclass: CamelCase of name

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
            f"algorithms.<name> or fusers.<name>, and the package fuserec_<name>){hint}"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ScaffoldError(f"plugin name {name!r} is longer than {MAX_NAME_LENGTH} characters")
    # Built-in algorithms and fusers alike: the fuse stage refuses a fuser named like a trained algorithm,
    # and metrics.json would mix them up.
    groups = {ALGORITHMS_GROUP: "algorithm", FUSERS_GROUP: "fuser"}
    builtins = {
        ep.name: groups[ep.group] for ep in md.distribution("fuserec").entry_points if ep.group in groups
    }
    if name in builtins:
        raise ScaffoldError(
            f"plugin name {name!r} is already a built-in fuserec {builtins[name]}; choose another name "
            f"(the built-ins are {', '.join(sorted(builtins))})"
        )


def kinds() -> list[str]:
    """Kinds that can be generated: one template folder each."""
    return sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def check_kind(kind: str) -> Path:
    """The template folder of ``kind``; an unknown kind is refused with the list of known ones."""
    if kind in kinds():
        return TEMPLATES / kind
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


def next_steps(folder: Path, name: str, kind: str = DEFAULT_KIND) -> str:
    """What the author runs after generating: install, the plugin's own tests, a pipeline run with it."""
    steps = [f"cd {folder}", "pip install -e .", "pytest"]
    if kind in RUN_HINTS:
        steps.append(RUN_HINTS[kind].format(name=name))
    return "\n".join("  " + step for step in steps)
