"""DICOM element values as Python values: a missing, empty or malformed value is None (or empty), never an error."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_int(value: Any) -> int | None:
    """An integer value (IS, US, SS...), or None when missing, empty or not a number."""
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def as_float(value: Any) -> float | None:
    """A finite decimal value (DS, FD...), or None when missing, empty, not a number, infinite or NaN."""
    try:
        result = None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None
    return result if result is not None and np.isfinite(result) else None


def as_text(value: Any) -> str:
    """A value as stripped text; empty when missing."""
    return "" if value is None else str(value).strip()


def as_list(value: Any) -> list[Any]:
    """A DICOM value as a list: multi-valued elements are sequences, single values are not."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)
