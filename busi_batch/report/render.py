"""A finished run folder -> a report file (HTML or PDF), through the Jinja2 templates.

:func:`render_report` reads only the run folder (``run.json``, ``predictions.csv``, ``metrics.json``,
``ground_truth.json``, the masks) and, for the pictures, the input images at the paths the run recorded; it never
loads the model. HTML and PDF come from the same templates (``templates/``, shipped in the wheel as
``busi_batch.templates``): the HTML is one file that links to the pictures in ``OUT/report_assets``, the PDF is
laid out by :mod:`.pdf` with the print stylesheet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import __version__
from ..classes import CLASS_NAMES
from ..errors import BusiBatchError, UsageError
from ..imageio import atomic_write_text
from ..records import read_results_csv
from ..runfolder import CSV_NAME, METRICS_JSON, read_run_record, read_truth_masks
from . import pdf
from .assets import ASSETS_DIR, make_renditions, remove_stale, rendition_jobs
from .content import (
    LOW_CONFIDENCE, LOW_DICE, PAGE_CHOICES, REVIEW_TABLE_MAX, Entry, LoadedRun, attach, pixel_size_sources,
    review_flags, run_info, select_pages, summarise, unique,
)

logger = logging.getLogger(__name__)

FORMATS = {".pdf": "pdf", ".html": "html", ".htm": "html"}
#: Below this many per-image pages, starting worker processes costs more than it saves.
MIN_PAGES_FOR_POOL = 40


@dataclass
class ReportResult:
    """What was written, for the CLI's closing line and for tests."""

    path: Path
    format: str
    image_pages: int
    total_pages: int | None
    seconds: float


def load_run(run_dir: Path) -> LoadedRun:
    """Read a run folder; BusiBatchError names the file and the reason when it is not a finished run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such output folder")
    csv_path = run_dir / CSV_NAME
    record = read_run_record(run_dir)
    if not csv_path.is_file():
        raise BusiBatchError(f"{csv_path}: missing; is {run_dir} a finished busi-batch output folder?")
    try:
        rows = read_results_csv(csv_path)
    except (OSError, ValueError, TypeError) as err:
        raise BusiBatchError(f"{run_dir}: cannot read the run's files: {err}") from err
    metrics = None
    metrics_path = run_dir / METRICS_JSON
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BusiBatchError(f"{metrics_path}: cannot read: {err}") from err
    return LoadedRun(info=run_info(run_dir, record), rows=rows, metrics=metrics,
                     truth_masks=read_truth_masks(run_dir))


def templates_dir() -> Path:
    """The shipped templates: ``busi_batch/templates`` in an installed wheel, ``templates/`` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    candidates = (package / "templates", package.parent / "templates")
    for candidate in candidates:
        if (candidate / "report.html.j2").is_file():
            return candidate
    raise BusiBatchError(f"report templates not found (looked in {candidates[0]} and {candidates[1]})")


def report_format(target: Path) -> str:
    """``pdf`` or ``html`` from the file name; UsageError otherwise."""
    fmt = FORMATS.get(Path(target).suffix.lower())
    if fmt is None:
        raise UsageError(f"{target}: the report must end in .pdf or .html")
    return fmt


def validate_report_options(target: Path, pages: str) -> None:
    """Check ``--report`` and ``--report-pages`` before a run starts, so a typo does not waste a run."""
    report_format(target)
    if pages not in PAGE_CHOICES:
        raise UsageError(f"--report-pages must be one of {', '.join(PAGE_CHOICES)}, not {pages!r}")


