r"""Validate: raw source tables -> typed valid rows, quarantined rejects and a report.

Great Expectations (1.x) evaluates every row-level rule: one suite per table on a *check frame* that
holds the stripped text of each raw value (None when blank) plus derived helper columns where GX has
no direct row-level form (the number a rating parses to, the first line a duplicate repeats, whether
an id is in the items table). Each table is validated in two passes:

1. ``<table>.rows``: not-null, id / number / integer formats and ranges, on every row;
2. ``<table>.relations``: duplicates (among rows that passed pass 1, so a bad first copy never costs
   a good later one) and, for interactions, ids unknown to the items / users tables (among rows whose
   id is valid; an items / users row that was rejected does not make its id known).

A row that fails any rule goes to ``rejects/<table>.parquet`` with its raw values and every rule it
failed; lines the loader could not split (``RawSource.malformed``) go there too. Nothing is dropped
silently: rows in = rows kept + rows rejected, per table, checked at run time (RuntimeError, also under
``python -O``). The report (``validation_report.json``) gives, per table and rule, the GX expectation,
count and sample lines.

Numbers are ASCII: every id / number / integer pattern uses ``[0-9]``, never ``\d`` (which also matches
"١٢٣" or "１２３"), and text is only converted to a number after it matched such a pattern (``int()``,
``float()`` and pandas' ``astype`` would turn "١٢٣" into 123 and merge it with user 123).

Each delimited text file a table was read from is scanned once more, as bytes split on ``\n`` only
(:func:`scan_text_file`): the report's ``text_files`` entry of the table gives per file the byte
sequences that are not UTF-8 and were replaced by U+FFFD when read (``encoding_errors_replaced`` and the
first lines, never the values), the characters other than ``\n`` / ``\r`` that ``str.splitlines``
would break a line on, and whether the loader's line numbers fit in the file.

Privacy (:class:`~fuserec.privacy.plan.PrivacyPlan`, from ``privacy:`` in params.yaml): after every rule
ran on the raw ids, user ids are replaced by pseudonyms (:mod:`fuserec.privacy.pseudonyms`) in the
validated tables, the rejects and the report, so nothing this stage writes holds a raw user id: a rejected
row shows its pseudonym, or ``<invalid id, N chars>`` when the id is not valid, and a malformed line of
the interactions / users tables only its length. The users table keeps only the attributes a configured
plugin or the cold-start rule reads, ages as groups (:mod:`fuserec.privacy.minimise`). The report's
``privacy`` entry says what was done and the key's fingerprint, never the key.

Missing required columns and empty files stop the stage at once (there is nothing to validate); a
table whose rejected share exceeds ``validate.max_reject_share`` raises :class:`ValidationError`
after rejects and report have been written.

``import great_expectations`` takes seconds, so it happens inside :func:`_gx`, once per process.
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuserec.config import Params, ValidateConfig
from fuserec.data.raw import LINE_COL, REQUIRED_COLUMNS, SOURCE_COL, TABLES, RawSource
from fuserec.layout import Layout
from fuserec.manifest import write_json
from fuserec.privacy.minimise import AGE, age_groups, minimise_users
from fuserec.privacy.plan import PrivacyPlan
from fuserec.privacy.pseudonyms import Pseudonymiser

# Ids are non-negative integers that fit int64 (at most 18 digits). ASCII digits only: ``\d`` matches
# any Unicode decimal digit ("١٢٣", "１２３"), which int() / float() / pandas then read as 123.
ID_BODY = r"[0-9]{1,18}"
NUMBER_BODY = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
INTEGER_BODY = r"[+-]?[0-9]{1,18}"
ID_REGEX = f"^{ID_BODY}$"
NUMBER_REGEX = f"^{NUMBER_BODY}$"
INTEGER_REGEX = f"^{INTEGER_BODY}$"
TEXT_COLUMNS = ("title", "genres", "tags", "text")
RAW_LINE = "raw"  # rejects column with the text of a malformed line
RULE = "rule"
REJECT_EXTRA = (RAW_LINE, SOURCE_COL, LINE_COL, RULE)
# Rules checked by the loader or before GX runs (no expectation).
MALFORMED_LINE = "malformed_line"
MISSING_COLUMN = "missing_column"
EMPTY_FILE = "empty_file"
USER_ID = "user_id"
PSEUDONYMISED_TABLES = ("interactions", "users")  # the tables whose rows name a user
PARAMS_KEY = "validate.max_reject_share"

# GX result format: COMPLETE gives the index of every failing row; the lists of values are not needed.
RESULT_FORMAT = {
    "result_format": "COMPLETE",
    "partial_unexpected_count": 0,
    "include_unexpected_rows": False,
    "return_unique_unexpected": False,
}
_EXPECTATIONS = {
    "expect_column_values_to_not_be_null": "ExpectColumnValuesToNotBeNull",
    "expect_column_values_to_be_null": "ExpectColumnValuesToBeNull",
    "expect_column_values_to_match_regex": "ExpectColumnValuesToMatchRegex",
    "expect_column_values_to_be_between": "ExpectColumnValuesToBeBetween",
    "expect_column_values_to_be_in_set": "ExpectColumnValuesToBeInSet",
}


class ValidationError(ValueError):
    """Input data breaks the validation rules badly enough to stop the pipeline."""


@dataclass(frozen=True)
class Rule:
    """One validation rule = one GX expectation on one column of a table's check frame."""

    name: str
    expectation: str  # GX expectation type
    column: str  # column of the check frame the expectation runs on (a source column or a helper)
    columns: tuple[str, ...]  # source columns the rule is about
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def build(self, gx: Any) -> Any:
        cls = getattr(gx.expectations, _EXPECTATIONS[self.expectation])
        return cls(column=self.column, meta={"rule": self.name}, **self.kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self.name,
            "expectation": self.expectation,
            "column": self.column,
            "columns": list(self.columns),
            "kwargs": self.kwargs,
            "description": self.description,
        }


# --------------------------------------------------------------------------------------------------
# Great Expectations


_GX: dict[str, Any] = {}


