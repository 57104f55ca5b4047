"""What a report says, computed from a run's records: pure functions and plain dataclasses, no file access.

Inputs are the run record (``run.json`` as :class:`~busi_batch.runfolder.RunRecord`), the rows of
``predictions.csv`` (:class:`~busi_batch.records.ImageResult`) and the content of ``metrics.json``. Outputs are
what the templates lay out: the run's provenance (:class:`RunInfo`), the review flags of each image
(:func:`review_flags`), counts and histograms as bars, the galleries, the confusion matrix, and the ROC and
reliability charts as SVG geometry in a fixed viewBox.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..classes import CLASS_NAMES
from ..errors import UsageError
from ..records import ImageResult

if TYPE_CHECKING:
    from ..runfolder import RunRecord
    from .assets import Rendition

PAGE_CHOICES = ("all", "flagged", "none")

#: A case is flagged for review below this top-class probability (three classes: chance is 1/3).
LOW_CONFIDENCE = 0.6
#: With ground truth, a lesion segmented with a Dice below this is flagged.
LOW_DICE = 0.5
REVIEW_TABLE_MAX = 100
ERROR_TABLE_MAX = 50
GALLERY_SIZE = 6
#: Longer file names are shortened in the middle on a page (with the other capped texts, this keeps every
#: per-image page on one sheet; if one ever spills over, the page numbering still follows).
MAX_NAME_CHARS = 300


# ----------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class ModelInfo:
    """The model card summary a run recorded in ``run.json``."""

    name: str
    version: str
    sha256: str
    test_model: bool
    warning: str
    intended_use: str
    training_data: str
    test_metrics: dict[str, Any]


@dataclass(frozen=True)
class RunInfo:
    """The parts of ``run.json`` a report shows."""

    folder: Path
    input: Path
    started: str
    finished: str
    interrupted: bool
    status: str                      # "complete", or "running" / "interrupted" / "failed" for a run that stopped
    tool_version: str
    device: str
    total_s: float | None
    found: int
    ok: int
    errors: int
    removed: int
    passed_over: list[tuple[str, str]]
    pixel_size_mm: float | None
    tta: bool
    anonymized: bool
    model: ModelInfo


@dataclass
class LoadedRun:
    """A finished run, read back: provenance, one row per image, the metrics when there was ground truth, and the
    ground-truth mask files of each image that has any (``ground_truth.json``)."""

    info: RunInfo
    rows: list[ImageResult]
    metrics: dict[str, Any] | None
    truth_masks: dict[str, tuple[Path, ...]] = field(default_factory=dict)


def run_info(run_dir: Path, record: RunRecord) -> RunInfo:
    """The parts of a run record a report shows."""
    model = record.model
    return RunInfo(
        folder=run_dir,
        input=Path(record.input),
        started=record.started,
        finished=str(record.finished or ""),
        interrupted=record.interrupted,
        status=record.status,
        tool_version=record.tool_version,
        device=record.device + (f", {record.precision} forward pass" if record.precision else ""),
        total_s=record.timings.get("total_s"),
        found=record.counts.found,
        ok=record.counts.ok,
        errors=record.counts.error,
        removed=record.counts.removed_since_last_run,
        passed_over=list(record.passed_over),
        pixel_size_mm=record.option("pixel_size_mm"),
        tta=bool(record.option("tta", False)),
        anonymized=bool(record.option("anonymize", False)),
        model=ModelInfo(
            name=model.name,
            version=model.version,
            sha256=model.sha256,
            test_model=model.test_model,
            warning=model.warning,
            intended_use=model.intended_use,
            training_data=model.training_data,
            test_metrics=dict(model.test_metrics),
        ),
    )


# ------------------------------------------------------------------------------------ what the report says


@dataclass(frozen=True)
class Flag:
    """One reason a case deserves a human look; lower ``priority`` sorts first."""

    kind: str
    text: str
    priority: int
    short: str = ""  # for the summary's review table, where a row should stay one or two lines


def review_flags(row: ImageResult, low_confidence: float = LOW_CONFIDENCE, low_dice: float = LOW_DICE) -> list[Flag]:
    """Why an image should be looked at first: errors, class/mask disagreement, low confidence, and (with ground
    truth) misclassification or a poorly segmented lesion. Empty when nothing stands out."""
    if not row.ok:
        reason = row.error or "unknown error"
        return [Flag("error", f"not processed: {reason}", 0, f"error: {shorten_middle(reason, 80)}")]
    flags: list[Flag] = []
    area = row.lesion_area_px or 0
    if row.pred_class == "normal" and area > 0:
        flags.append(Flag("disagreement", "lesion mask on an image classed normal", 1, "mask but normal"))
    elif row.pred_class in ("benign", "malignant") and area == 0:
        flags.append(Flag("disagreement", f"no lesion mask on an image classed {row.pred_class}", 1,
                          f"no mask but {row.pred_class}"))
    if row.confidence is not None and row.confidence < low_confidence:
        flags.append(Flag("low-confidence", f"low confidence {row.confidence:.2f}", 2, "low confidence"))
    if row.true_class and row.pred_class and row.true_class != row.pred_class:
        flags.append(Flag("misclassified", f"misclassified: true {row.true_class}, predicted {row.pred_class}", 3,
                          f"true {row.true_class}"))
    if row.dice is not None and (row.truth_area_px or 0) > 0 and row.dice < low_dice:
        flags.append(Flag("low-dice", f"lesion Dice {row.dice:.2f}", 4, f"Dice {row.dice:.2f}"))
    if row.truth_error:
        flags.append(Flag("truth", f"ground truth not used: {row.truth_error}", 5, "ground truth unusable"))
    return flags


@dataclass
class Entry:
    """One image as the report shows it."""

    number: int                         # 1-based, in predictions.csv order
    row: ImageResult
    flags: list[Flag]
    rendition: Rendition | None = None
    page: int | None = None             # PDF page number of its per-image page
    has_page: bool = False

    @property
    def anchor(self) -> str:
        return f"img-{self.number}"

    @property
    def display_name(self) -> str:
        return shorten_middle(self.row.image, MAX_NAME_CHARS)

    @property
    def first_priority(self) -> int:
        return min((f.priority for f in self.flags), default=99)


def shorten_middle(text: str, limit: int) -> str:
    """``text`` unchanged if short enough, else its start and end around an ellipsis (``limit`` characters)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


