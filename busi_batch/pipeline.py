"""The one orchestrator: discover -> infer -> post-process -> write -> evaluate, with resume, locking and shards.

Every write into the output folder goes through ``runfolder`` (which owns the folder's format, its ownership
rules and its lock), under an exclusive lock on the folder. What a run killed at any moment (SIGKILL, power cut
of the process) leaves behind is valid:

* each mask file is written whole or not at all (temporary file + fsync + rename); stray temporaries from a
  killed write are deleted by the next run;
* every row the folder holds describes the mask beside it (``runfolder.RunFolder.start``);
* finished batches are committed at least every ``COMMIT_EVERY_SECONDS``: their masks made durable, then their rows
  appended to ``.predictions.journal`` (JSON lines; a torn last line is skipped), and ``predictions.csv`` is rewritten whole every 30 seconds and at the end; the next run reads the
  CSV, then the journal on top of it, and only does what is missing;
* ``run.json`` says ``"status": "running"`` from the start of the inference, and ``complete``, ``interrupted``
  or ``failed`` at the end, so a folder left by a killed run is recognisable (``merge`` refuses it).

Before anything is written, the folder must be busi-batch's to write into, and a folder holding results of
another study, model or settings is refused unless ``--force`` (``runfolder.claim``, ``runfolder.check_same_run``).
A study with no supported image is an error of its own (``EmptyStudy``).

Resume rule: an image is skipped when the previous rows hold an ``ok`` row for it whose ``input_sha256`` (content
hash, not modification time), ``model_sha256`` and ``settings`` (TTA, mask rules) match, and its mask file exists.
Rows of images that are no longer in the study (or the shard) are dropped with their mask files (and counted in
``run.json``, ``removed_since_last_run``): the folder always describes the study as it is now.

Scoring: a new row is scored against its ground truth (``rows.with_truth``) from the mask in memory as the mask is
written, the truth decoded by the loader's workers; a kept row is scored again from its mask file, for the labels
and the ground-truth masks may have changed since.

DICOM input (``dicom``): discovery reads each object's header; a row's pixel size comes from that header's
calibration and the lesion mask (``dicom.resolve_pixel_size``), ``--pixel-size`` only for inputs without any;
the identifier columns come from the header too. Under ``--anonymize`` the patient columns stay empty, items are
named by pseudonym (discovery), and row errors, log lines and the texts and paths of ``run.json`` pass through the
study's scrubber.

SIGTERM / SIGINT set a flag; the loop finishes the batch in hand, writes everything, and raises
``RunInterrupted``. The DataLoader's decoding workers are started with both signals blocked, so a signal sent
to the whole process group (Ctrl-C in a terminal, ``systemctl stop``, Slurm at the time limit) stops the run
through its main process instead of killing a worker mid-batch; the workers then leave through the DataLoader's
normal shutdown. A fatal error mid-run (a full disk) saves what was done, marks ``run.json`` failed, and raises.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .dicom import scrub_row
from .discover import FRAMES_CHOICES, ImageItem, Study, discover
from .errors import (
    BusiBatchError, DecodingWorkerDied, EmptyStudy, ImageDecodeError, OutputWriteError, RunInterrupted, UsageError,
)
from .imageio import decode_image, encode_mask_png, load_truth_mask, read_bytes
from .inference import Prediction, predict
from .loader import worker_count
from .metrics import compute_metrics
from .model import LoadedModel, load_model
from .records import ImageResult, as_written, printable
from .rows import error_row, refresh_kept, result_from_prediction, settings_key, with_truth
from .runfolder import (  # noqa: F401  (the folder's names, re-exported for callers that know them from here)
    CSV_NAME, JOURNAL_NAME, LOCK_NAME, MASKS_DIR, METRICS_JSON, RUN_JSON, STATUS_COMPLETE, STATUS_FAILED,
    STATUS_INTERRUPTED, STATUS_RUNNING, ModelRecord, RunCounts, RunFolder, RunIdentity, RunRecord,
    check_same_run, check_shard_matches, claim, mask_relpaths, now_iso, output_lock, plan_work, previous_rows,
    read_run_record,
)
from .runtime import release_free_memory, select_device, select_precision
from .shard import Shard

logger = logging.getLogger(__name__)

#: ``predictions.csv`` is rewritten whole this often during a run (for whoever reads it meanwhile); the journal,
#: not the CSV, is what makes each finished batch survive a kill, so this costs O(n) per 30 s, not per batch.
FLUSH_EVERY_SECONDS = 30.0
#: Batches written meanwhile are made durable together this often (one ``syncfs``); a kill loses at most this much.
COMMIT_EVERY_SECONDS = 5.0
#: How often freed heap memory goes back to the system during inference (see runtime.release_free_memory).
TRIM_EVERY_SECONDS = 5.0
#: OS errors on one mask file that are about that file's name, not the output folder: a row error, not fatal.
_PER_FILE_ERRNOS = {errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; built by the CLI (or a test) and saved into ``run.json``."""

    study: Path
    out: Path
    weights: Path | None = None
    labels: Path | None = None
    masks: Path | None = None
    device: str = "auto"
    precision: str = "auto"  # forward pass: "auto" (bf16 where the hardware has it), "fp32" or "bf16"
    batch_size: int = 16
    workers: int = 2
    tta: bool = False
    pixel_size_mm: float | None = None
    force: bool = False
    progress: bool = False
    shard: Shard | None = None
    frames: str = "first"  # multi-frame DICOM: "first" frame only, or "all" (one row and mask per frame)
    anonymize: bool = False  # no patient identifier in any output (names, columns, run.json, log lines)

    @classmethod
    def for_study(cls, study: Path, out: Path | None = None, **options: Any) -> "RunConfig":
        """Default output folder: ``./<study name>-results`` in the current directory."""
        study = Path(study)
        if out is None:
            out = Path.cwd() / f"{study.resolve().name}-results"
        return cls(study=study, out=Path(out), **options)