def _gx() -> dict[str, Any]:
    """The GX module and a whole-dataframe batch definition of an ephemeral context, made once."""
    if not _GX:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        asset = context.data_sources.add_pandas("fuserec").add_dataframe_asset("table")
        _GX.update(gx=gx, context=context, batch=asset.add_batch_definition_whole_dataframe("whole"))
    return _GX


def run_suite(name: str, frame: pd.DataFrame, rules: list[Rule]) -> dict[str, np.ndarray]:
    """Validate ``frame`` (RangeIndex) against one suite of ``rules``: rule -> failing row positions.

    Raises RuntimeError when GX could not evaluate a rule (never treated as a pass).
    """
    if not rules:
        return {}
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0 or frame.index.step != 1:
        raise ValueError("run_suite needs a frame with a default RangeIndex (row positions)")
    state = _gx()
    gx = state["gx"]
    suite = gx.ExpectationSuite(name=name)
    for rule in rules:
        suite.add_expectation(rule.build(gx))
    batch = state["batch"].get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format=RESULT_FORMAT)
    failed: dict[str, np.ndarray] = {}
    for res in result.results:
        rule_name = res.expectation_config.meta["rule"]
        problem = _raised(res.exception_info)
        if problem is not None:
            raise RuntimeError(f"Great Expectations could not evaluate rule {rule_name} in {name}: {problem}")
        index = res.result.get("unexpected_index_list") or []
        count = int(res.result.get("unexpected_count") or 0)
        if len(index) != count:
            raise RuntimeError(f"rule {rule_name} in {name}: GX counted {count} rows but listed {len(index)}")
        failed[rule_name] = np.sort(np.asarray(index, dtype=np.int64))
    missing = [r.name for r in rules if r.name not in failed]
    if missing:
        raise RuntimeError(f"Great Expectations returned no result for rule(s) {missing} in {name}")
    return failed


