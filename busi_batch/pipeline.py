"""The one orchestrator: discover -> infer -> post-process -> write -> evaluate, with resume and locking.

Every write into the output folder happens here (through ``imageio``'s atomic writers). ``predictions.csv`` is
rewritten whole every few hundred images and at the end, so a run killed at any moment leaves a valid CSV,
valid masks, and a next run that only does what is missing.

Resume rule: an image is skipped when the previous CSV has an ``ok`` row for it whose ``input_sha256`` (content
hash, not modification time), ``model_sha256`` and ``settings`` (TTA, threshold) match, and its mask file exists.
Rows of images that are no longer in the study are dropped from the CSV (and counted in ``run.json``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, metrics
from .classes import CLASS_NAMES, class_index
from .discover import ImageItem, Study, discover
from .errors import BusiBatchError, ImageDecodeError, UsageError
from .imageio import decode_image, encode_mask_png, atomic_write_bytes, load_truth_mask, read_bytes
from .inference import Prediction, predict, select_device
from .model import LoadedModel, load_model
from .postprocess import area_mm2, binarise, lesion_area, lesion_count, probability_to_size
from .records import STATUS_ERROR, STATUS_OK, ImageResult, read_results_csv, write_json, write_results_csv

log = logging.getLogger("busi_batch")

CSV_NAME = "predictions.csv"
RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
LOCK_NAME = ".busi-batch.lock"
MASKS_DIR = "masks"
FLUSH_EVERY_IMAGES = 256
FLUSH_EVERY_SECONDS = 30.0


class RunInterrupted(BusiBatchError):
    """SIGTERM or Ctrl-C: the run stopped after the current batch and saved what was done."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; built by the CLI (or a test) and saved into ``run.json``."""

    study: Path
    out: Path
    weights: Path | None = None
    labels: Path | None = None
    masks: Path | None = None
    device: str = "auto"
    batch_size: int = 16
    workers: int = 2
    tta: bool = False
    pixel_size_mm: float | None = None
    force: bool = False
    progress: bool = False

    @classmethod
    def for_study(cls, study: Path, out: Path | None = None, **options: Any) -> "RunConfig":
        """Default output folder: ``./<study name>-results`` in the current directory."""
        study = Path(study)
        if out is None:
            out = Path.cwd() / f"{study.resolve().name}-results"
        return cls(study=study, out=Path(out), **options)


@dataclass
class RunSummary:
    """What happened, for the exit code and the closing line."""

    out: Path
    found: int = 0
    processed: int = 0
    skipped: int = 0
    ok: int = 0
    errors: int = 0
    removed: int = 0
    seconds: float = 0.0
    metrics: dict[str, Any] | None = None
    error_rows: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.errors > 0

    def line(self) -> str:
        text = (
            f"busi-batch: {self.found} images, {self.ok} ok, {self.errors} errors "
            f"({self.processed} processed, {self.skipped} unchanged and skipped) in {self.seconds:.1f} s -> {self.out}"
        )
        if self.metrics:
            cls = self.metrics.get("classification", {})
            seg = self.metrics.get("segmentation", {})
            parts = []
            if cls.get("n_images"):
                parts.append(f"accuracy {cls['accuracy']:.3f}, MCC {cls['mcc']:.3f}")
            if seg.get("dice_mean") is not None:
                parts.append(f"lesion Dice {seg['dice_mean']:.3f}")
            if parts:
                text += "; " + ", ".join(parts)
        return text


