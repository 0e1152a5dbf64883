"""The docs' code runs: every ```python block is executed and every ```toml block parsed, so docs cannot rot.

Blocks of one file run in order in one namespace (a worked example may span blocks). A block that cannot run
on its own is preceded by ``<!-- not-tested: why -->``; keep those rare.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO

DOCS = sorted([*REPO.glob("docs/**/*.md"), REPO / "README.md", *REPO.glob("examples/*/README.md")])
FENCE = re.compile(
    r"^(?:<!--\s*not-tested:(?P<why>[^>]*)-->\s*\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    not_tested: str | None


def blocks(doc: Path) -> list[Block]:
    text = doc.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        found.append(Block(line, match["lang"], match["body"], match["why"]))
    return found


def _id(doc: Path) -> str:
    return str(doc.relative_to(REPO))


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_python_blocks_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace: dict[str, object] = {"__name__": f"docs_{doc.stem.replace('-', '_')}"}
    for block in blocks(doc):
        if block.lang == "python" and block.not_tested is None:
            code = compile(block.body, f"{_id(doc)}, block at line {block.line}", "exec")
            exec(code, namespace)


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_toml_blocks_parse_and_skips_say_why(doc: Path) -> None:
    for block in blocks(doc):
        if block.lang == "toml":
            tomllib.loads(block.body)
        if block.not_tested is not None:
            assert block.not_tested.strip(), f"{_id(doc)}:{block.line}: say why the block is not tested"


def test_the_plugin_guide_has_runnable_code() -> None:
    # Guards the extraction itself: a regex that finds nothing would make the tests above pass vacuously.
    python = [b for b in blocks(REPO / "docs" / "how-to" / "write-a-plugin.md") if b.lang == "python"]
    assert len(python) >= 4 and all(b.not_tested is None for b in python)
    assert any("class NextItem(Algorithm)" in b.body for b in python)