def _raised(info: Any) -> str | None:
    """The exception message in a GX ``exception_info`` (flat, or keyed by metric), if one was raised."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or info)
    for value in info.values():
        if isinstance(value, dict) and (found := _raised(value)):
            return found
    return None


# --------------------------------------------------------------------------------------------------
# Check frames and rules


def text_form(values: pd.Series) -> pd.Series:
    """Each value as stripped text (string dtype), missing when null or blank.

    Integral floats print without ``.0`` (a Parquet id column with a null is float), so ``3.0`` -> ``"3"``.
    """
    if pd.api.types.is_float_dtype(values.dtype):
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
        out = np.full(len(arr), None, dtype=object)
        finite = np.isfinite(arr)
        integral = finite & (np.floor(arr) == arr) & (np.abs(arr) < 2**62)
        out[integral] = arr[integral].astype(np.int64).astype(str)
        other = ~np.isnan(arr) & ~integral
        out[other] = arr[other].astype(str)
        return pd.Series(out, index=values.index, dtype="str")
    if pd.api.types.is_bool_dtype(values.dtype) or not (
        pd.api.types.is_string_dtype(values.dtype) or pd.api.types.is_object_dtype(values.dtype)
    ):
        values = values.astype(object)
    text = values.astype("str").str.strip()
    return text.mask(text == "")


def raw_strings(values: pd.Series) -> pd.Series:
    """Original values as strings (None when null), for rejects and samples."""
    obj = values.astype(object).to_numpy()
    keep = ~pd.isna(obj)
    out = np.full(len(obj), None, dtype=object)
    out[keep] = [v if isinstance(v, str) else str(v) for v in obj[keep]]
    return pd.Series(out, index=values.index, dtype=object)


def _matches(text: pd.Series, body: str) -> np.ndarray:
    """Per value: does the whole text match ``body`` (False when missing)."""
    return text.str.fullmatch(body).fillna(False).to_numpy(dtype=bool)


def _number(text: pd.Series) -> pd.Series:
    """Float value of each text, NaN unless it is a number written in ASCII (``NUMBER_BODY``).

    Only matching texts are converted: "inf"/"nan" words are not numbers, and neither are "٤" or "４"
    (which ``float()`` and pandas would read as 4).
    """
    numeric = _matches(text, NUMBER_BODY)
    num = np.full(len(text), np.nan)
    if numeric.any():
        num[numeric] = text[numeric].astype(np.float64).to_numpy()
    return pd.Series(num, index=text.index, dtype=np.float64)


def _ascii_int64(text: pd.Series, what: str) -> np.ndarray:
    """int64 of texts that passed an id / integer rule; RuntimeError for any that is not ASCII digits.

    A guard, not a rule: the GX regex rules already rejected such rows, but ``astype("int64")`` (like
    ``int()``) would turn "١٢٣" into 123, so nothing but ``[+-]?[0-9]{1,18}`` is ever converted.
    """
    good = _matches(text, INTEGER_BODY)
    if not good.all():
        raise RuntimeError(
            f"{what}: {int((~good).sum())} value(s) passed the integer rules but are not ASCII integers "
            f"(GX and the ASCII check disagree); refusing to convert them"
        )
    return text.astype("int64").to_numpy(dtype=np.int64)


def _id_rules(column: str) -> list[Rule]:
    return [
        Rule(
            f"{column}_not_null",
            "expect_column_values_to_not_be_null",
            column,
            (column,),
            description=f"{column} must not be empty",
        ),
        Rule(
            f"{column}_non_negative_integer",
            "expect_column_values_to_match_regex",
            column,
            (column,),
            {"regex": ID_REGEX},
            f"{column} must be a non-negative integer (ASCII digits 0-9 only, at most 18)",
        ),
    ]


def row_rules(table: str, columns: Iterable[str], cfg: ValidateConfig) -> list[Rule]:
    """Pass-1 rules of ``table`` given the canonical columns the source has."""
    columns = set(columns)
    rules: list[Rule] = []
    for column in REQUIRED_COLUMNS[table]:
        rules += _id_rules(column)
    if table != "interactions":
        return rules
    if "rating" in columns:
        rules += [
            Rule("rating_not_null", "expect_column_values_to_not_be_null", "rating", ("rating",),
                 description="rating must not be empty (the source has a rating column)"),
            Rule("rating_numeric", "expect_column_values_to_match_regex", "rating", ("rating",),
                 {"regex": NUMBER_REGEX}, "rating must be a number (ASCII digits 0-9)"),
            Rule("rating_in_range", "expect_column_values_to_be_between", "rating__number", ("rating",),
                 {"min_value": cfg.rating_min, "max_value": cfg.rating_max},
                 f"rating must be within [{cfg.rating_min}, {cfg.rating_max}] (validate.rating_min/max)"),
        ]  # fmt: skip
    if "timestamp" in columns:
        rules += [
            Rule("timestamp_not_null", "expect_column_values_to_not_be_null", "timestamp", ("timestamp",),
                 description="timestamp must not be empty (the source has a timestamp column)"),
            Rule("timestamp_integer", "expect_column_values_to_match_regex", "timestamp", ("timestamp",),
                 {"regex": INTEGER_REGEX}, "timestamp must be an integer (unix seconds, ASCII digits 0-9)"),
            Rule("timestamp_in_range", "expect_column_values_to_be_between", "timestamp__number",
                 ("timestamp",), {"min_value": cfg.timestamp_min, "max_value": cfg.timestamp_max},
                 f"timestamp must be within [{cfg.timestamp_min}, {cfg.timestamp_max}] "
                 "(validate.timestamp_min/max)"),
        ]  # fmt: skip
    return rules


def check_frame(table: str, raw: pd.DataFrame) -> pd.DataFrame:
    """Text of the columns pass 1 checks, plus numeric helpers for range rules."""
    frame = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    for column in REQUIRED_COLUMNS[table]:
        frame[column] = text_form(raw[column])
    if table == "interactions":
        for column in ("rating", "timestamp"):
            if column in raw:
                text = text_form(raw[column])
                frame[column] = text
                frame[f"{column}__number"] = _number(text)
    return frame


def _duplicate_rule(name: str, key: tuple[str, ...]) -> Rule:
    return Rule(
        name,
        "expect_column_values_to_be_null",
        "__duplicate_of_line",
        key,
        description=f"repeats the {', '.join(key)} of an earlier valid row (the first one is kept)",
    )


def _first_line_of_duplicates(keys: pd.DataFrame, lines: np.ndarray) -> np.ndarray:
    """Per row of ``keys``: the line of the first row with the same key, NaN for a first occurrence."""
    out = np.full(len(keys), np.nan)
    if len(keys) == 0:
        return out
    repeat = keys.duplicated(keep="first").to_numpy()
    if repeat.any():
        first = pd.Series(lines, index=keys.index).groupby([keys[c] for c in keys.columns]).transform("first")
        out[repeat] = first.to_numpy(dtype=np.float64)[repeat]
    return out


# --------------------------------------------------------------------------------------------------
# One table


@dataclass
class TableResult:
    name: str
    file: str | None
    raw: pd.DataFrame  # canonical raw columns + _source + _line (RangeIndex)
    rules: list[Rule]
    failed: dict[str, np.ndarray]  # rule -> positions in raw
    helpers: dict[str, np.ndarray]  # extra per-row values for samples (e.g. duplicate_of_line)
    malformed: pd.DataFrame
    ids: dict[str, np.ndarray]  # id column -> int64 per row (valid where id_ok)
    id_ok: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    validated: pd.DataFrame | None = None
    derived_from: str | None = None
    pseudonyms: np.ndarray | None = None  # per row, the user id's pseudonym (valid where id_ok)

    @property
    def rejected(self) -> np.ndarray:
        mask = np.zeros(len(self.raw), dtype=bool)
        for positions in self.failed.values():
            mask[positions] = True
        return mask


def _prepare(table: str, raw: pd.DataFrame, file: str | None, malformed: pd.DataFrame) -> pd.DataFrame:
    """Table-level checks (missing required columns, empty file) and a RangeIndex'ed copy."""
    missing = [c for c in REQUIRED_COLUMNS[table] if c not in raw.columns]
    found = [c for c in raw.columns if c not in (SOURCE_COL, LINE_COL)]
    if missing:
        raise ValidationError(
            f"{file}: {table} lacks required column(s) {missing} (rule: {MISSING_COLUMN}); columns found: "
            f"{found}. Map the file's columns to these names in params.yaml (data.columns for "
            f"interactions, data.files.item_columns / user_columns for items / users)."
        )
    if len(raw) == 0 and len(malformed) == 0:
        raise ValidationError(
            f"{file}: the {table} file has no data rows (rule: {EMPTY_FILE}); "
            f"check the file or data.path / data.files in params.yaml"
        )
    raw = raw.reset_index(drop=True)
    if SOURCE_COL not in raw:
        raw[SOURCE_COL] = file or "unknown"
    if LINE_COL not in raw:
        raw[LINE_COL] = np.arange(1, len(raw) + 1, dtype=np.int64)
    return raw


def _check_rows(
    table: str, raw: pd.DataFrame, file: str | None, malformed: pd.DataFrame, cfg: ValidateConfig
) -> tuple[TableResult, pd.DataFrame]:
    """Pass 1 on one table; returns the result so far and its check frame."""
    frame = check_frame(table, raw)
    rules = row_rules(table, raw.columns, cfg)
    failed = run_suite(f"{table}.rows", frame, rules)
    ids: dict[str, np.ndarray] = {}
    id_ok: dict[str, np.ndarray] = {}
    for column in REQUIRED_COLUMNS[table]:
        ok = np.ones(len(raw), dtype=bool)
        ok[failed[f"{column}_not_null"]] = False
        ok[failed[f"{column}_non_negative_integer"]] = False
        values = np.zeros(len(raw), dtype=np.int64)
        values[ok] = _ascii_int64(frame[column][ok], f"{file}: {table}.{column}")
        ids[column], id_ok[column] = values, ok
    result = TableResult(table, file, raw, rules, failed, {}, malformed, ids, id_ok)
    return result, frame