@dataclass(frozen=True)
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
    error_rows: tuple[tuple[str, str], ...] = ()
    shard: Shard | None = None

    @property
    def failed(self) -> bool:
        return self.errors > 0

    def line(self) -> str:
        where = f" in shard {self.shard}" if self.shard else ""
        text = (
            f"busi-batch: {self.found} images{where}, {self.ok} ok, {self.errors} errors "
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
    if config.frames not in FRAMES_CHOICES:
        raise UsageError(f"--frames must be one of {', '.join(FRAMES_CHOICES)}, not {config.frames!r}")
    return study_r, out_r


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop stops between batches instead of dying mid-write."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

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


def _scored(
    row: ImageResult, item: ImageItem, predicted: np.ndarray | None, truth: np.ndarray | None,
    truth_error: str | None,
) -> ImageResult:
    """``rows.with_truth``, with a warning when the item's ground truth cannot be used."""
    row = with_truth(row, item, predicted, truth, truth_error or "")
    if row.truth_error:
        logger.warning("%s: ground truth not used: %s", printable(item.name), row.truth_error)
    return row


def _score_kept(row: ImageResult, item: ImageItem, out: Path) -> ImageResult:
    """A row kept from an earlier run, scored against the item's ground truth as it is now, from its mask file."""
    if not (row.ok and item.truth_masks):
        return with_truth(row, item)
    try:
        predicted = decode_image(read_bytes(out / row.mask)) > 0
        truth = load_truth_mask(item.truth_masks, predicted.shape[:2])
    except ImageDecodeError as err:
        return _scored(row, item, None, None, str(err))
    return _scored(row, item, predicted, truth, None)


def run(config: RunConfig) -> RunSummary:
    """Process a study end to end; raises BusiBatchError for fatal problems, returns a summary otherwise.

    Raises OutputFolderRefused (nothing written) when ``config.out`` is not busi-batch's to write into, or holds
    results of another study, model or settings and ``config.force`` is not set; EmptyStudy when the study holds
    no supported image.
    """
    started = time.time()
    start_iso = now_iso()
    study_root, out = validate_paths(config)
    workers = worker_count(config.workers)
    device = select_device(config.device)
    precision = select_precision(config.precision, device)
    claim(out)
    folder = RunFolder(out)
    with output_lock(out), _StopFlag().installed() as stop:
        stale = folder.prepare()
        if stale:
            logger.info("%s: removed %d temporary files left by an interrupted write", out, stale)
        loaded = load_model(config.weights, device, precision)
        t0 = time.time()
        study = discover(config.study, labels_csv=config.labels, masks_root=config.masks, frames=config.frames,
                         anonymize=config.anonymize)
        for rel, reason in study.skipped:
            logger.warning("%s: skipped: %s", printable(rel), reason)
        if not study.items:
            passed = f" ({len(study.skipped)} files passed over, none of them a supported image)" if study.skipped else ""
            raise EmptyStudy(f"{config.study}: no images to process{passed}; supported: PNG, JPEG, BMP, TIFF, DICOM")
        masks = mask_relpaths(study.items)
        items = config.shard.select(study.items) if config.shard else study.items
        settings = settings_key(loaded, config.tta)
        previous = previous_rows(out)
        record_before = _readable_record(out)
        check_shard_matches(out, record_before, config.shard, bool(previous), config.force)
        check_same_run(out, record_before, previous, RunIdentity(
            study=study_root, names=frozenset(i.name for i in study.items), model_sha256=loaded.sha256,
            settings=settings, frames=config.frames, anonymize=config.anonymize,
        ), config.force)
        todo, kept = plan_work(items, previous, out, masks, loaded.sha256, settings, config.force)
        current = {i.name for i in items}
        gone = [row for name, row in previous.items() if name not in current]
        by_name = {i.name: i for i in items}
        kept = {name: refresh_kept(row, by_name[name], config.pixel_size_mm, config.anonymize)
                for name, row in kept.items()}
        t_discover = time.time() - t0

        summary = RunSummary(out=out, found=len(items), skipped=len(kept), removed=len(gone), shard=config.shard)
        results: dict[str, ImageResult] = dict(kept)

        def record(done: RunSummary, status: str, error: str = "", timings: dict[str, float] | None = None) -> None:
            provenance = _provenance(
                config, study, loaded, device, done, start_iso, status, error, settings,
                timings or {"discover_s": t_discover, "total_s": time.time() - started},
            )
            folder.write_record(provenance.scrubbed(study.scrub) if study.anonymized else provenance)

        record(summary, STATUS_RUNNING)  # from here on, a folder left by a killed run says so
        folder.start([kept[i.name] for i in items if i.name in kept])
        # the report's ground truth; under --anonymize not at all (mask paths may name the patient)
        folder.write_truth_masks({} if config.anonymize else {i.name: i.truth_masks for i in items})
        folder.drop_masks(gone, {masks[i.name] for i in items})
        if gone:
            logger.info("%d images are no longer in the study: their rows and masks are dropped", len(gone))
        t0 = time.time()
        try:
            interrupted = _infer_and_write(config, loaded, todo, masks, settings, folder, results, stop, study,
                                           workers=workers)
        except BusiBatchError as err:
            message = str(err)
            _save_after_failure(folder, items, results, summary, lambda done: record(done, STATUS_FAILED, message))
            raise
        t_infer = time.time() - t0

        t0 = time.time()
        ordered = [results[i.name] for i in items if i.name in results]
        with ThreadPoolExecutor(max_workers=2) as pool:  # the new rows were scored as their masks were written
            ordered = list(pool.map(
                lambda r: as_written(scrub_row(_score_kept(r, by_name[r.image], out) if r.image in kept else r,
                                               study.scrub)),
                ordered,
            ))
        summary = replace(_counted(summary, ordered, len(results) - len(kept)), metrics=compute_metrics(ordered))
        folder.finish(ordered, summary.metrics)
        t_eval = time.time() - t0

        record(
            summary, STATUS_INTERRUPTED if interrupted else STATUS_COMPLETE, "",
            {"discover_s": t_discover, "inference_s": t_infer, "evaluate_s": t_eval,
             "total_s": time.time() - started},
        )
        summary = replace(summary, seconds=time.time() - started)
        if interrupted:
            raise RunInterrupted(
                f"stopped by {signal.Signals(stop.signal).name} after {summary.processed} images; "
                f"results so far are saved in {out}, run again to finish"
            )
        return summary


def _readable_record(out: Path) -> RunRecord | None:
    """The folder's run record, or None when there is none or it cannot be read (``check_same_run`` decides)."""
    try:
        return read_run_record(out)
    except BusiBatchError:
        return None


def _counted(summary: RunSummary, rows: list[ImageResult], processed: int) -> RunSummary:
    """The summary with the counts of ``rows``, ``processed`` of them done by this run."""
    error_rows = tuple((r.image, r.error) for r in rows if not r.ok)
    return replace(summary, processed=processed, ok=sum(r.ok for r in rows), errors=len(error_rows),
                   error_rows=error_rows)


def _save_after_failure(
    folder: RunFolder, items: list[ImageItem], results: dict[str, ImageResult], summary: RunSummary,
    record: Callable[[RunSummary], None],
) -> None:
    """Best effort after a fatal error: the CSV of what was done, run.json marked failed, and no temporary file
    left behind (an exception delivered by a signal handler, such as a dead decoding worker's, can interrupt a
    write between creating its temporary file and guarding it).

    Each may fail too (a full disk); the journal already holds every finished batch, so nothing done is lost.
    """
    rows = [results[i.name] for i in items if i.name in results]
    done = _counted(summary, rows, len(results) - summary.skipped)
    for action in (lambda: folder.write_rows(rows), lambda: record(done), folder.clear_temp_files):
        try:
            action()
        except BusiBatchError as err:
            logger.warning("could not save after the failure: %s", err)


def _infer_and_write(
    config: RunConfig, loaded: LoadedModel, todo: list[ImageItem], masks: dict[str, str], settings: str,
    folder: RunFolder, results: dict[str, ImageResult], stop: _StopFlag, study: Study | None = None,
    workers: int | None = None,
) -> bool:
    """Run the network over ``todo`` batch by batch, writing masks and rows; True if a signal stopped it.

    Batches are committed whole (``RunFolder.commit_rows``: masks made durable, then the rows journalled): the
    first at once, then the batches written meanwhile every ``COMMIT_EVERY_SECONDS`` (a ``syncfs`` cost 50-770 ms
    here, more on a busy disk), and at the end, at a stop and before each rewrite of the CSV. A row counts as done
    (``results``) only once committed: a kill or a fatal error loses at most the uncommitted batches, whose masks
    the next run rewrites. The stop flag is looked at before the first batch and after each batch: "stops after
    the current batch" exactly, whatever the moment the signal came. ``workers``: decoding processes (default:
    ``config.workers``).
    """
    if stop.requested:
        return True
    if not todo:
        return False
    last_flush = last_trim = time.time()
    last_commit = 0.0  # the first batch is committed at once, then at most every COMMIT_EVERY_SECONDS
    pending: list[ImageResult] = []

    def commit() -> None:
        """Masks written so far made durable, then their rows journalled and counted as done."""
        if pending:
            folder.commit_rows(pending)
            for row in pending:
                results[row.image] = row
            pending.clear()

    progress = tqdm(total=len(todo), unit="img", disable=not config.progress, leave=False, dynamic_ncols=True)
    batches = predict(loaded, todo, batch_size=config.batch_size,
                      workers=config.workers if workers is None else workers, tta=config.tta, with_truth=True)
    try:
        with closing(batches):  # on any exit the decoding workers are stopped now, not at GC time
            for batch in batches:
                rows = [_write_one(todo[pred.index], pred, loaded, masks, settings, folder, config, study)
                        for pred in batch]
                pending += rows
                progress.update(len(rows))
                flush = time.time() - last_flush > FLUSH_EVERY_SECONDS
                if flush or stop.requested or time.time() - last_commit >= COMMIT_EVERY_SECONDS:
                    commit()
                    last_commit = time.time()
                if flush:
                    folder.write_rows(sorted(results.values(), key=lambda r: r.image))
                    last_flush = time.time()
                if time.time() - last_trim > TRIM_EVERY_SECONDS:
                    release_free_memory()
                    last_trim = time.time()
                if stop.requested:
                    return True
            commit()
        return False
    except DecodingWorkerDied as err:
        if stop.requested:  # the signal reached a worker after all (another start method): the stop still holds
            logger.warning("the stop signal also reached a decoding worker; the batch in hand may be incomplete")
            return True
        raise BusiBatchError(
            f"a decoding worker process died ({' '.join(str(err).split())}); what was done is saved, "
            "run again to resume (or use --workers 0)"
        ) from err
    finally:
        progress.close()


def _write_one(
    item: ImageItem, pred: Prediction, loaded: LoadedModel, masks: dict[str, str], settings: str,
    folder: RunFolder, config: RunConfig, study: Study | None = None,
) -> ImageResult:
    """Mask file and row for one prediction, the row scored against the item's ground truth from the mask in memory.

    A name the output file system cannot take is this image's error.
    """
    row, mask = result_from_prediction(item, pred, loaded, masks[item.name], settings, config.pixel_size_mm,
                                       anonymize=config.anonymize)
    if mask is not None:
        try:
            folder.write_mask(row.mask, encode_mask_png(mask))
        except OutputWriteError as err:
            cause = err.__cause__
            if not (isinstance(cause, OSError) and cause.errno in _PER_FILE_ERRNOS):
                raise
            row = error_row(item, f"cannot write its mask: {cause.strerror or cause}", row.input_sha256,
                            row.model_sha256, row.settings, config.anonymize)
    row = _scored(row, item, mask, pred.truth_mask, pred.truth_error)
    if study is not None:
        row = scrub_row(row, study.scrub)
    if not row.ok:
        logger.warning("error: %s: %s", printable(item.name), row.error)
    return row


def _provenance(
    config: RunConfig, study: Study, loaded: LoadedModel, device: torch.device, summary: RunSummary,
    start_iso: str, status: str, error: str, settings: str, timings: dict[str, float],
) -> RunRecord:
    card = loaded.card
    return RunRecord(
        tool_version=__version__,
        status=status,
        error=error,
        started=start_iso,
        finished=None if status == STATUS_RUNNING else now_iso(),
        shard=str(config.shard) if config.shard else None,
        study_images=len(study.items),
        host=platform.node(),
        input=str(config.study.resolve()),
        output=str(summary.out),
        options={
            k: (str(v) if isinstance(v, (Path, Shard)) else v)
            for k, v in ((f.name, getattr(config, f.name)) for f in fields(config))
        },
        settings=settings,
        model=ModelRecord(
            name=card.name,
            version=card.version,
            weights=str(loaded.weights_path),
            sha256=loaded.sha256,
            test_model=card.test_model,
            warning=(
                "TEST MODEL: random or barely trained weights for software tests; predictions are meaningless"
                if card.test_model else ""
            ),
            temperature=card.temperature,
            threshold=card.threshold,
            mask_rules=card.mask_rules().key(),
            input_size=card.input_size,
            intended_use=card.intended_use,
            training_data=card.training_data,
            test_metrics=card.metrics,
        ),
        device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        precision=loaded.precision,
        platform={"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
                  "cpu_count": os.cpu_count()},
        counts=RunCounts(
            found=summary.found, processed=summary.processed, skipped_unchanged=summary.skipped,
            ok=summary.ok, error=summary.errors, removed_since_last_run=summary.removed,
            passed_over=len(study.skipped),
        ),
        passed_over=tuple(study.skipped),
        timings={k: round(v, 3) for k, v in timings.items()},
    )