def environment() -> Any:
    """The Jinja2 environment of the report templates, with their filters (``num``, ``pct``, ``ci``, ``seconds``)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _num
    env.filters["pct"] = lambda v: "–" if v is None else f"{100.0 * v:.1f}%"
    env.filters["ci"] = _ci
    env.filters["seconds"] = _seconds
    return env


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _ci(pair: Any) -> str:
    if not pair or len(pair) != 2 or pair[0] is None:
        return ""
    return f"95% CI {pair[0]:.3f}–{pair[1]:.3f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    minutes, secs = divmod(float(value), 60.0)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def stylesheets() -> tuple[str, str]:
    """(screen and shared rules, paged-media rules): the PDF uses both, the HTML keeps the second for printing."""
    root = templates_dir()
    return (root / "report.css").read_text(encoding="utf-8"), (root / "print.css").read_text(encoding="utf-8")


def render_report(run_dir: Path, target: Path, pages: str = "all", processes: int = 2) -> ReportResult:
    """Render the report of the finished run in ``run_dir`` to ``target`` (``.pdf`` or ``.html``).

    ``pages`` picks the images with a page of their own (``all`` / ``flagged`` / ``none``); ``processes`` caps the
    worker processes for renditions and PDF chunks. Raises UsageError / BusiBatchError with a one-line reason.

    The work overlaps: the workers draw the pictures chunk by chunk while this process lays out the summary;
    each chunk's pages are rendered as soon as its pictures exist.
    """
    started = time.time()
    target = Path(target)
    fmt = report_format(target)
    validate_report_options(target, pages)
    folder = load_run(run_dir)
    info = folder.info
    target_r = target.resolve()
    if info.input.exists() and target_r.is_relative_to(info.input.resolve()):
        raise UsageError(f"{target}: the report may not be written inside the input folder {info.input}")
    use_mm2 = any(r.lesion_area_mm2 is not None for r in folder.rows)  # --pixel-size, or DICOM calibration
    entries = [Entry(number=i, row=row, flags=review_flags(row)) for i, row in enumerate(folder.rows, start=1)]
    selected = select_pages(entries, pages)
    for entry in selected:
        entry.has_page = True
    summary = summarise(entries, folder.metrics, use_mm2)
    gallery = unique(summary.worst + summary.wrong)
    assets_dir = Path(run_dir) / ASSETS_DIR
    workers = max(1, min(processes, os.cpu_count() or 1))
    if len(selected) < MIN_PAGES_FOR_POOL:
        workers = 1
    chunks = pdf.split_pages(selected, workers)
    context = {
        "run": info, "summary": summary, "metrics": folder.metrics or {}, "use_mm2": use_mm2,
        "pixel_sources": pixel_size_sources(folder.rows),
        "tool_version": __version__, "class_names": CLASS_NAMES, "pages_option": pages,
        "n_pages": len(selected), "low_confidence": LOW_CONFIDENCE, "low_dice": LOW_DICE,
        "review_max": REVIEW_TABLE_MAX, "generated": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    drawn = (selected or gallery) and not info.anonymized
    if drawn and not info.input.is_dir():
        logger.warning("%s: input folder not found; report pictures will say so", info.input)
    truth = folder.truth_masks if drawn else {}
    try:
        assets_dir.mkdir(parents=True, exist_ok=True)
        with pdf.process_pool(workers) as pool:
            pictures = [pdf.submit(pool, make_renditions, rendition_jobs(chunk, info, truth, assets_dir))
                        for chunk in chunks]
            attach(gallery, make_renditions(rendition_jobs(gallery, info, truth, assets_dir)))
            template = environment().get_template("report.html.j2")
            css = stylesheets()
            if fmt == "html":
                for chunk, future in zip(chunks, pictures):
                    attach(chunk, future.result())
                base = os.path.relpath(assets_dir.resolve(), target_r.parent)
                html = template.render(
                    mode="html", entries=selected, asset_base=quote(Path(base).as_posix()) + "/",
                    css=css, first_page=1, total_pages=0, part="all", **context,
                )
                atomic_write_text(target, html)
                total = None
            else:
                base_url = assets_dir.resolve().as_uri() + "/"

                def render_part(part_entries: list[Entry], first_page: int, total_pages: int, part: str) -> str:
                    return template.render(mode="pdf", entries=part_entries, asset_base=base_url, css=css,
                                           first_page=first_page, total_pages=total_pages, part=part, **context)

                total = pdf.write_pdf(pool, render_part, chunks, pictures, base_url, assets_dir, target,
                                      title=f"busi-batch report: {info.input.name}")
    except OSError as err:
        raise BusiBatchError(f"{target}: cannot write the report: {err.strerror or err}") from err
    except BrokenProcessPool as err:
        raise BusiBatchError(f"{target}: a report worker process died (out of memory?)") from err
    remove_stale(assets_dir, {name for e in selected + gallery if e.rendition
                              for name in (e.rendition.overlay, e.rendition.mask) if name})
    return ReportResult(path=target, format=fmt, image_pages=len(selected), total_pages=total,
                        seconds=time.time() - started)