def validate_paths(config: RunConfig) -> tuple[Path, Path]:
    """Resolved (study, out); the output may not be the study folder nor lie inside it."""
    study = Path(config.study)
    if not study.exists():
        raise UsageError(f"{study}: no such folder")
    if not study.is_dir():
        raise UsageError(f"{study}: not a folder")
    study_r, out_r = study.resolve(), Path(config.out).resolve()
    if out_r == study_r or out_r.is_relative_to(study_r):
        raise UsageError(f"{config.out}: the output folder may not be inside the input folder {study}")
    if config.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if config.workers < 0:
        raise UsageError("--workers must be 0 or more")
    if config.pixel_size_mm is not None and not config.pixel_size_mm > 0:
        raise UsageError("--pixel-size must be a positive number of millimetres")
    return study_r, out_r


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the output folder; the kernel drops it when a crashed run dies."""
    path = out / LOCK_NAME
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            raise BusiBatchError(f"{out}: another busi-batch run is using this output folder ({owner})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {platform.node()}")
        fh.flush()
        yield
    finally:
        fh.close()


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop stops between batches instead of dying mid-write."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextmanager
    def installed(self) -> Iterator["_StopFlag"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            self.signal = signum

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def mask_relpaths(items: list[ImageItem]) -> dict[str, str]:
    """``masks/<rel without extension>_mask.png``; if two images differ only by extension, keep it in the name."""
    stems: dict[str, int] = {}
    for item in items:
        stem = os.path.splitext(item.rel)[0]
        stems[stem] = stems.get(stem, 0) + 1
    result = {}
    for item in items:
        stem = os.path.splitext(item.rel)[0]
        base = stem if stems[stem] == 1 else item.rel
        result[item.rel] = f"{MASKS_DIR}/{base}_mask.png"
    return result


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(read_bytes(path)).hexdigest()
    except ImageDecodeError:
        return None


def settings_key(loaded: LoadedModel, tta: bool) -> str:
    """What besides input and model changes a result: part of the resume check."""
    return f"threshold={loaded.card.threshold:g};tta={int(tta)}"


def _previous_rows(csv_path: Path) -> dict[str, ImageResult]:
    if not csv_path.is_file():
        return {}
    try:
        return {row.image: row for row in read_results_csv(csv_path)}
    except (OSError, ValueError, TypeError) as err:
        log.warning("%s: previous results unreadable (%s); every image is redone", csv_path, err)
        return {}


def plan_work(
    items: list[ImageItem], previous: dict[str, ImageResult], out: Path, masks: dict[str, str],
    model_sha: str, settings: str, force: bool,
) -> tuple[list[ImageItem], dict[str, ImageResult]]:
    """Split items into those to (re)do and the previous rows that stay valid."""
    todo, kept = [], {}
    for item in items:
        row = previous.get(item.rel)
        if (
            not force and row is not None and row.ok and row.model_sha256 == model_sha and row.settings == settings
            and row.mask == masks[item.rel] and (out / row.mask).is_file()
            and file_sha256(item.path) == row.input_sha256
        ):
            kept[item.rel] = row
        else:
            todo.append(item)
    return todo, kept


def result_from_prediction(
    item: ImageItem, pred: Prediction, loaded: LoadedModel, mask_rel: str, settings: str,
    pixel_size_mm: float | None,
) -> tuple[ImageResult, np.ndarray | None]:
    """The CSV row and the full-size binary mask for one prediction (no I/O)."""
    base = dict(image=item.rel, input_sha256=pred.input_sha256, model_sha256=loaded.sha256, settings=settings)
    if pred.error is not None:
        return ImageResult(status=STATUS_ERROR, error=pred.error, **base), None
    probs = pred.probabilities
    mask = binarise(probability_to_size(pred.lesion_probability, pred.height, pred.width), loaded.card.threshold)
    top = int(np.argmax(probs))
    area = lesion_area(mask)
    row = ImageResult(
        status=STATUS_OK,
        pred_class=CLASS_NAMES[top],
        confidence=float(probs[top]),
        p_normal=float(probs[0]),
        p_benign=float(probs[1]),
        p_malignant=float(probs[2]),
        lesion_area_px=area,
        lesion_area_mm2=area_mm2(area, pixel_size_mm),
        lesion_count=lesion_count(mask),
        mask=mask_rel,
        width=pred.width,
        height=pred.height,
        **base,
    )
    return row, mask


def evaluate_row(row: ImageResult, item: ImageItem, out: Path) -> ImageResult:
    """Fill ``true_class``, ``dice`` and ``iou`` from the item's ground truth and the written mask."""
    row.true_class = item.true_class or ""
    row.dice = row.iou = row.truth_area_px = None
    row.truth_error = ""
    if not (row.ok and item.truth_masks):
        return row
    try:
        predicted = decode_image(read_bytes(out / row.mask)) > 0
        truth = load_truth_mask(item.truth_masks, predicted.shape[:2])
    except ImageDecodeError as err:
        row.truth_error = str(err)
        log.warning("%s: ground truth not used: %s", item.rel, err)
        return row
    row.truth_area_px = lesion_area(truth)
    row.dice = metrics.dice_score(predicted, truth)
    row.iou = metrics.iou_score(predicted, truth)
    return row


def compute_metrics(rows: list[ImageResult]) -> dict[str, Any] | None:
    """``metrics.json`` content from evaluated rows, or None when no row has ground truth."""
    labelled = [r for r in rows if r.ok and r.true_class]
    segmented = [r for r in rows if r.ok and r.dice is not None]
    if not labelled and not segmented:
        return None
    result: dict[str, Any] = {"definitions": metrics.__doc__.strip()}
    if labelled:
        probs = np.array([[r.p_normal, r.p_benign, r.p_malignant] for r in labelled], dtype=float)
        result["classification"] = metrics.classification_metrics(
            [class_index(r.true_class) for r in labelled],
            [class_index(r.pred_class) for r in labelled],
            probs,
            CLASS_NAMES,
        )
    if segmented:
        result["segmentation"] = metrics.segmentation_metrics(
            [r.dice for r in segmented],
            [r.iou for r in segmented],
            [(r.truth_area_px or 0) > 0 for r in segmented],
            [(r.lesion_area_px or 0) > 0 for r in segmented],
        )
    return result