def _check_relations(
    result: TableResult,
    frame: pd.DataFrame,
    known: dict[str, np.ndarray],
) -> None:
    """Pass 2: duplicates among rows that passed pass 1; interactions' ids unknown to items / users."""
    table, raw = result.name, result.raw
    ok = ~result.rejected
    rel = pd.DataFrame(index=pd.RangeIndex(len(raw)))
    rules: list[Rule] = []
    key: tuple[str, ...]
    if table == "interactions":
        key_cols = {"user_id": result.ids["user_id"], "item_id": result.ids["item_id"]}
        if "timestamp" in raw:
            ts = np.zeros(len(raw), dtype=np.int64)
            ts[ok] = _ascii_int64(frame["timestamp"][ok], f"{result.file}: {table}.timestamp")
            key_cols["timestamp"] = ts
        else:
            key_cols["timestamp"] = raw[LINE_COL].to_numpy(np.int64)
        name, key = "duplicate_row", ("user_id", "item_id", "timestamp")
    else:
        id_col = REQUIRED_COLUMNS[table][0]
        key_cols = {id_col: result.ids[id_col]}
        name, key = f"duplicate_{id_col}", (id_col,)
    keys = pd.DataFrame({c: v[ok] for c, v in key_cols.items()})
    first = np.full(len(raw), np.nan)
    first[ok] = _first_line_of_duplicates(keys, raw[LINE_COL].to_numpy(np.int64)[ok])
    rel["__duplicate_of_line"] = first
    rules.append(_duplicate_rule(name, key))
    result.helpers["duplicate_of_line"] = first
    for column, other in (("item_id", "items"), ("user_id", "users")):
        if table != "interactions" or other not in known:
            continue
        member = np.full(len(raw), None, dtype=object)
        valid = result.id_ok[column]
        member[valid] = np.isin(result.ids[column][valid], known[other])
        helper = f"{column}__in_{other}"
        rel[helper] = member
        rules.append(
            Rule(
                f"unknown_{other[:-1]}",
                "expect_column_values_to_be_in_set",
                helper,
                (column,),
                {"value_set": [True]},
                f"{column} must be an id of a valid row of the {other} table",
            )
        )
    result.failed.update(run_suite(f"{table}.relations", rel, rules))
    result.rules += rules


# --------------------------------------------------------------------------------------------------
# Typed outputs


def _strings_or_empty(values: pd.Series) -> pd.Series:
    return raw_strings(values).fillna("").astype("str")


