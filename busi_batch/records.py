"""The records that travel between stages and the files they become (``predictions.csv``, JSON).

``ImageResult``'s fields are exactly the CSV's columns, in order; the CSV is always rewritten whole and
atomically, so a reader never sees half a row.

Between two rewrites a run appends each finished batch's rows to a journal (JSON lines), so a run killed at any
moment loses at most the batch in flight; the next run reads the CSV, then the journal on top of it.

Columns are only ever appended (the DICOM ones, ``frame`` to ``study_date``, came last), and readers take the
columns they know by name: a CSV or journal written before a column existed still reads back, the new columns
empty, so an old output folder resumes.

File names are kept exactly: a name that is not valid UTF-8 is written with its original bytes
(``surrogateescape``), so the ``image`` column still opens the file. Readers other than this module should do
the same (pandas: ``encoding_errors="surrogateescape"``).
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


@dataclass(frozen=True)
class ImageResult:
    """One row of ``predictions.csv``: the outcome for one input image (frozen: change it with
    ``dataclasses.replace``)."""

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
    # Appended for DICOM input (issue 8); empty for other files. Frame counts from 1.
    frame: int | None = None
    pixel_size_mm_x: float | None = None
    pixel_size_mm_y: float | None = None
    pixel_size_source: str = ""  # us_region, pixel_spacing, imager_pixel_spacing, override, or empty (unknown)
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    patient_id: str = ""  # empty under --anonymize
    study_date: str = ""  # empty under --anonymize

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ImageResult))
_INT_FIELDS = {"lesion_area_px", "lesion_count", "width", "height", "truth_area_px", "frame"}
_FLOAT_FIELDS = {
    "confidence", "p_normal", "p_benign", "p_malignant", "lesion_area_mm2", "dice", "iou", "pixel_size_mm_x",
    "pixel_size_mm_y",
}


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


#: A cell starting with one of these is run as a formula by spreadsheets (OWASP "CSV injection"); a quote is
#: on the list so that a text that really starts with a quote survives the round trip.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def neutralise_cell(text: str) -> str:
    """A CSV text cell a spreadsheet shows as text: ``'`` before a leading ``= + - @``, tab, CR or ``'``.

    :func:`restore_cell` is its exact inverse, so busi-batch reads back the real file names.
    """
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def restore_cell(text: str) -> str:
    """The text :func:`neutralise_cell` was given."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_STARTS) else text


def _cell(name: str, value: Any) -> str:
    text = _format(value)
    return text if name in _INT_FIELDS or name in _FLOAT_FIELDS else neutralise_cell(text)


def _read_cell(name: str, text: str) -> Any:
    return _parse(name, text if name in _INT_FIELDS or name in _FLOAT_FIELDS else restore_cell(text))


def as_written(result: ImageResult) -> ImageResult:
    """The row exactly as it reads back from the CSV (floats at the CSV's 6 significant digits).

    Metrics are computed from rows in this form, so ``metrics.json`` is the same whether its rows were just
    computed, kept from an earlier (interrupted) run or merged from shards: it can always be recomputed from
    ``predictions.csv`` alone.
    """
    return ImageResult(**{c: _parse(c, _format(getattr(result, c))) for c in CSV_COLUMNS})


def results_to_csv(results: list[ImageResult]) -> str:
    """The CSV text: ``\\n`` line ends (friendly to cut/awk), minimal quoting, formula cells neutralised
    (:func:`neutralise_cell`: a file name like ``=HYPERLINK(...).png`` is not run by a spreadsheet).

    Python's writer quotes a field holding ``\\n`` but not one holding a bare ``\\r`` when lines end in
    ``\\n``; such a row (a file name with a carriage return) is written fully quoted, so it reads back intact.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(CSV_COLUMNS)
    for result in results:
        fields = [_cell(c, getattr(result, c)) for c in CSV_COLUMNS]
        (quoted if any("\r" in f for f in fields) else writer).writerow(fields)
    return buffer.getvalue()


def write_results_csv(path: Path, results: list[ImageResult], temp_dir: Path | None = None) -> None:
    atomic_write_text(path, results_to_csv(results), temp_dir=temp_dir)


def read_results_csv(path: Path) -> list[ImageResult]:
    """Rows of a ``predictions.csv`` written by this tool, text cells as they were before neutralising; unknown
    extra columns are ignored, missing ones (an older version's CSV) take their defaults."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        return [
            ImageResult(**{c: _read_cell(c, row.get(c) or "") for c in CSV_COLUMNS if c in row}) for row in reader
        ]


def journal_lines(results: list[ImageResult]) -> bytes:
    """Rows as JSON lines for the journal; lone surrogates (non-UTF-8 names) are escaped by ``json`` itself."""
    return b"".join(
        (json.dumps(dataclasses.asdict(r), ensure_ascii=True) + "\n").encode("ascii")
        for r in results
    )


def read_journal(path: Path) -> list[ImageResult]:
    """Rows of a journal in the order written; a torn last line (a killed writer) or a damaged line is skipped.

    Keys an older version did not write take their defaults; a line without ``image`` or ``status`` is damaged.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        try:
            record = json.loads(line)
            rows.append(ImageResult(**{c: record[c] for c in CSV_COLUMNS if c in record}))
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def printable(name: str) -> str:
    """A file name fit for a one-line message: control characters and undecodable bytes escaped, rest as is.

    ``bad\\xff name.png`` for the bytes ``bad\xff name.png``; ``a\\nb.png`` for a name holding a newline.
    """
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", errors="backslashreplace").decode("ascii"))
    return "".join(out)


def write_json(path: Path, data: Any, temp_dir: Path | None = None) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n", temp_dir=temp_dir)


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
