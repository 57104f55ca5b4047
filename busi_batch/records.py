"""The records that travel between stages and the files they become (``predictions.csv``, JSON).

``ImageResult``'s fields are exactly the CSV's columns, in order; the CSV is always rewritten whole and
atomically, so a reader never sees half a row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .imageio import atomic_write_text

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass
class ImageResult:
    """One row of ``predictions.csv``: the outcome for one input image."""

    image: str
    status: str
    error: str = ""
    pred_class: str = ""
    confidence: float | None = None
    p_normal: float | None = None
    p_benign: float | None = None
    p_malignant: float | None = None
    lesion_area_px: int | None = None
    lesion_area_mm2: float | None = None
    lesion_count: int | None = None
    mask: str = ""
    width: int | None = None
    height: int | None = None
    true_class: str = ""
    dice: float | None = None
    iou: float | None = None
    truth_area_px: int | None = None
    truth_error: str = ""
    input_sha256: str = ""
    model_sha256: str = ""
    settings: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ImageResult))
_INT_FIELDS = {"lesion_area_px", "lesion_count", "width", "height", "truth_area_px"}
_FLOAT_FIELDS = {"confidence", "p_normal", "p_benign", "p_malignant", "lesion_area_mm2", "dice", "iou"}


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _parse(name: str, text: str) -> Any:
    if name in _INT_FIELDS:
        return int(text) if text != "" else None
    if name in _FLOAT_FIELDS:
        return float(text) if text != "" else None
    return text


def results_to_csv(results: list[ImageResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        writer.writerow([_format(getattr(result, c)) for c in CSV_COLUMNS])
    return buffer.getvalue()


def write_results_csv(path: Path, results: list[ImageResult]) -> None:
    atomic_write_text(path, results_to_csv(results))


def read_results_csv(path: Path) -> list[ImageResult]:
    """Rows of a ``predictions.csv`` written by this tool; unknown extra columns are ignored."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        return [
            ImageResult(**{c: _parse(c, row.get(c) or "") for c in CSV_COLUMNS if c in row}) for row in reader
        ]


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