def _typed_interactions(result: TableResult, frame: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    raw = result.raw
    out = pd.DataFrame(
        {
            "user_id": result.ids["user_id"][keep],
            "item_id": result.ids["item_id"][keep],
        }
    )
    if "rating" in raw:
        out["rating"] = frame["rating__number"].to_numpy(np.float64)[keep]
    else:
        out["rating"] = np.full(int(keep.sum()), np.nan)
        result.notes.append("no rating column: rating is NaN for every row (implicit feedback)")
    if "timestamp" in raw:
        out["timestamp"] = _ascii_int64(frame["timestamp"][keep], f"{result.file}: interactions.timestamp")
    else:
        out["timestamp"] = raw[LINE_COL].to_numpy(np.int64)[keep]
        result.notes.append("no timestamp column: timestamp is the row's line number (file order)")
    return out


def _typed_items(result: TableResult, keep: np.ndarray) -> pd.DataFrame:
    raw = result.raw[keep].reset_index(drop=True)
    out = pd.DataFrame({"item_id": result.ids["item_id"][keep]})
    for column in TEXT_COLUMNS:
        out[column] = (
            _strings_or_empty(raw[column]) if column in raw else pd.Series([""] * len(raw), dtype="str")
        )
    if "year" in raw:
        text = text_form(raw["year"])
        num = _number(text)  # ASCII digits only: "٢٠٠١" is not a year (it becomes null, noted)
        integral = num.notna() & (num == np.floor(num)) & (num.abs() < 10_000)
        unparsed = text.notna() & ~integral
        if unparsed.any():
            lines = raw.loc[unparsed, LINE_COL].head(5).tolist()
            result.notes.append(
                f"year: {int(unparsed.sum())} value(s) that are not a year were set to null (lines {lines})"
            )
        out["year"] = num.where(integral).astype("Int64")
    else:
        out["year"] = pd.array([pd.NA] * len(raw), dtype="Int64")
    for column in raw.columns:
        if column not in out and column not in (SOURCE_COL, LINE_COL):
            out[column] = _strings_or_empty(raw[column])
    return out


def _typed_users(result: TableResult, keep: np.ndarray) -> pd.DataFrame:
    raw = result.raw[keep].reset_index(drop=True)
    out = pd.DataFrame({"user_id": result.ids["user_id"][keep]})
    for column in raw.columns:
        if column in out or column in (SOURCE_COL, LINE_COL):
            continue
        if column == "age":
            text = text_form(raw[column])
            num = _number(text)  # ASCII digits only: "٤٥" is not a number (age kept as text, noted)
            bad = text.notna() & num.isna()
            if not bad.any():
                whole = num.dropna()
                out[column] = num.astype("Int64") if (whole == np.floor(whole)).all() else num
                continue
            lines = raw.loc[bad, LINE_COL].head(5).tolist()  # lines, not values: ages are personal data
            result.notes.append(
                f"age kept as text: {int(bad.sum())} value(s) are not numbers (lines {lines})"
            )
        out[column] = _strings_or_empty(raw[column])
    return out


def _derived(table: str, ids: np.ndarray) -> pd.DataFrame:
    ids = np.unique(ids).astype(np.int64)
    if table == "users":
        return pd.DataFrame({"user_id": ids})
    out = pd.DataFrame({"item_id": ids})
    for column in TEXT_COLUMNS:
        out[column] = pd.Series([""] * len(ids), dtype="str")
    out["year"] = pd.array([pd.NA] * len(ids), dtype="Int64")
    return out


# --------------------------------------------------------------------------------------------------
# Pseudonyms


def _pseudonymise(results: dict[str, TableResult], pseudonymiser: Pseudonymiser) -> None:
    """Give every valid user id of the checked tables its pseudonym, and the validated tables only those.

    One mapping over all tables at once, so a hash clash between any two users is caught.
    """
    tables = [r for r in results.values() if USER_ID in r.ids]
    valid = [r.ids[USER_ID][r.id_ok[USER_ID]] for r in tables]
    mapped = pseudonymiser.users(np.concatenate(valid)) if valid else np.zeros(0, dtype=np.int64)
    start = 0
    for result, ids in zip(tables, valid, strict=True):
        result.pseudonyms = np.zeros(len(result.raw), dtype=np.int64)
        result.pseudonyms[result.id_ok[USER_ID]] = mapped[start : start + len(ids)]
        start += len(ids)
        if result.validated is not None:
            result.validated[USER_ID] = result.pseudonyms[~result.rejected]


def _shown_columns(result: TableResult, plan: PrivacyPlan) -> list[str]:
    """The source columns rejects and samples show: for users, only the id and the attributes kept."""
    columns = [c for c in result.raw.columns if c not in (SOURCE_COL, LINE_COL)]
    if result.name == "users" and plan.user_columns is not None:
        columns = [c for c in columns if c == USER_ID or c in plan.user_columns]
    return columns


def _shown(result: TableResult, column: str, positions: np.ndarray, plan: PrivacyPlan) -> np.ndarray:
    """Values of ``column`` at row ``positions`` as rejects and samples show them: the raw text, but a
    user id as its pseudonym (``<invalid id, N chars>`` when it is no valid id) and an age as its group
    when the plan says so."""
    raw = raw_strings(result.raw[column].iloc[positions]).to_numpy()
    if column == USER_ID and result.pseudonyms is not None:
        out = np.array([None if v is None else f"<invalid id, {len(v)} chars>" for v in raw], dtype=object)
        ok = result.id_ok[USER_ID][positions]
        out[ok] = result.pseudonyms[positions][ok].astype(str)
        return out
    if column == AGE and result.name == "users" and plan.age_buckets:
        return age_groups(pd.Series(raw, dtype=object), plan.age_buckets)[0].to_numpy()
    return raw


def _shown_lines(result: TableResult, lines: pd.Series) -> list[str]:
    """Malformed lines as rejects and samples show them: only their length when they may hold a raw id."""
    text = lines.astype(str).tolist()
    if result.pseudonyms is None or result.name not in PSEUDONYMISED_TABLES:
        return text
    return [f"<malformed line, {len(t)} chars>" for t in text]


# --------------------------------------------------------------------------------------------------
# Rejects and report


def _rejects(result: TableResult, columns: list[str], plan: PrivacyPlan) -> pd.DataFrame:
    raw, rejected = result.raw, result.rejected
    positions = np.flatnonzero(rejected)
    reasons = pd.Series("", index=positions, dtype=object)
    for rule in result.rules:
        hit = result.failed[rule.name]
        if len(hit):
            reasons[hit] = reasons[hit] + "; " + rule.name
    parts = {c: _shown(result, c, positions, plan) for c in columns}
    rows = pd.DataFrame(parts, index=range(len(positions)), dtype=object)
    rows[RAW_LINE] = None
    rows[SOURCE_COL] = raw[SOURCE_COL].iloc[positions].astype(str).to_numpy()
    rows[LINE_COL] = raw[LINE_COL].iloc[positions].to_numpy(np.int64)
    rows[RULE] = reasons.str.slice(2).to_numpy()
    bad = result.malformed
    if len(bad):
        lines = pd.DataFrame({c: [None] * len(bad) for c in columns}, dtype=object)
        lines[RAW_LINE] = np.asarray(_shown_lines(result, bad[RAW_LINE]), dtype=object)
        lines[SOURCE_COL] = bad[SOURCE_COL].astype(str).to_numpy()
        lines[LINE_COL] = bad[LINE_COL].to_numpy(np.int64)
        lines[RULE] = bad[RULE].astype(str).to_numpy()
        rows = pd.concat([rows, lines], ignore_index=True)
        rows = rows.sort_values([SOURCE_COL, LINE_COL], kind="stable").reset_index(drop=True)
    for column in [*columns, RAW_LINE, SOURCE_COL, RULE]:
        rows[column] = rows[column].astype(object)
    rows[LINE_COL] = rows[LINE_COL].astype(np.int64)
    return rows[[*columns, *REJECT_EXTRA]]


def _write_rejects(rows: pd.DataFrame, path: Path) -> None:
    """Every column a string (``_line`` int64), also when there are no rows, so the schema is stable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.int64() if c == LINE_COL else pa.string()) for c in rows.columns])
    pq.write_table(pa.Table.from_pandas(rows, schema=schema, preserve_index=False), path)


def _rule_report(
    result: TableResult, rule: Rule, value_columns: list[str], n: int, plan: PrivacyPlan
) -> dict[str, Any]:
    hit = result.failed[rule.name]
    shown = {c: _shown(result, c, hit[:n], plan) for c in value_columns}
    samples = []
    for j, pos in enumerate(hit[:n]):
        sample: dict[str, Any] = {
            "line": int(result.raw[LINE_COL].iat[pos]),
            "values": {c: shown[c][j] for c in value_columns},
        }
        if rule.column == "__duplicate_of_line":
            sample["duplicate_of_line"] = int(result.helpers["duplicate_of_line"][pos])
        samples.append(sample)
    return {**rule.describe(), "count": len(hit), "samples": samples}


def _malformed_report(result: TableResult, n: int) -> dict[str, Any] | None:
    bad = result.malformed
    if not len(bad):
        return None
    details = sorted({str(r) for r in bad[RULE]})
    return {
        "rule": MALFORMED_LINE,
        "expectation": None,
        "column": None,
        "columns": [],
        "kwargs": {},
        "description": "line could not be split into the expected fields (checked by the loader): "
        + " / ".join(d.split(":", 1)[1].strip() if ":" in d else d for d in details),
        "count": len(bad),
        "samples": [
            {"line": int(line), "source": str(source), "raw": text}
            for line, source, text in zip(
                bad[LINE_COL].head(n),
                bad[SOURCE_COL].head(n),
                _shown_lines(result, bad[RAW_LINE].head(n)),
                strict=True,
            )
        ],
    }


def check_reconciles(table: str, file: str | None, rows_in: int, kept: int, rejected: int) -> None:
    """Rows in = rows kept + rows rejected, or RuntimeError naming the file and the counts.

    An explicit check, not an ``assert``: ``python -O`` must not turn a lost row into a silent one.
    """
    if rows_in != kept + rejected:
        raise RuntimeError(
            f"{file or 'derived'}: {table} rows do not reconcile: {rows_in} rows in != {kept} kept + "
            f"{rejected} rejected ({kept + rejected}); a row was lost or counted twice (a bug, not bad data)"
        )


def _table_report(result: TableResult, kept: int, rejected: int, n: int, plan: PrivacyPlan) -> dict[str, Any]:
    rows_in = len(result.raw) + len(result.malformed)
    value_columns = [c for c in result.raw.columns if c not in (SOURCE_COL, LINE_COL)]
    shown = _shown_columns(result, plan)
    rules = [_rule_report(result, rule, shown, n, plan) for rule in result.rules]
    malformed = _malformed_report(result, n)
    if malformed:
        rules.insert(0, malformed)
    check_reconciles(result.name, result.file, rows_in, kept, rejected)
    return {
        "file": result.file,
        "derived_from": result.derived_from,
        "rows_in": rows_in,
        "rows_kept": kept,
        "rows_rejected": rejected,
        "reject_share": rejected / rows_in if rows_in else 0.0,
        "rows_written": len(result.validated) if result.validated is not None else 0,
        "columns": value_columns,
        "notes": result.notes,
        "rules": rules,
    }


# --------------------------------------------------------------------------------------------------
# Text files: replaced encoding errors, line breaks other than \n, line numbers

# Characters ``str.splitlines()`` breaks a line on besides \n and \r: a loader using it splits a title
# holding one of them into two malformed rows and shifts every later line number.
OTHER_LINE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_OTHER_BREAK_TEXT = re.compile(f"[{OTHER_LINE_BREAKS}]")
# The same in a single-byte (latin-1) reading of the bytes: U+0085 is the byte 0x85 there.
_OTHER_BREAK_LATIN1 = re.compile(rb"[\x0b\x0c\x1c\x1d\x1e\x85]")
_OTHER_BREAK_BYTES = (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x85")
_SCAN_CHUNK = 1 << 24  # bytes read at a time (whole lines: a chunk ends after a \n)
_COUNT_ERRORS = "fuserec.validate.count_replace"
_decode_state = threading.local()


def _count_replace(err: UnicodeError) -> tuple[str, int]:
    """Codec error handler: like ``errors="replace"`` (one U+FFFD per bad sequence), recording where."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _decode_state.starts.append(err.start)
    return "\ufffd", err.end


codecs.register_error(_COUNT_ERRORS, _count_replace)


def decode_counting(data: bytes, encoding: str = "utf-8") -> tuple[str, list[int]]:
    """``data.decode(encoding, errors="replace")`` plus the byte offset of every replaced sequence.

    Counts replacements only: a U+FFFD that the input itself holds (valid ``EF BF BD``) is no error.
    """
    _decode_state.starts = []
    try:
        text = data.decode(encoding, errors=_COUNT_ERRORS)
        starts: list[int] = _decode_state.starts
    finally:
        del _decode_state.starts
    return text, starts


@dataclass
class TextScan:
    """One text file read as bytes, lines split on \n only (\r\n is one break, a lone \r another)."""

    path: str
    physical_lines: int = 0  # lines by \n, \r\n and lone \r (what any line-numbering reader may count)
    invalid_utf8: int = 0  # byte sequences that are not UTF-8 (each one U+FFFD when decoded "replace")
    invalid_utf8_lines: list[int] = field(default_factory=list)  # first lines holding one
    breaks_utf8: int = 0  # characters in OTHER_LINE_BREAKS, the file decoded as UTF-8
    breaks_utf8_lines: list[int] = field(default_factory=list)
    breaks_latin1: int = 0  # the same, the file decoded as latin-1
    breaks_latin1_lines: list[int] = field(default_factory=list)


def scan_text_file(path: str | Path, n: int = 5) -> TextScan:
    """Count, by physical line (split on ``\n``), what a decode or line split could silently change.

    Reads the file in chunks of whole lines (a UTF-8 sequence never spans a \n byte), so memory stays
    bounded; keeps the first ``n`` line numbers of each finding and never any value.
    """
    scan = TextScan(str(path))
    first_line, rest, tail_cr = 1, b"", 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_SCAN_CHUNK)
            data = rest + block
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    rest = data
                    continue
                data, rest = data[:cut], data[cut:]
            if not data:
                break
            _scan_chunk(scan, data, first_line, n)
            newlines = data.count(b"\n")
            tail_cr += data.count(b"\r") - data.count(b"\r\n")
            first_line += newlines
            scan.physical_lines += newlines
            if not block:
                scan.physical_lines += 0 if data.endswith(b"\n") else 1
                break
    scan.physical_lines += tail_cr
    return scan


