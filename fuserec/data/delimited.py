"""Read delimited text without trusting it: every field stays a string, bad lines are kept aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fuserec.data.raw import LINE_COL, MALFORMED_COLUMNS, SOURCE_COL


def read_delimited(
    path: str | Path,
    sep: str,
    columns: list[str],
    table: str,
    *,
    encoding: str = "utf-8",
    header: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split each line of ``path`` on ``sep`` into ``columns``; no quoting, no type coercion.

    Returns (rows, malformed): rows carry ``_source`` and ``_line`` (1-based line number in the file);
    lines whose field count differs from ``len(columns)`` go to ``malformed`` with rule
    ``malformed_line`` so validation can report and quarantine them. Blank lines are ignored.
    With ``header=True`` the first line must name ``columns`` (in any order: columns are taken by name).
    Raises FileNotFoundError naming the file when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{table} file not found: {path}. Check data.path in params.yaml.")
    text = path.read_bytes().decode(encoding, errors="replace")
    lines = pd.Series(split_lines(text), dtype=object)
    numbers = np.arange(1, len(lines) + 1)
    order = columns
    if header:
        if lines.empty:
            return _empty(columns), _empty_malformed()
        names = [c.strip() for c in str(lines.iloc[0]).split(sep)]
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(
                f"{path}: header {names} lacks column(s) {missing} (rule: missing_column); "
                f"map the file's columns to these names in params.yaml under data.columns"
            )
        order = names
        lines, numbers = lines.iloc[1:], numbers[1:]
    keep = lines.str.strip() != ""
    lines, numbers = lines[keep.to_numpy()], numbers[keep.to_numpy()]
    parts = lines.str.split(sep, regex=False)
    counts = parts.str.len().to_numpy() if len(parts) else np.zeros(0, dtype=int)
    good = counts == len(order)
    bad = pd.DataFrame(
        {
            "table": table,
            SOURCE_COL: str(path),
            LINE_COL: numbers[~good],
            "raw": lines[~good].to_numpy(),
            "rule": f"malformed_line: expected {len(order)} fields separated by {sep!r}",
        },
        columns=list(MALFORMED_COLUMNS),
    )
    if good.any():
        frame = pd.DataFrame(parts[good].tolist(), columns=order, dtype=object)[columns]
    else:
        frame = _empty(columns)
    frame[SOURCE_COL] = str(path)
    frame[LINE_COL] = numbers[good]
    return frame.reset_index(drop=True), bad.reset_index(drop=True)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in [*columns, SOURCE_COL, LINE_COL]})


def _empty_malformed() -> pd.DataFrame:
    return pd.DataFrame(columns=list(MALFORMED_COLUMNS))


def split_lines(text: str) -> list[str]:
    """Lines ended by ``\n`` (a trailing ``\r`` dropped), and nothing else.

    ``str.splitlines`` also breaks at U+0085, U+2028, form feeds and more, which occur inside titles: one
    row would become two malformed ones and every later line number would shift.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]
