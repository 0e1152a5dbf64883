"""Plugins found through entry points, built-ins exactly like third parties'.

A plugin that fails to import, is not an Algorithm, or declares an unsupported ``api_version`` is
recorded with its distribution and version and an error; the others still load. Four groups share the
mechanism: ranking algorithms, fusers, raters (rating prediction, :mod:`fuserec.rating`) and rating fusers
(:mod:`fuserec.rating_fuser`).
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, cast

from fuserec.api import API_VERSION, SUPPORTED_API_MAJORS, Algorithm, api_major

if TYPE_CHECKING:
    from fuserec.fusion import Fuser
    from fuserec.rating import RatingAlgorithm
    from fuserec.rating_fuser import RatingFuser

ALGORITHMS_GROUP = "fuserec.algorithms"
FUSERS_GROUP = "fuserec.fusers"
RATERS_GROUP = "fuserec.raters"
RATING_FUSERS_GROUP = "fuserec.rating_fusers"
#: Where users name a group's plugins (said in the error of an unknown name).
_CONFIGURED_IN = {
    ALGORITHMS_GROUP: "train.algorithms",
    FUSERS_GROUP: "fuse.fusers",
    RATERS_GROUP: "the rating task's raters",
    RATING_FUSERS_GROUP: "rating.fusers",
}


def _base_class(group: str) -> type:
    """What a plugin of ``group`` must subclass (fusers are imported lazily: they import the registry)."""
    if group == FUSERS_GROUP:
        from fuserec.fusion import Fuser

        return Fuser
    if group == RATERS_GROUP:
        from fuserec.rating import RatingAlgorithm

        return RatingAlgorithm
    if group == RATING_FUSERS_GROUP:
        from fuserec.rating_fuser import RatingFuser

        return RatingFuser
    return Algorithm


class PluginError(LookupError):
    """A plugin that cannot be used; the message says which, why, and what to do."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    group: str
    target: str  # "module:attr" of the entry point
    distribution: str
    version: str
    api_version: str | None
    error: str | None
    cls: type[Algorithm] | type[Fuser] | type[RatingAlgorithm] | type[RatingFuser] | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else f"error: {self.error}"


def _inspect(ep: md.EntryPoint, group: str) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    dist_name = dist.metadata["Name"] if dist is not None else "unknown"
    dist_version = dist.version if dist is not None else "unknown"

    def broken(error: str, api: str | None = None) -> PluginInfo:
        return PluginInfo(ep.name, group, ep.value, dist_name, dist_version, api, error, None)

    try:
        obj = ep.load()
    except Exception as exc:  # a third party's import error must not take the registry down
        return broken(f"import failed: {type(exc).__name__}: {exc}")
    base = _base_class(group)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        return broken(f"{ep.value} is not a subclass of {base.__module__}.{base.__name__}")
    declared = str(getattr(obj, "api_version", "?"))
    try:
        major = api_major(declared)
    except ValueError:
        major = -1
    if major not in SUPPORTED_API_MAJORS:
        supported = ", ".join(f"{m}.x" for m in SUPPORTED_API_MAJORS)
        return broken(
            f"declares api_version {declared}; this fuserec supports {supported} (current {API_VERSION}). "
            f"Upgrade {dist_name} or fuserec so that they match",
            declared,
        )
    plugin = cast("type[Algorithm] | type[Fuser] | type[RatingAlgorithm] | type[RatingFuser]", obj)
    return PluginInfo(ep.name, group, ep.value, dist_name, dist_version, declared, None, plugin)


@cache
def discover(group: str = ALGORITHMS_GROUP) -> tuple[PluginInfo, ...]:
    """Every plugin registered under ``group``, sorted by name, broken ones included."""
    seen: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=group):
        info = _inspect(ep, group)
        if ep.name in seen and seen[ep.name].ok:
            continue  # first working registration of a name wins
        seen[ep.name] = info
    return tuple(sorted(seen.values(), key=lambda p: p.name))


def available(group: str = ALGORITHMS_GROUP) -> list[str]:
    return [p.name for p in discover(group) if p.ok]


def registered(group: str = ALGORITHMS_GROUP) -> list[str]:
    """Names registered under ``group``, sorted, without importing any plugin (broken ones included)."""
    return sorted(set(md.entry_points(group=group).names))


def find(name: str, group: str = ALGORITHMS_GROUP) -> PluginInfo | None:
    """The plugin registered as ``name``, importing only its own module; None when nothing registers it.

    As in :func:`discover`, the first working registration of a name wins; when none works, the info
    of the last broken one is returned (its ``error`` says why).
    """
    found = None
    for ep in md.entry_points(group=group, name=name):
        found = _inspect(ep, group)
        if found.ok:
            break
    return found


def plugin_info(name: str, group: str = ALGORITHMS_GROUP) -> PluginInfo:
    info = find(name, group)
    if info is not None:
        if not info.ok:
            raise PluginError(
                f"plugin {name!r} from {info.distribution} {info.version} cannot be used: {info.error}"
            )
        return info
    raise PluginError(
        f"no plugin named {name!r} in entry-point group {group!r}; available: {available(group)}. "
        f"Install the distribution that provides it, or fix the name in params.yaml "
        f"({_CONFIGURED_IN.get(group, group)})"
    )


def capabilities(info: PluginInfo) -> list[str]:
    """What a plugin does, in words: its task, and the optional inputs and counterparts it declares."""
    cls = info.cls
    if cls is None:
        return []
    out = {
        ALGORITHMS_GROUP: ["ranks items"],
        FUSERS_GROUP: ["fuses rankings"],
        RATERS_GROUP: ["predicts ratings"],
        RATING_FUSERS_GROUP: ["fuses ratings"],
    }.get(info.group, [])
    if getattr(cls, "user_attributes", None) or getattr(cls, "reads_user_features", False):
        out.append("reads user attributes")
    counterpart = getattr(cls, "rating_counterpart", None)
    if counterpart:
        out.append(f"predicts ratings as rater {counterpart!r}")
    return out


def get_algorithm(name: str) -> type[Algorithm]:
    cls = plugin_info(name).cls
    assert cls is not None
    return cast("type[Algorithm]", cls)


def get_fuser(name: str) -> type[Fuser]:
    cls = plugin_info(name, FUSERS_GROUP).cls
    assert cls is not None
    return cast("type[Fuser]", cls)


def get_rater(name: str) -> type[RatingAlgorithm]:
    """The rating-prediction plugin registered as ``name`` in ``fuserec.raters``."""
    cls = plugin_info(name, RATERS_GROUP).cls
    assert cls is not None
    return cast("type[RatingAlgorithm]", cls)


def get_rating_fuser(name: str) -> type[RatingFuser]:
    """The rating fuser registered as ``name`` in ``fuserec.rating_fusers``."""
    cls = plugin_info(name, RATING_FUSERS_GROUP).cls
    assert cls is not None
    return cast("type[RatingFuser]", cls)


def resolve_names(requested: list[str] | str, group: str = ALGORITHMS_GROUP) -> list[str]:
    """``"all"`` -> every working plugin; a list is checked name by name (unknown names raise)."""
    if requested == "all":
        return available(group)
    names = [requested] if isinstance(requested, str) else list(requested)
    for name in names:
        plugin_info(name, group)
    return names