def _scan_chunk(scan: TextScan, data: bytes, first_line: int, n: int) -> None:
    def lines_of(offsets: Iterable[int], found: list[int]) -> None:
        line, last = first_line, 0
        for offset in offsets:
            if len(found) >= n:
                return
            line += data.count(b"\n", last, offset)
            last = offset
            if not found or found[-1] != line:
                found.append(line)

    latin1: list[int] = []
    if any(byte in data for byte in _OTHER_BREAK_BYTES):  # memchr-fast; the regex only when needed
        latin1 = [m.start() for m in _OTHER_BREAK_LATIN1.finditer(data)]
    scan.breaks_latin1 += len(latin1)
    lines_of(latin1, scan.breaks_latin1_lines)
    if data.isascii():  # both readings are the same text
        scan.breaks_utf8 += len(latin1)
        lines_of(latin1, scan.breaks_utf8_lines)
        return
    text, bad = decode_counting(data)
    scan.invalid_utf8 += len(bad)
    lines_of(bad, scan.invalid_utf8_lines)
    utf8 = [m.start() for m in _OTHER_BREAK_TEXT.finditer(text)]
    scan.breaks_utf8 += len(utf8)
    if utf8 and len(scan.breaks_utf8_lines) < n:
        line, last = first_line, 0
        for offset in utf8:  # character offsets: count \n in the text, not the bytes
            line += text.count("\n", last, offset)
            last = offset
            if len(scan.breaks_utf8_lines) >= n:
                break
            if not scan.breaks_utf8_lines or scan.breaks_utf8_lines[-1] != line:
                scan.breaks_utf8_lines.append(line)


