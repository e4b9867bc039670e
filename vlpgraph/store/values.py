"""Python values -> what the store keeps: UTC timestamps, JSON text, plain scalars, a param's column
type and text form.

A flattened param's column type follows its value (numbers DOUBLE, bools BOOLEAN, strings VARCHAR,
lists/dicts JSON text in VARCHAR); in a VARCHAR column every value is kept as the same text form
(:func:`as_text`), which matches DuckDB's own casts when a column is widened (vlpgraph/store/runs.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def scalar(value: Any) -> Any:
    """numpy/torch 0-d values -> Python scalars."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def param_kind(value: Any) -> str | None:
    """SQL type a param value asks for (None for None)."""
    value = scalar(value)
    if value is None:
        return None
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, (int, float)):
        return "DOUBLE"
    return "VARCHAR"


def as_text(value: Any) -> str | None:
    """The text form of a param value in a VARCHAR column (matches DuckDB's casts when widening)."""
    value = scalar(value)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, str):
        return value
    return to_json(value)


def param_value(value: Any, column_type: str) -> Any:
    value = scalar(value)
    if value is None:
        return None
    if column_type == "VARCHAR":
        return as_text(value)
    if column_type == "BOOLEAN":
        return bool(value)
    return float(value)


def float_or_none(value: Any) -> float | None:
    value = scalar(value)
    return None if value is None else float(value)


def int_or_none(value: Any) -> int | None:
    value = scalar(value)
    return None if value is None else int(value)


def nonempty_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string name, got {value!r}")
    return value
