"""The output folder: its format and its ownership. The only module that knows what a run folder holds.

A run folder holds ``predictions.csv``, ``run.json``, ``metrics.json`` (with ground truth), ``ground_truth.json``
(with ground-truth masks: each image's mask files, for the report; never under ``--anonymize``), ``masks/``, and
busi-batch's own state: the lock file ``.busi-batch.lock``, the journal ``.predictions.journal`` of an unfinished
run, and the folder ``.busi-batch/`` (its temporary files, ``.busi-batch/tmp/``); ``busi-batch report`` adds the
pictures of a report in ``report_assets/``.

Ownership: busi-batch writes only into a new or empty folder, or into a folder it recognises as its own (a
``run.json`` it wrote, its state folder, or its lock file). Any other non-empty folder is refused
(:class:`~busi_batch.errors.OutputFolderRefused`, exit code 5) before anything is written into it. In its own
folder, a run of another study, another model or other settings is refused too, unless ``--force``; the message
says what would be replaced (:func:`check_same_run`).

Temporary files are made only in ``.busi-batch/tmp/`` under names only busi-batch makes, and clean-up looks in
that folder and nowhere else. Every commit is durable: a file and the folder it is renamed into are fsynced, and a
batch of masks is made durable by one ``syncfs`` before its rows are journalled.

``run.json`` is a :class:`RunRecord`: :meth:`RunFolder.write_record` is its one writer and
:func:`read_run_record` its one reader (pipeline, merge and report all use them).

Consistency at every instant (:meth:`RunFolder.start`): before a run writes its first mask, the rows it is about
to redo leave ``predictions.csv`` and the journal, and ``metrics.json`` goes; a row is appended to the journal
only after its mask is in place. So whatever moment a run is killed at, every row the folder holds describes the
mask beside it, and ``run.json`` says ``running`` until the run has finished.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import platform
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .dicom import frame_name, split_frame_name
from .discover import ImageItem, truth_stem
from .errors import BusiBatchError, ImageDecodeError, OutputFolderRefused, OutputWriteError, UsageError
from .imageio import append_bytes, atomic_write_bytes, fsync_dir, read_bytes, remove_temp_files, sync_filesystem
from .records import (
    ImageResult, journal_lines, printable, read_journal, read_results_csv, write_json, write_results_csv,
)
from .shard import Shard

log = logging.getLogger("busi_batch")

CSV_NAME = "predictions.csv"
RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
TRUTH_JSON = "ground_truth.json"
LOCK_NAME = ".busi-batch.lock"
JOURNAL_NAME = ".predictions.journal"
MASKS_DIR = "masks"
STATE_DIR = ".busi-batch"
TEMP_DIR = f"{STATE_DIR}/tmp"
TOOL = "busi-batch"
#: Longest file name most file systems take (bytes); longer mask names are shortened with a hash.
NAME_MAX = 255
MASK_SUFFIX = "_mask.png"

STATUS_RUNNING, STATUS_COMPLETE, STATUS_INTERRUPTED, STATUS_FAILED = "running", "complete", "interrupted", "failed"


# ------------------------------------------------------------------------------------------------ run.json


@dataclass(frozen=True)
class ModelRecord:
    """The model a run used, as ``run.json`` records it."""

    name: str = ""
    version: str = ""
    weights: str = ""
    sha256: str = ""
    test_model: bool = False
    warning: str = ""
    temperature: float | None = None
    threshold: float | None = None
    mask_rules: str = ""
    input_size: int | None = None
    intended_use: str = ""
    training_data: str = ""
    test_metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunCounts:
    found: int = 0
    processed: int = 0
    skipped_unchanged: int = 0
    ok: int = 0
    error: int = 0
    removed_since_last_run: int = 0
    passed_over: int = 0


@dataclass(frozen=True)
class RunRecord:
    """``run.json``: what made the folder's results, and whether the run finished.

    ``settings`` is the resume key of the results (mask rules, TTA, precision); empty in a record an older version
    wrote, whose rows then say it. ``merged_from`` and ``inputs`` are set for the output of ``busi-batch merge``.
    """

    status: str
    input: str
    output: str
    model: ModelRecord
    tool_version: str = ""
    error: str = ""
    started: str = ""
    finished: str | None = None
    shard: str | None = None
    study_images: int | None = None
    host: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    settings: str = ""
    device: str = ""
    precision: str = ""
    platform: Mapping[str, Any] = field(default_factory=dict)
    counts: RunCounts = field(default_factory=RunCounts)
    passed_over: tuple[tuple[str, str], ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    merged: bool = False
    inputs: tuple[str, ...] = ()
    merged_from: tuple[Mapping[str, Any], ...] = ()

    @property
    def interrupted(self) -> bool:
        return self.status == STATUS_INTERRUPTED

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value

    def scrubbed(self, scrub: Callable[[str], str]) -> "RunRecord":
        """The record with every free text and path passed through ``scrub`` (``--anonymize``: folder names often
        name the patient). Status, model hash, settings and counts are left as they are: they are no identifiers,
        and the next run and merge must read them back."""
        return replace(
            self,
            input=scrub(self.input), output=scrub(self.output), error=scrub(self.error),
            options={k: scrub(v) if isinstance(v, str) else v for k, v in self.options.items()},
            model=replace(self.model, weights=scrub(self.model.weights)),
            passed_over=tuple((scrub(p), scrub(r)) for p, r in self.passed_over),
            host=scrub(self.host),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in the order people read them."""
        data: dict[str, Any] = {
            "tool": TOOL, "tool_version": self.tool_version, "status": self.status, "error": self.error,
        }
        if self.merged:
            data["merged"] = True
        data.update({
            "started": self.started, "finished": self.finished, "interrupted": self.interrupted,
            "shard": self.shard, "study_images": self.study_images, "host": self.host, "input": self.input,
        })
        if self.merged:
            data["inputs"] = list(self.inputs)
        data.update({
            "output": self.output, "options": dict(self.options), "settings": self.settings,
            "model": {**asdict(self.model), "test_metrics": dict(self.model.test_metrics)},
            "device": self.device, "precision": self.precision, "platform": dict(self.platform),
            "counts": asdict(self.counts),
            "passed_over": [{"path": p, "reason": r} for p, r in self.passed_over],
            "timings": dict(self.timings),
        })
        if self.merged:
            data["merged_from"] = [dict(m) for m in self.merged_from]
        return data

    @classmethod
    def from_json(cls, data: Any) -> "RunRecord":
        """Parse ``run.json``; ValueError when it is not a busi-batch run record. Keys an older version did not
        write take their defaults."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "input" not in data:
            raise ValueError("not a busi-batch run record")
        model = data["model"]
        known = ModelRecord.__dataclass_fields__
        counts = data.get("counts") or {}
        status = data.get("status") or (STATUS_INTERRUPTED if data.get("interrupted") else STATUS_COMPLETE)
        return cls(
            status=str(status), input=str(data["input"]), output=str(data.get("output", "")),
            model=ModelRecord(**{k: v for k, v in model.items() if k in known and v is not None}),
            tool_version=str(data.get("tool_version", "")), error=str(data.get("error") or ""),
            started=str(data.get("started") or ""), finished=data.get("finished"),
            shard=str(data["shard"]) if data.get("shard") else None, study_images=data.get("study_images"),
            host=str(data.get("host", "")), options=dict(data.get("options") or {}),
            settings=str(data.get("settings") or ""), device=str(data.get("device", "")),
            precision=str(data.get("precision") or ""), platform=dict(data.get("platform") or {}),
            counts=RunCounts(**{k: int(v) for k, v in counts.items() if k in RunCounts.__dataclass_fields__}),
            passed_over=tuple((str(p["path"]), str(p["reason"])) for p in data.get("passed_over") or []),
            timings={k: float(v) for k, v in (data.get("timings") or {}).items()},
            merged=bool(data.get("merged", False)), inputs=tuple(data.get("inputs") or ()),
            merged_from=tuple(data.get("merged_from") or ()),
        )


def read_run_record(folder: Path) -> RunRecord:
    """The ``run.json`` of ``folder``; BusiBatchError names the file and why it is no run record."""
    path = Path(folder) / RUN_JSON
    try:
        return RunRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as err:
        raise BusiBatchError(f"{path}: missing; is {folder} a busi-batch output folder?") from err
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BusiBatchError(f"{path}: not a busi-batch run record ({type(err).__name__}: {err})") from err


def read_truth_masks(folder: Path) -> dict[str, tuple[Path, ...]]:
    """The ground-truth mask files per image (its CSV ``image`` name) that ``ground_truth.json`` records; empty
    when the folder has none. BusiBatchError names the file when it is unreadable."""
    path = Path(folder) / TRUTH_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise BusiBatchError(f"{path}: cannot read: {err}") from err
    masks = data.get("truth_masks") if isinstance(data, dict) else None
    if not isinstance(masks, dict):
        raise BusiBatchError(f"{path}: not a busi-batch ground-truth record")
    return {str(name): tuple(Path(p) for p in paths) for name, paths in masks.items()}


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ ownership


def is_own_folder(out: Path) -> bool:
    """Whether ``out`` holds busi-batch's marks: its run record, its state folder or its lock file."""
    if (out / STATE_DIR).is_dir() or (out / LOCK_NAME).is_file():
        return True
    try:
        data = json.loads((out / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("tool") == TOOL


def claim(out: Path) -> None:
    """Create ``out`` if needed; OutputFolderRefused if it is a non-empty folder busi-batch did not make.

    Nothing is written into a refused folder.
    """
    if out.exists() and not out.is_dir():
        raise OutputFolderRefused(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir():
        try:
            entries = sorted(os.listdir(out))
        except OSError as err:
            raise BusiBatchError(f"{out}: cannot read the output folder: {err.strerror or err}") from err
        if entries and not is_own_folder(out):
            shown = ", ".join(printable(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputFolderRefused(
                f"{out}: not empty and not a busi-batch output folder (it holds {shown}); busi-batch writes only "
                "into a new or empty folder or its own earlier output: choose another --out"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BusiBatchError(f"{out}: cannot create output folder: {err.strerror or err}") from err


@dataclass(frozen=True)
class RunIdentity:
    """What decides whether a run may write over a folder's results: study, model, settings."""

    study: Path
    names: frozenset[str]
    model_sha256: str
    settings: str
    frames: str
    anonymize: bool


def same_study(previous: RunRecord, previous_names: set[str], study: Path, names: frozenset[str]) -> bool:
    """Whether this run's study is, as a user sees it, the one the folder's results came from.

    The same folder (by path, or by identity: a symbolic link, another mount of it), or a study holding at least
    half of the images the folder has results for (a study that was moved or copied; a nightly study that gained
    or lost a few images).
    """
    before = Path(previous.input)
    if before == study:
        return True
    try:
        if before.exists() and os.path.samefile(before, study):
            return True
    except OSError:
        pass
    return bool(previous_names) and 2 * len(previous_names & names) >= len(previous_names)


def check_same_run(
    out: Path, previous: RunRecord | None, rows: Mapping[str, ImageResult], this: RunIdentity, force: bool,
) -> None:
    """OutputFolderRefused unless ``--force`` when this run would replace results of another study, model or
    settings; the message names what would be replaced. A folder with no results yet is never refused."""
    if force or not rows:
        return
    masks = sum(1 for r in rows.values() if r.ok and r.mask)
    what = f"{len(rows)} results ({masks} masks, {CSV_NAME}, {METRICS_JSON})"
    reasons = []
    source = previous.input if previous else "an unknown study"
    if previous is None:
        reasons.append(f"its {RUN_JSON} is missing or unreadable")
    else:
        if not same_study(previous, set(rows), this.study, this.names):
            reasons.append(f"this run is of another study, {this.study}")
        if previous.model.sha256 and previous.model.sha256 != this.model_sha256:
            reasons.append(f"made by model {previous.model.sha256[:12]}, this run uses {this.model_sha256[:12]}")
        settings = previous.settings or next((r.settings for r in rows.values() if r.settings), "")
        if settings and settings != this.settings:
            reasons.append(f"made with settings {settings}, this run uses {this.settings}")
        for option, default, now in (("frames", "first", this.frames), ("anonymize", False, this.anonymize)):
            before = previous.option(option, default)
            if str(before) != str(now):
                reasons.append(f"made with --{option} {before}, this run uses {now}")
    if reasons:
        raise OutputFolderRefused(
            f"{out} holds {what} of {source}; {'; '.join(reasons)}: this run would replace them all. "
            "Use --force to replace them, or another --out"
        )


def previous_shard(record: RunRecord | None) -> str | None:
    return record.shard if record is not None else None


def check_shard_matches(out: Path, record: RunRecord | None, shard: Shard | None, has_rows: bool, force: bool) -> None:
    """Refuse to reuse a folder holding another shard's results: its rows would be dropped as 'removed'."""
    if force or not has_rows:
        return
    before, now = previous_shard(record), (str(shard) if shard else None)
    if before != now:
        raise UsageError(
            f"{out} holds the results of {'shard ' + before if before else 'an unsharded run'}, "
            f"this run is {'shard ' + now if now else 'unsharded'}: use one output folder per shard "
            "(then busi-batch merge), or --force to replace them"
        )


# ------------------------------------------------------------------------------------------------ the lock

_held_locks: set[int] = set()
_fork_hook_installed = False


def _release_in_child() -> None:
    """In a forked child (a decoding worker): drop its copy of each held lock's descriptor.

    An ``flock`` belongs to the open file description, which a fork shares: a worker that outlived a killed main
    process would hold the folder's lock, and an immediate rerun would be refused. ``dup2`` of /dev/null over the
    descriptor drops the child's reference without freeing the number for reuse behind Python's back. (It runs
    as the child starts; a decoding worker also dies with its parent, ``loader.die_with_parent``.)
    """
    if not _held_locks:
        return
    null = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        for fd in _held_locks:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
    finally:
        os.close(null)
    _held_locks.clear()


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the output folder, held by this process only (never by a forked child); the
    kernel drops it when the process dies, however it dies.

    The lock file keeps the holder's pid, host and start time, for the second run's message; a stale text
    left by a killed run is harmless, because the lock itself went with the process.
    """
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_release_in_child)
        _fork_hook_installed = True
    path = out / LOCK_NAME
    try:
        fh = open(path, "a+")
    except OSError as err:
        raise BusiBatchError(f"{path}: cannot create the lock file: {err.strerror or err}") from err
    try:
        owner = _try_flock(fh, fcntl.LOCK_EX)
        if owner is not None:
            raise BusiBatchError(
                f"{out}: another busi-batch run is using this output folder ({owner}); "
                "wait for it to finish, or use another --out"
            )
        _held_locks.add(fh.fileno())
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {platform.node()} since {now_iso()}")
        fh.flush()
        yield
    finally:
        _held_locks.discard(fh.fileno())
        fh.close()


def _try_flock(fh: Any, mode: int) -> str | None:
    """Take ``mode`` (``LOCK_EX`` / ``LOCK_SH``) on the lock file without waiting: None, or the holder's line."""
    try:
        fcntl.flock(fh, mode | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        fh.seek(0)
        return " ".join(fh.read().split()) or "another process"


@contextmanager
def shared_lock(folder: Path) -> Iterator[None]:
    """A shared ``flock`` on a run folder's lock file, read-only: a run in progress (exclusive) refuses it.

    Read-only, so folders on a read-only mount can be read under it; a folder without a lock file was never locked.
    """
    path = folder / LOCK_NAME
    try:
        fh = open(path, "r")
    except FileNotFoundError:
        yield
        return
    except OSError as err:
        raise BusiBatchError(f"{path}: cannot open: {err.strerror or err}") from err
    try:
        owner = _try_flock(fh, fcntl.LOCK_SH)
        if owner is not None:
            raise BusiBatchError(f"{folder}: a busi-batch run is still using this folder ({owner})")
        yield
    finally:
        fh.close()


# ------------------------------------------------------------------------------------------------ mask names


def _collision_key(rel: str) -> str:
    """Two mask paths with one key would be one file on some file system (case-insensitive, Unicode-normalising)."""
    return unicodedata.normalize("NFC", rel).casefold()


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", errors="surrogateescape")).hexdigest()[:16]


def mask_relpaths(items: list[ImageItem]) -> dict[str, str]:
    """``masks/<name without extension>_mask.png`` per item, keyed by the item's name (the CSV ``image``); distinct
    items always get distinct mask files, also on a case-insensitive or Unicode-normalising file system.

    When names would collide (``a.png`` and ``a.jpg``; ``a.png`` and ``a.png.png``; ``A.png`` and ``a.png``; NFC
    and NFD spellings), each of them gets ``~<hash of its full name>`` instead, repeated until no two keys meet.
    A DICOM frame's mask is ``<file>#<frame>_mask.png`` (report pages link by number, never by this name), and
    only a ``.dcm``-like extension is dropped from a DICOM name (a UID-named file keeps its dots). Under
    ``--anonymize`` the name is the pseudonym, so no mask path carries a patient identifier. Computed over the
    whole study, before any sharding, so a mask's name never depends on the shard. A name longer than the file
    system takes (255 bytes) is cut and made unique with a hash of the full name.
    """
    def stem(item: ImageItem) -> str:
        base, frame = split_frame_name(item.name) if item.is_dicom else (item.name, None)
        return frame_name(truth_stem(base, item.is_dicom), frame)

    names = {item.name: stem(item) for item in items}
    hashed: set[str] = set()
    while True:
        paths = {name: _mask_path(name, base, name in hashed) for name, base in names.items()}
        groups: dict[str, list[str]] = defaultdict(list)
        for name, rel in paths.items():
            groups[_collision_key(rel)].append(name)
        clashing = {n for group in groups.values() if len(group) > 1 for n in group if n not in hashed}
        if not clashing:
            return paths
        hashed |= clashing


def _mask_path(name: str, base: str, hashed: bool) -> str:
    return f"{MASKS_DIR}/{_fit_name(f'{base}~{_digest(name)}' if hashed else base)}{MASK_SUFFIX}"


def _fit_name(base: str) -> str:
    """``dir/name`` with ``name`` shortened, if needed, so that ``name + "_mask.png"`` fits in NAME_MAX bytes."""
    folder, name = os.path.split(base)
    raw = name.encode("utf-8", errors="surrogateescape")
    if len(raw) + len(MASK_SUFFIX) <= NAME_MAX:
        return base
    digest = _digest(base)
    keep = raw[: NAME_MAX - len(MASK_SUFFIX) - len(digest) - 1].decode("utf-8", errors="ignore")
    short = f"{keep}~{digest}"
    return f"{folder}/{short}" if folder else short


# ------------------------------------------------------------------------------------------------ resume plan


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(read_bytes(path)).hexdigest()
    except ImageDecodeError:
        return None


def previous_rows(out: Path) -> dict[str, ImageResult]:
    """The last known row per image: ``predictions.csv``, then the journal of a run that did not finish."""
    rows: dict[str, ImageResult] = {}
    csv_path = out / CSV_NAME
    if csv_path.is_file():
        try:
            rows = {row.image: row for row in read_results_csv(csv_path)}
        except (OSError, ValueError, TypeError) as err:
            log.warning("%s: previous results unreadable (%s); every image is redone", csv_path, err)
    try:
        journal = read_journal(out / JOURNAL_NAME)
    except OSError as err:
        log.warning("%s: unreadable (%s); the images it recorded are redone", out / JOURNAL_NAME, err)
        journal = []
    for row in journal:
        rows[row.image] = row
    return rows


def plan_work(
    items: list[ImageItem], previous: dict[str, ImageResult], out: Path, masks: dict[str, str],
    model_sha: str, settings: str, force: bool,
) -> tuple[list[ImageItem], dict[str, ImageResult]]:
    """Split items into those to (re)do and the previous rows that stay valid (keyed by the item's name).

    A row stays valid when it is ``ok`` for the same content (sha256, not modification time), model, settings,
    mask name and DICOM frame (a row an older version wrote for a file has no frame), and its mask file exists.
    Each file is hashed once, however many frames it gives.
    """
    todo, kept = [], {}
    hashes: dict[Path, str | None] = {}

    def sha256_of(path: Path) -> str | None:
        if path not in hashes:
            hashes[path] = file_sha256(path)
        return hashes[path]

    for item in items:
        row = previous.get(item.name)
        if (
            not force and row is not None and row.ok and row.model_sha256 == model_sha and row.settings == settings
            and row.mask == masks[item.name] and row.frame == item.frame and (out / row.mask).is_file()
            and sha256_of(item.path) == row.input_sha256
        ):
            kept[item.name] = row
        else:
            todo.append(item)
    return todo, kept


# ------------------------------------------------------------------------------------------------ writing


class RunFolder:
    """Writes into one output folder, all of them atomic and durable, temporaries only in ``.busi-batch/tmp``."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.temp_dir = self.out / TEMP_DIR

    def prepare(self) -> int:
        """Create the state folder (marking the folder as busi-batch's own) and clear the temporaries a killed
        write left there; returns how many. Call under the lock."""
        try:
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputWriteError(f"{self.temp_dir}: cannot create: {err.strerror or err}") from err
        return remove_temp_files(self.temp_dir)

    def clear_temp_files(self) -> int:
        """Remove the temporaries in ``.busi-batch/tmp`` (only busi-batch writes there, and only under the lock)."""
        return remove_temp_files(self.temp_dir)

    def write_record(self, record: RunRecord) -> None:
        """The one writer of ``run.json``."""
        write_json(self.out / RUN_JSON, record.to_json(), temp_dir=self.temp_dir)

    def write_rows(self, rows: list[ImageResult]) -> None:
        write_results_csv(self.out / CSV_NAME, rows, temp_dir=self.temp_dir)

    def write_metrics(self, metrics: dict[str, Any] | None) -> None:
        """``metrics.json``, or none at all when no row had ground truth (an old one would mislead)."""
        if metrics is None:
            self.remove(METRICS_JSON)
        else:
            write_json(self.out / METRICS_JSON, metrics, temp_dir=self.temp_dir)

    def write_truth_masks(self, masks: Mapping[str, Sequence[Path]]) -> None:
        """``ground_truth.json``: the ground-truth mask files (as absolute paths) of each image that has any, so the
        report never looks for them again; none at all when no image has one."""
        recorded = {name: [os.path.abspath(p) for p in paths] for name, paths in masks.items() if paths}
        if recorded:
            write_json(self.out / TRUTH_JSON, {"truth_masks": recorded}, temp_dir=self.temp_dir)
        else:
            self.remove(TRUTH_JSON)

    def write_mask(self, rel: str, data: bytes) -> None:
        """A mask file, atomic but not yet durable: :meth:`commit_rows` follows every batch of masks."""
        atomic_write_bytes(self.out / rel, data, temp_dir=self.temp_dir, durable=False)

    def commit_rows(self, rows: list[ImageResult]) -> None:
        """Commit a batch: its mask files (and the journal lines of earlier batches) are made durable by one
        ``syncfs``, then its rows are journalled. A row is never durable before its mask; a journal line lost to a
        power cut only means that batch is redone. (One fsync per mask file cost about 50 ms each here.)"""
        self.sync()
        append_bytes(self.out / JOURNAL_NAME, journal_lines(rows), sync=False)

    def sync(self) -> None:
        """Make every file written with :meth:`write_mask` so far durable."""
        try:
            sync_filesystem(self.out)
        except OSError as err:
            raise OutputWriteError(f"{self.out}: cannot commit the written files: {err.strerror or err}") from err

    def start(self, kept: list[ImageResult]) -> None:
        """Before the first mask of a run: the folder holds only the rows that stay valid (no journal, no stale
        ``metrics.json``), so no row can ever describe a mask this run rewrites."""
        self.write_rows(kept)
        self.remove(JOURNAL_NAME)
        self.remove(METRICS_JSON)

    def finish(self, rows: list[ImageResult], metrics: dict[str, Any] | None) -> None:
        """The final CSV and metrics; the journal goes, for every row it held is in the CSV now."""
        self.write_rows(rows)
        self.write_metrics(metrics)
        self.remove(JOURNAL_NAME)

    def drop_masks(self, gone: list[ImageResult], in_use: set[str]) -> None:
        """Delete the mask files of rows whose image left the study; only files under ``masks/``, and none that a
        current image uses."""
        for row in gone:
            mask = row.mask
            if mask and mask not in in_use and mask.startswith(f"{MASKS_DIR}/") and ".." not in Path(mask).parts:
                self.remove(mask)

    def remove(self, rel: str) -> None:
        path = self.out / rel
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as err:
            raise OutputWriteError(f"{path}: cannot remove: {err.strerror or err}") from err
        try:
            fsync_dir(path.parent)
        except OSError as err:
            raise OutputWriteError(f"{path}: cannot remove: {err.strerror or err}") from err