def _is_text_file(path: str) -> bool:
    """A file on disk that is not Parquet (Parquet strings are typed, not decoded from lines)."""
    file = Path(path)
    if not file.is_file():
        return False  # e.g. "synthetic", or a frame built in memory
    with open(file, "rb") as fh:
        return fh.read(4) != b"PAR1"


def _holds_replacement(result: TableResult, path: str) -> bool:
    """Does any value read from ``path`` (or a column name) hold U+FFFD, i.e. was it decoded as UTF-8?"""
    if any("\ufffd" in str(c) for c in result.raw.columns):
        return True
    raw = result.raw[result.raw[SOURCE_COL].astype(str) == path]
    for column in raw.columns:
        if column in (SOURCE_COL, LINE_COL):
            continue
        values = raw_strings(raw[column]).dropna()
        if len(values) and values.str.contains("\ufffd", regex=False).any():
            return True
    bad = result.malformed
    if len(bad):
        lines = bad[RAW_LINE][bad[SOURCE_COL].astype(str) == path].astype(str)
        return bool(lines.str.contains("\ufffd", regex=False).any())
    return False


def _last_lines(result: TableResult) -> dict[str, int]:
    """The highest line number the loader gave a row or malformed line, per source file."""
    last: dict[str, int] = {}
    for frame in (result.raw, result.malformed):
        if len(frame):
            top = frame[LINE_COL].astype(np.int64).groupby(frame[SOURCE_COL].astype(str)).max()
            for path, line in top.items():
                last[str(path)] = max(last.get(str(path), 0), int(line))
    return last


def _text_files_report(result: TableResult, file: str | None, n: int) -> tuple[dict[str, Any], list[str]]:
    """``encoding_errors_replaced`` (all files) and ``text_files`` (one entry per file) and notes.

    A file that is not UTF-8 was either decoded as UTF-8 with replacement (the values read hold U+FFFD:
    those sequences are counted as replaced) or with a single-byte encoding (nothing replaced; line
    breaks are then looked for in the latin-1 reading, where the byte 0x85 is U+0085).
    """
    last_lines = _last_lines(result)
    paths = set(last_lines)
    if file and not result.derived_from:
        paths.add(file)
    entries: list[dict[str, Any]] = []
    notes: list[str] = []
    for path in sorted(p for p in paths if _is_text_file(p)):
        scan = scan_text_file(path, n)
        as_utf8 = scan.invalid_utf8 == 0 or _holds_replacement(result, path)
        replaced = scan.invalid_utf8 if as_utf8 else 0
        breaks = scan.breaks_utf8 if as_utf8 else scan.breaks_latin1
        break_lines = scan.breaks_utf8_lines if as_utf8 else scan.breaks_latin1_lines
        last_line = last_lines.get(path, 0)
        consistent = last_line <= scan.physical_lines
        entries.append(
            {
                "file": path,
                "encoding_errors_replaced": replaced,
                "encoding_error_lines": scan.invalid_utf8_lines if replaced else [],
                "invalid_utf8_sequences": scan.invalid_utf8,
                "other_line_breaks": breaks,
                "other_line_break_lines": break_lines,
                "physical_lines": scan.physical_lines,
                "last_line_read": last_line,
                "line_numbers_consistent": consistent,
            }
        )
        if replaced:
            notes.append(
                f"{path}: {replaced} byte sequence(s) are not valid UTF-8 and were replaced by U+FFFD "
                f"when read (encoding_errors_replaced; first lines {scan.invalid_utf8_lines})"
            )
        elif scan.invalid_utf8:
            notes.append(
                f"{path}: {scan.invalid_utf8} byte sequence(s) are not UTF-8 (first lines "
                f"{scan.invalid_utf8_lines}) but no value read holds U+FFFD: decoded with another "
                f"encoding (or those fields were not read), nothing replaced"
            )
        if breaks:
            notes.append(
                f"{path}: {breaks} character(s) that str.splitlines() treats as a line break (U+0085, "
                f"U+2028, \\x0b, ...) inside lines {break_lines}: they are not line ends here"
            )
        if not consistent:
            notes.append(
                f"{path}: the loader numbered lines up to {last_line} but the file has "
                f"{scan.physical_lines} lines: it split lines on something other than \\n, so the "
                f"line numbers of this file are shifted after line {break_lines[0] if break_lines else '?'}"
            )
    total = sum(int(e["encoding_errors_replaced"]) for e in entries)
    return {"encoding_errors_replaced": total, "text_files": entries}, notes


# --------------------------------------------------------------------------------------------------
# The stage