@dataclass(frozen=True)
class Bar:
    """One bar of a chart drawn with HTML/CSS: label, count, share of the total, and length relative to the
    longest bar (percent)."""

    label: str
    count: int
    share: float
    width: float


def bars(labels: Sequence[str], counts: Sequence[int]) -> list[Bar]:
    total = sum(counts)
    longest = max(counts, default=0)
    return [
        Bar(label, int(c), (c / total) if total else 0.0, (100.0 * c / longest) if longest else 0.0)
        for label, c in zip(labels, counts)
    ]


def class_counts(rows: Iterable[ImageResult]) -> list[Bar]:
    """Predicted classes among processed images, in the model's class order."""
    counts = {name: 0 for name in CLASS_NAMES}
    for row in rows:
        if row.ok and row.pred_class in counts:
            counts[row.pred_class] += 1
    return bars(list(counts), list(counts.values()))


def histogram(values: Sequence[float], edges: Sequence[float], fmt: Callable[[float], str] = "{:g}".format) -> list[Bar]:
    """Counts of ``values`` in ``[edges[i], edges[i+1])``, the last bin closed; labels like ``0.6–0.7``."""
    counts, _ = np.histogram(np.asarray(values, dtype=float), bins=np.asarray(edges, dtype=float))
    labels = [f"{fmt(lo)}–{fmt(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]
    return bars(labels, [int(c) for c in counts])


CONFIDENCE_EDGES = (1 / 3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SCORE_EDGES = tuple(round(0.1 * i, 1) for i in range(11))


def confidence_histogram(rows: Iterable[ImageResult]) -> list[Bar]:
    values = [r.confidence for r in rows if r.ok and r.confidence is not None]
    return histogram(values, CONFIDENCE_EDGES, fmt=lambda v: "⅓" if abs(v - 1 / 3) < 1e-9 else f"{v:.1f}")


def log_edges(values: Sequence[float]) -> list[float]:
    """Bin edges in 1-3-10 steps from the decade below the smallest positive value to above the largest
    (lesion areas span several decades, so equal-width bins would put nearly everything in the first one)."""
    positive = [v for v in values if v > 0]
    if not positive:
        return []
    decade = 10.0 ** math.floor(math.log10(min(positive)))
    largest = max(positive)
    edges: list[float] = []
    while True:
        for step in (1.0, 3.0):
            edges.append(float(f"{step * decade:.3g}"))
            if edges[-1] > largest:
                return edges
        decade *= 10.0


def _area_label(v: float) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def area_histogram(rows: Iterable[ImageResult], use_mm2: bool) -> list[Bar]:
    """Lesion areas (px², or mm² when the pixel size is known): a 'no lesion' bar, then 1-3-10 bins.

    In mm², images whose pixel size is unknown (a DICOM object without calibration, a PNG without
    ``--pixel-size``) are left out rather than counted as lesion-free.
    """
    ok = [r for r in rows if r.ok and (r.lesion_area_mm2 is not None or not use_mm2)]
    values = [(r.lesion_area_mm2 if use_mm2 else r.lesion_area_px) or 0 for r in ok]
    zero = sum(1 for v in values if v <= 0)
    positive = [float(v) for v in values if v > 0]
    edges = log_edges(positive)
    labels = ["no lesion"]
    counts = [zero]
    if edges:
        c, _ = np.histogram(positive, bins=edges)
        labels += [f"{_area_label(lo)}–{_area_label(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]
        counts += [int(x) for x in c]
    return bars(labels, counts)


def pixel_size_sources(rows: Iterable[ImageResult]) -> list[tuple[str, int]]:
    """Processed images per ``pixel_size_source`` (``unknown`` for none), most common first; empty when no image
    has a physical pixel size at all (then the report speaks in px² only)."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.ok:
            key = row.pixel_size_source or "unknown"
            counts[key] = counts.get(key, 0) + 1
    if set(counts) <= {"unknown"}:
        return []
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def score_histogram(values: Sequence[float]) -> list[Bar]:
    """Dice or IoU in ten bins of 0.1."""
    return histogram(values, SCORE_EDGES, fmt=lambda v: f"{v:.1f}")


def review_order(entries: Iterable[Entry]) -> list[Entry]:
    """Flagged entries, most urgent first: errors, disagreement, low confidence, misclassified, low Dice;
    within a kind, least confident first."""
    flagged = [e for e in entries if e.flags]
    return sorted(flagged, key=lambda e: (e.first_priority, e.row.confidence if e.row.confidence is not None else -1,
                                          e.number))


def worst_segmented(entries: Iterable[Entry], n: int = GALLERY_SIZE) -> list[Entry]:
    """Images with a ground-truth lesion, lowest Dice first."""
    scored = [e for e in entries if e.row.dice is not None and (e.row.truth_area_px or 0) > 0]
    return sorted(scored, key=lambda e: (e.row.dice, e.number))[:n]


def misclassified(entries: Iterable[Entry], n: int = GALLERY_SIZE) -> list[Entry]:
    """Wrongly classified images, the most confidently wrong first."""
    wrong = [e for e in entries if e.row.ok and e.row.true_class and e.row.pred_class != e.row.true_class]
    return sorted(wrong, key=lambda e: (-(e.row.confidence or 0.0), e.number))[:n]


def select_pages(entries: Sequence[Entry], pages: str) -> list[Entry]:
    """The images that get a page of their own: all, only flagged ones, or none."""
    if pages == "all":
        return list(entries)
    if pages == "flagged":
        return [e for e in entries if e.flags]
    if pages == "none":
        return []
    raise UsageError(f"--report-pages must be one of {', '.join(PAGE_CHOICES)}, not {pages!r}")


def unique(entries: list[Entry]) -> list[Entry]:
    """``entries`` without repeats (by number), in their first order."""
    seen: set[int] = set()
    result = []
    for e in entries:
        if e.number not in seen:
            seen.add(e.number)
            result.append(e)
    return result


def attach(entries: list[Entry], renditions: list[Rendition]) -> None:
    """Give each entry its pictures (``renditions`` in the same order)."""
    for entry, rendition in zip(entries, renditions):
        entry.rendition = rendition


@dataclass
class Summary:
    """Everything the summary pages show, computed once from the rows."""

    n_images: int
    n_ok: int
    n_errors: int
    errors: list[Entry]
    class_bars: list[Bar]
    confidence_bars: list[Bar]
    area_bars: list[Bar]
    area_unit: str
    review: list[Entry]
    review_total: int
    flag_counts: dict[str, int]
    has_truth: bool
    dice_bars: list[Bar] = field(default_factory=list)
    iou_bars: list[Bar] = field(default_factory=list)
    n_scored: int = 0
    worst: list[Entry] = field(default_factory=list)
    wrong: list[Entry] = field(default_factory=list)
    confusion: list[dict[str, Any]] = field(default_factory=list)
    roc: RocChart | None = None
    reliability: ReliabilityChart | None = None


def summarise(entries: Sequence[Entry], metrics: dict[str, Any] | None, use_mm2: bool) -> Summary:
    """The summary pages' content from every entry and ``metrics.json``; areas in mm² when ``use_mm2``."""
    rows = [e.row for e in entries]
    errors = [e for e in entries if not e.row.ok]
    review = review_order(entries)
    flag_counts: dict[str, int] = {}
    for e in entries:
        for kind in {f.kind for f in e.flags}:
            flag_counts[kind] = flag_counts.get(kind, 0) + 1
    scored = [r for r in rows if r.ok and r.dice is not None]
    has_truth = bool(metrics) or any(r.true_class for r in rows) or bool(scored)
    summary = Summary(
        n_images=len(rows),
        n_ok=sum(r.ok for r in rows),
        n_errors=len(errors),
        errors=errors[:ERROR_TABLE_MAX],
        class_bars=class_counts(rows),
        confidence_bars=confidence_histogram(rows),
        area_bars=area_histogram(rows, use_mm2),
        area_unit="mm²" if use_mm2 else "px²",
        review=review[:REVIEW_TABLE_MAX],
        review_total=len(review),
        flag_counts=flag_counts,
        has_truth=has_truth,
    )
    if has_truth:
        summary.n_scored = len(scored)
        summary.dice_bars = score_histogram([r.dice for r in scored])
        summary.iou_bars = score_histogram([r.iou for r in scored if r.iou is not None])
        summary.worst = worst_segmented(entries)
        summary.wrong = misclassified(entries)
        summary.confusion = confusion_rows((metrics or {}).get("classification") or {})
        summary.roc = roc_chart((metrics or {}).get("classification") or {})
        summary.reliability = reliability_chart((metrics or {}).get("classification") or {})
    return summary


def confusion_rows(classification: dict[str, Any]) -> list[dict[str, Any]]:
    """Confusion matrix rows for the template, each cell with its share of the row (for shading)."""
    matrix = classification.get("confusion_matrix")
    names = classification.get("class_order") or list(CLASS_NAMES)
    if not matrix:
        return []
    result = []
    for i, (name, counts) in enumerate(zip(names, matrix)):
        total = sum(counts)
        cells = []
        for j, count in enumerate(counts):
            share = (count / total) if total else 0.0
            cells.append({"count": count, "share": share, "diagonal": i == j,
                          "alpha": round(0.1 + 0.5 * share, 2) if count else 0.0})
        result.append({"name": name, "total": total, "cells": cells})
    return result


# ------------------------------------------------------------------------- evidence charts (inline SVG geometry)
#
# The ROC chart and the reliability diagram are drawn as inline SVG. The functions below turn metrics.json's
# numbers into geometry in a fixed viewBox (points, paths, rectangles); the template only places it.

#: Line and bar colours per class, matching the CSS bars (``.bar-normal`` …).
CLASS_COLOURS = {"normal": "#6a9f58", "benign": "#4a7fb0", "malignant": "#b5533c"}
OTHER_COLOUR = "#555555"
#: Chart ticks on both axes.
TICKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Frame:
    """A square plot area in an SVG viewBox: data (0, 0) at its bottom left, (1, 1) at its top right.

    The viewBox is ``0 0 width height``; below the plot there is room for tick labels, an axis label and, for the
    reliability diagram, a row of bin counts.
    """

    left: float = 46.0
    top: float = 8.0
    size: float = 200.0
    width: float = 256.0
    height: float = 262.0

    @property
    def right(self) -> float:
        return self.left + self.size

    @property
    def bottom(self) -> float:
        return self.top + self.size

    @property
    def view_box(self) -> str:
        return f"0 0 {self.width:g} {self.height:g}"

    def x(self, value: float) -> float:
        """Horizontal position of a data value in [0, 1] (clipped)."""
        return round(self.left + _unit(value) * self.size, 2)

    def y(self, value: float) -> float:
        """Vertical position of a data value in [0, 1] (clipped); SVG's y grows downwards."""
        return round(self.top + (1.0 - _unit(value)) * self.size, 2)


def _unit(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


ROC_FRAME = Frame()
RELIABILITY_FRAME = Frame(height=256.0)


@dataclass(frozen=True)
class Tick:
    value: float
    label: str
    x: float       # position on the horizontal axis
    y: float       # position on the vertical axis


def ticks(frame: Frame, values: Sequence[float] = TICKS) -> list[Tick]:
    return [Tick(v, f"{v:.1f}", frame.x(v), frame.y(v)) for v in values]


def svg_path(points: Sequence[tuple[float, float]]) -> str:
    """An SVG path through ``points`` (``M x,y L x,y …``); empty for no points."""
    return " ".join(f"{'M' if k == 0 else 'L'}{x:g},{y:g}" for k, (x, y) in enumerate(points))


def roc_points(fpr: Sequence[float], tpr: Sequence[float], frame: Frame = ROC_FRAME) -> list[tuple[float, float]]:
    """A ROC curve's points in the frame: x = 1 - specificity (false-positive rate), y = sensitivity."""
    if len(fpr) != len(tpr):
        raise ValueError(f"fpr and tpr differ in length ({len(fpr)} and {len(tpr)})")
    points: list[tuple[float, float]] = []
    for f, t in zip(fpr, tpr):
        point = (frame.x(f), frame.y(t))
        if not points or points[-1] != point:  # neighbours that round to the same spot add nothing
            points.append(point)
    return points


@dataclass(frozen=True)
class Curve:
    name: str
    auc: float | None
    colour: str
    path: str


@dataclass(frozen=True)
class RocChart:
    """One ROC curve per class that has one, and the classes left out (no curve in metrics.json)."""

    frame: Frame
    curves: list[Curve]
    missing: list[str]
    ticks: list[Tick]
    diagonal: str


def roc_chart(classification: dict[str, Any], frame: Frame = ROC_FRAME) -> RocChart | None:
    """The ROC chart of a metrics.json ``classification`` block; None when it has no ``roc_curves`` (older runs,
    or no probabilities). A class whose curve is null (absent from the ground truth, or the only class present)
    is listed in ``missing``."""
    curves_in = classification.get("roc_curves")
    if not isinstance(curves_in, dict):
        return None
    auc = classification.get("roc_auc") or {}
    order = [n for n in classification.get("class_order") or list(CLASS_NAMES) if n in curves_in]
    order += [n for n in curves_in if n not in order]
    curves, missing = [], []
    for name in order:
        curve = curves_in[name]
        if not curve or not curve.get("fpr"):
            missing.append(name)
            continue
        curves.append(Curve(name, auc.get(name), CLASS_COLOURS.get(name, OTHER_COLOUR),
                            svg_path(roc_points(curve["fpr"], curve["tpr"], frame))))
    diagonal = svg_path([(frame.x(0), frame.y(0)), (frame.x(1), frame.y(1))])
    return RocChart(frame, curves, missing, ticks(frame), diagonal)


@dataclass(frozen=True)
class ReliabilityBar:
    """One confidence bin: its bar (accuracy, as a rectangle), the mean confidence as a marker, and its count."""

    lo: float
    hi: float
    count: int
    accuracy: float | None
    confidence: float | None
    x: float                  # rectangle, in the frame
    y: float
    width: float
    height: float
    opacity: float            # more images, more opaque
    marker_x: float | None    # (mean confidence, accuracy): on the diagonal when calibrated
    marker_y: float | None
    label_x: float            # centre of the bin, for its count
    count_label: str


@dataclass(frozen=True)
class ReliabilityChart:
    frame: Frame
    bars: list[ReliabilityBar]
    ticks: list[Tick]
    diagonal: str
    count_y: float            # baseline of the count row
    total: int


def compact_count(n: int) -> str:
    """A count short enough for a bin ten units wide: 999, 1.2k, 12k, 1.2M."""
    if n < 1000:
        return str(n)
    for div, suffix in ((1_000_000, "M"), (1000, "k")):
        if n >= div:
            v = n / div
            return f"{v:.1f}{suffix}" if v < 10 else f"{v:.0f}{suffix}"
    return str(n)  # pragma: no cover


def reliability_bars(bins: Sequence[dict[str, Any]], frame: Frame = RELIABILITY_FRAME,
                     gap: float = 1.5) -> list[ReliabilityBar]:
    """Geometry of metrics.json's ``reliability`` bins: each bar spans its bin (less ``gap`` on each side) and is
    as tall as the bin's accuracy; an empty bin has no bar (height 0) but keeps its count, 0."""
    largest = max((int(b.get("count") or 0) for b in bins), default=0)
    result = []
    for b in bins:
        lo, hi, count = float(b["lo"]), float(b["hi"]), int(b.get("count") or 0)
        acc = b.get("accuracy") if count else None
        conf = b.get("confidence") if count else None
        x0, x1 = frame.x(lo), frame.x(hi)
        width = max(0.0, x1 - x0 - 2 * gap)
        top = frame.y(acc) if acc is not None else frame.bottom
        result.append(ReliabilityBar(
            lo=lo, hi=hi, count=count, accuracy=acc, confidence=conf,
            x=round(x0 + gap, 2), y=top, width=round(width, 2), height=round(frame.bottom - top, 2),
            opacity=round(0.3 + 0.7 * count / largest, 2) if count and largest else 0.0,
            marker_x=frame.x(conf) if conf is not None and acc is not None else None,
            marker_y=frame.y(acc) if conf is not None and acc is not None else None,
            label_x=round((x0 + x1) / 2, 2), count_label=compact_count(count),
        ))
    return result


def reliability_chart(classification: dict[str, Any], frame: Frame = RELIABILITY_FRAME) -> ReliabilityChart | None:
    """The reliability diagram of a metrics.json ``classification`` block; None without ``reliability``."""
    bins = classification.get("reliability")
    if not bins:
        return None
    bars_ = reliability_bars(bins, frame)
    return ReliabilityChart(frame, bars_, ticks(frame), svg_path([(frame.x(0), frame.y(0)), (frame.x(1), frame.y(1))]),
                            count_y=round(frame.bottom + 40.0, 2), total=sum(b.count for b in bars_))