def run(config: RunConfig) -> RunSummary:
    """Process a study end to end; raises BusiBatchError for fatal problems, returns a summary otherwise."""
    started = time.time()
    start_iso = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    study_root, out = validate_paths(config)
    device = select_device(config.device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BusiBatchError(f"{out}: cannot create output folder: {err.strerror or err}") from err
    with output_lock(out), _StopFlag().installed() as stop:
        loaded = load_model(config.weights, device)
        t0 = time.time()
        study = discover(config.study, labels_csv=config.labels, masks_root=config.masks)
        for rel, reason in study.skipped:
            log.warning("%s: skipped: %s", rel, reason)
        masks = mask_relpaths(study.items)
        settings = settings_key(loaded, config.tta)
        previous = _previous_rows(out / CSV_NAME)
        todo, kept = plan_work(study.items, previous, out, masks, loaded.sha256, settings, config.force)
        removed = len(set(previous) - {i.rel for i in study.items})
        for row in kept.values():
            row.lesion_area_mm2 = area_mm2(row.lesion_area_px or 0, config.pixel_size_mm)
        t_discover = time.time() - t0

        summary = RunSummary(out=out, found=len(study.items), skipped=len(kept), removed=removed)
        results: dict[str, ImageResult] = dict(kept)
        t0 = time.time()
        interrupted = _infer_and_write(config, loaded, todo, masks, settings, out, results, stop)
        t_infer = time.time() - t0
        summary.processed = len(results) - len(kept)

        t0 = time.time()
        ordered = [results[i.rel] for i in study.items if i.rel in results]
        by_rel = {i.rel: i for i in study.items}
        with ThreadPoolExecutor(max_workers=2) as pool:
            ordered = list(pool.map(lambda r: evaluate_row(r, by_rel[r.image], out), ordered))
        summary.metrics = compute_metrics(ordered)
        write_results_csv(out / CSV_NAME, ordered)
        if summary.metrics is not None:
            write_json(out / METRICS_JSON, summary.metrics)
        t_eval = time.time() - t0

        summary.ok = sum(r.ok for r in ordered)
        summary.error_rows = [(r.image, r.error) for r in ordered if not r.ok]
        summary.errors = len(summary.error_rows)
        summary.seconds = time.time() - started
        write_json(out / RUN_JSON, _provenance(
            config, study, loaded, device, summary, start_iso, interrupted,
            {"discover_s": t_discover, "inference_s": t_infer, "evaluate_s": t_eval, "total_s": summary.seconds},
        ))
        if interrupted:
            raise RunInterrupted(
                f"stopped by {signal.Signals(stop.signal).name} after {summary.processed} images; "
                f"results so far are saved in {out}, run again to finish"
            )
        return summary


def _infer_and_write(
    config: RunConfig, loaded: LoadedModel, todo: list[ImageItem], masks: dict[str, str], settings: str,
    out: Path, results: dict[str, ImageResult], stop: _StopFlag,
) -> bool:
    """Run the network over ``todo``, writing each mask and collecting rows; True if a signal stopped it."""
    if not todo:
        return False
    last_flush, since_flush = time.time(), 0
    progress = tqdm(total=len(todo), unit="img", disable=not config.progress, leave=False, dynamic_ncols=True)
    try:
        for pred in predict(loaded, todo, batch_size=config.batch_size, workers=config.workers, tta=config.tta,
                            with_truth=False):
            item = todo[pred.index]
            row, mask = result_from_prediction(item, pred, loaded, masks[item.rel], settings, config.pixel_size_mm)
            if mask is not None:
                atomic_write_bytes(out / row.mask, encode_mask_png(mask))
            else:
                log.warning("error: %s: %s", item.rel, row.error)
            results[item.rel] = row
            progress.update(1)
            since_flush += 1
            if since_flush >= FLUSH_EVERY_IMAGES or time.time() - last_flush > FLUSH_EVERY_SECONDS:
                write_results_csv(out / CSV_NAME, sorted(results.values(), key=lambda r: r.image))
                last_flush, since_flush = time.time(), 0
            if stop.signal is not None and (pred.index + 1) % config.batch_size == 0:
                return True
        return stop.signal is not None
    finally:
        progress.close()


def _provenance(
    config: RunConfig, study: Study, loaded: LoadedModel, device: torch.device, summary: RunSummary,
    start_iso: str, interrupted: bool, timings: dict[str, float],
) -> dict[str, Any]:
    card = loaded.card
    return {
        "tool": "busi-batch",
        "tool_version": __version__,
        "started": start_iso,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "input": str(config.study.resolve()),
        "output": str(summary.out),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "model": {
            "name": card.name,
            "version": card.version,
            "weights": str(loaded.weights_path),
            "sha256": loaded.sha256,
            "test_model": card.test_model,
            "warning": (
                "TEST MODEL: random or barely trained weights for software tests; predictions are meaningless"
                if card.test_model else ""
            ),
            "temperature": card.temperature,
            "threshold": card.threshold,
            "input_size": card.input_size,
            "intended_use": card.intended_use,
            "training_data": card.training_data,
            "test_metrics": card.metrics,
        },
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "platform": {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
                     "cpu_count": os.cpu_count()},
        "counts": {
            "found": summary.found, "processed": summary.processed, "skipped_unchanged": summary.skipped,
            "ok": summary.ok, "error": summary.errors, "removed_since_last_run": summary.removed,
            "passed_over": len(study.skipped),
        },
        "passed_over": [{"path": p, "reason": r} for p, r in study.skipped],
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