def validate_source(
    source: RawSource, cfg: ValidateConfig, out_dir: str | Path, privacy: PrivacyPlan | None = None
) -> dict[str, Any]:
    """Validate every table of ``source``; write validated tables, rejects and the report under ``out_dir``.

    Writes ``validated/{interactions,items,users}.parquet`` (typed valid rows in file order; items /
    users derived from the interactions' ids when the source has none), ``rejects/<table>.parquet``
    (always, even empty: raw values as strings, ``raw`` line text of malformed lines, ``_source``,
    ``_line`` and ``rule``) and ``validation_report.json``; returns the report.

    ``privacy`` pseudonymises user ids and minimises the users table (see the module's docstring); None
    keeps raw ids and every column.

    Raises ValidationError at once for a missing required column (rule ``missing_column``) or an empty
    table (``empty_file``), and after writing everything when a table's rejected share exceeds
    ``cfg.max_reject_share``.
    """
    out_dir = Path(out_dir)
    plan = privacy or PrivacyPlan()
    malformed = _split_malformed(source.malformed)
    if source.interactions is None:
        raise ValidationError(f"the source has no interactions table (files: {source.files})")
    raws: dict[str, pd.DataFrame] = {}
    erased: dict[str, int] = {}
    for table in TABLES:
        raw = source.table(table)
        if raw is not None:
            raw, erased[table] = plan.drop_erased(raw)  # erased people: before any rule, so no reject either
            raws[table] = _prepare(table, raw, source.files.get(table), malformed[table])
        elif len(malformed[table]):
            raise ValueError(
                f"{len(malformed[table])} malformed {table} line(s) but the source has no {table}"
            )

    results: dict[str, TableResult] = {}
    known: dict[str, np.ndarray] = {}
    for table in ("items", "users", "interactions"):
        if table not in raws:
            continue
        result, frame = _check_rows(table, raws[table], source.files.get(table), malformed[table], cfg)
        _check_relations(result, frame, known)
        keep = ~result.rejected
        if table != "interactions":
            id_col = REQUIRED_COLUMNS[table][0]
            known[table] = np.unique(result.ids[id_col][keep])
            result.validated = (_typed_items if table == "items" else _typed_users)(result, keep)
        else:
            result.validated = _typed_interactions(result, frame, keep)
        results[table] = result
    if plan.pseudonymiser is not None:  # every rule has run on the raw ids
        _pseudonymise(results, plan.pseudonymiser)
    privacy_record = plan.record()
    privacy_record["erased_rows"] = {t: n for t, n in erased.items() if n}  # counted, never silent
    users = results.get("users")
    if users is not None and users.validated is not None:
        attributes = plan.user_columns if plan.user_columns is not None else set(users.validated.columns)
        users.validated, minimised = minimise_users(users.validated, attributes, plan.age_buckets)
        privacy_record |= minimised

    interactions = results["interactions"].validated
    if interactions is None:  # every checked table got its validated frame above
        raise RuntimeError("validate: the interactions table has no validated frame (a bug)")
    for table, id_col in (("items", "item_id"), ("users", "user_id")):
        if table in results:
            continue
        derived = TableResult(
            table, None, pd.DataFrame(columns=[id_col, SOURCE_COL, LINE_COL]), [], {}, {},
            malformed[table], {}, {}, derived_from="interactions",
        )  # fmt: skip
        derived.validated = _derived(table, interactions[id_col].to_numpy())
        derived.notes.append(
            f"the source has no {table} table: {len(derived.validated)} {table} derived from the valid "
            f"interactions' {id_col}s (no attributes); unknown_{table[:-1]} is not checked"
        )
        results[table] = derived

    validated_dir, rejects_dir = out_dir / "validated", out_dir / "rejects"
    validated_dir.mkdir(parents=True, exist_ok=True)
    rejects_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "passed": True,
        "max_reject_share": cfg.max_reject_share,
        "engine": f"great_expectations {_gx()['gx'].__version__}",
        "outputs": {"validated": str(validated_dir), "rejects": str(rejects_dir)},
        "privacy": privacy_record,
        "tables": {},
    }
    for table in TABLES:
        result = results[table]
        columns = _shown_columns(result, plan)
        rejects = _rejects(result, columns, plan)
        _write_rejects(rejects, rejects_dir / f"{table}.parquet")
        validated = result.validated
        if validated is None:  # set above for every table, checked or derived
            raise RuntimeError(f"validate: the {table} table has no validated frame (a bug)")
        validated.to_parquet(validated_dir / f"{table}.parquet", index=False)
        kept = 0 if result.derived_from else len(validated)
        entry = _table_report(result, kept, len(rejects), cfg.sample_rows, plan)
        fields, notes = _text_files_report(result, source.files.get(table), cfg.sample_rows)
        entry.update(fields)
        entry["notes"] = [*entry["notes"], *notes]
        entry["passed"] = entry["reject_share"] <= cfg.max_reject_share
        report["passed"] = report["passed"] and entry["passed"]
        report["tables"][table] = entry
    report_path = write_json(out_dir / "validation_report.json", report)

    failing = [t for t in TABLES if not report["tables"][t]["passed"]]
    if failing:
        raise ValidationError(_threshold_message(report, failing, rejects_dir, report_path))
    return report


def _threshold_message(
    report: dict[str, Any], failing: list[str], rejects_dir: Path, report_path: Path
) -> str:
    limit = report["max_reject_share"]
    parts = []
    for table in failing:
        entry = report["tables"][table]
        counts = ", ".join(f"{r['rule']}: {r['count']}" for r in entry["rules"] if r["count"])
        parts.append(
            f"{entry['file']}: {entry['rows_rejected']} of {entry['rows_in']} {table} rows rejected "
            f"({entry['reject_share']:.1%} > {PARAMS_KEY} = {limit:.1%}); failing rules: {counts}"
        )
    return (
        "validation failed\n  "
        + "\n  ".join(parts)
        + f"\nRejected rows with their reasons are in {rejects_dir}/<table>.parquet and the report in "
        f"{report_path}. Fix the data, or raise {PARAMS_KEY} in params.yaml if this share is acceptable."
    )


def _split_malformed(malformed: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    columns = ["table", SOURCE_COL, LINE_COL, RAW_LINE, RULE]
    if malformed is None or len(malformed) == 0:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        return {t: empty for t in TABLES}
    unknown = sorted(set(malformed["table"]) - set(TABLES))
    if unknown:
        raise ValueError(f"malformed lines name unknown table(s) {unknown}; expected one of {TABLES}")
    return {t: malformed[malformed["table"] == t].reset_index(drop=True) for t in TABLES}


# --------------------------------------------------------------------------------------------------
# The Prefect task (``fuserec stage validate`` calls ``validate.fn``)


def validate(params: Params) -> str:
    """Load ``data.source`` and validate it into ``outputs/`` under the params' privacy plan; returns the
    report's path. The plan comes first, so a missing pseudonym key fails before any data is read."""
    from fuserec.data.sources import load_source

    layout = Layout(params.outputs_dir)
    plan = PrivacyPlan.from_params(params)
    validate_source(load_source(params.data), params.validate_, layout.root, plan)
    return str(layout.validation_report)
