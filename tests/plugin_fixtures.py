"""Fake third-party distributions, laid out on disk exactly as pip installs them (dist-info + module)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fuserec.registry import discover

BROKEN_DIST = "fuserec-broken-plugin"
BROKEN_VERSION = "0.3.1"


def install_broken_plugins(site: Path) -> Path:
    """One plugin whose import fails and one built for API 2.x, in one distribution under ``site``."""
    info = site / f"fuserec_broken_plugin-{BROKEN_VERSION}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {BROKEN_DIST}\nVersion: {BROKEN_VERSION}\n")
    (info / "entry_points.txt").write_text(
        "[fuserec.algorithms]\nbroken = fuserec_broken_plugin:Broken\nfuture = fuserec_future_plugin:Future\n"
    )
    (site / "fuserec_broken_plugin.py").write_text("import a_module_that_does_not_exist  # noqa\n")
    (site / "fuserec_future_plugin.py").write_text(
        "from fuserec.plugins.popularity import Popularity\n\n\n"
        "class Future(Popularity):\n    api_version = '2.0'\n"
    )
    return site


@contextmanager
def on_path(site: Path) -> Iterator[None]:
    sys.path.insert(0, str(site))
    discover.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        for mod in ("fuserec_broken_plugin", "fuserec_future_plugin"):
            sys.modules.pop(mod, None)
        discover.cache_clear()
