"""``busi-batch merge``: the output folders of ``--shard I/N`` runs -> one output folder, as one run would write it.

The merged folder holds what an unsharded run of the same study with the same model would have written: every
row (sorted by image path, the order of a run), the masks, ``metrics.json`` recomputed from the merged rows with
the same function a run uses, and a ``run.json`` with the provenance of every shard. It is also a valid folder
to resume: ``busi-batch run STUDY --out ALL`` afterwards only does what changed.

Merge refuses, naming the folder and the reason, rather than produce a plausible but wrong whole:

* a folder that is not a finished run (``run.json`` says running: killed or still going; interrupted; failed;
  or a journal is left), or whose CSV does not have one row per image the run found;
* folders made by different models (weights sha256) or with different settings (TTA, mask rules), or with
  different ``--frames`` / ``--anonymize`` (their image names would not describe one study);
* a mix of sharded and unsharded folders, shards of different N, the same shard twice, a missing shard, or shards
  that saw different studies (a different number of images in the whole study);
* the same image, or the same mask file, in two folders.

Each input folder is share-locked while it is read (a shard still running holds its exclusive lock and is
refused; nothing is written into an input folder), and the output folder is locked while it is written; every
file is written atomically.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BusiBatchError, ImageDecodeError, UsageError
from .imageio import atomic_write_bytes, read_bytes, remove_temp_files
from .pipeline import (
    CSV_NAME, JOURNAL_NAME, LOCK_NAME, METRICS_JSON, RUN_JSON, STATUS_COMPLETE, compute_metrics, output_lock,
)
from .records import ImageResult, printable, read_results_csv, write_json, write_results_csv
from .shard import Shard, missing_shards

log = logging.getLogger("busi_batch")


class MergeError(BusiBatchError):
    """The folders cannot be merged into one honest whole (exit code 1)."""


@dataclass
class ShardOutput:
    """One finished output folder, read back."""

    folder: Path
    run: dict[str, Any]
    rows: list[ImageResult]
    shard: Shard | None

    @property
    def model_sha256(self) -> str:
        return str((self.run.get("model") or {}).get("sha256", ""))

    @property
    def label(self) -> str:
        return f"{self.folder} (shard {self.shard})" if self.shard else str(self.folder)


@dataclass
class MergeSummary:
    """What merge wrote, for the exit code and the closing line."""

    out: Path
    folders: int
    found: int = 0
    ok: int = 0
    errors: int = 0
    masks_copied: int = 0
    seconds: float = 0.0
    metrics: dict[str, Any] | None = None
    error_rows: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.errors > 0

    def line(self) -> str:
        return (
            f"busi-batch merge: {self.folders} folders, {self.found} images, {self.ok} ok, {self.errors} errors "
            f"({self.masks_copied} masks copied) in {self.seconds:.1f} s -> {self.out}"
        )


@contextmanager
def _shared_lock(folder: Path) -> Iterator[None]:
    """A shared ``flock`` on a run folder's lock file, read-only: a run in progress (exclusive) refuses it.

    Read-only, so shard folders on a read-only mount merge too; a folder without a lock file was never locked.
    """
    path = folder / LOCK_NAME
    try:
        fh = open(path, "r")
    except FileNotFoundError:
        yield
        return
    except OSError as err:
        raise MergeError(f"{path}: cannot open: {err.strerror or err}") from err
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = " ".join(fh.read().split()) or "another process"
            raise MergeError(f"{folder}: a busi-batch run is still using this folder ({owner})") from None
        yield
    finally:
        fh.close()


def read_shard_output(folder: Path) -> ShardOutput:
    """Read a finished output folder; MergeError names the folder and why it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such output folder")
    run_json, csv_path = folder / RUN_JSON, folder / CSV_NAME
    for path in (run_json, csv_path):
        if not path.is_file():
            raise MergeError(f"{path}: missing; is {folder} the output folder of a finished busi-batch run?")
    try:
        run = json.loads(run_json.read_text(encoding="utf-8"))
        rows = read_results_csv(csv_path)
    except (OSError, ValueError, TypeError) as err:
        raise MergeError(f"{folder}: cannot read the run's files: {err}") from err
    if not isinstance(run, dict) or "model" not in run:
        raise MergeError(f"{run_json}: not a busi-batch run record")
    status = run.get("status", STATUS_COMPLETE if not run.get("interrupted") else "interrupted")
    if status != STATUS_COMPLETE:
        hint = {"running": "killed, or still running", "interrupted": "stopped by a signal",
                "failed": str(run.get("error") or "a fatal error")}.get(status, status)
        raise MergeError(f"{folder}: the run did not finish (status {status}: {hint}); run it again to finish")
    if (folder / JOURNAL_NAME).exists():
        raise MergeError(f"{folder}: a journal of an unfinished run is left; run it again to finish")
    found = (run.get("counts") or {}).get("found")
    if found is not None and int(found) != len(rows):
        raise MergeError(f"{csv_path}: {len(rows)} rows, but the run found {found} images")
    try:
        shard = Shard.parse(run["shard"]) if run.get("shard") else None
    except UsageError as err:
        raise MergeError(f"{run_json}: bad shard {run.get('shard')!r}") from err
    return ShardOutput(folder=folder, run=run, rows=rows, shard=shard)


def check_compatible(outputs: list[ShardOutput]) -> None:
    """MergeError unless the folders are disjoint parts of one study, made by one model with one setting."""
    first = outputs[0]
    for other in outputs[1:]:
        if other.model_sha256 != first.model_sha256:
            raise MergeError(
                f"made by different models: {first.label} used {first.model_sha256[:12]}, "
                f"{other.label} used {other.model_sha256[:12]} (weights sha256); rerun with one model"
            )
    for out in outputs:
        for row in out.rows:
            if row.model_sha256 and row.model_sha256 != first.model_sha256:
                raise MergeError(
                    f"{out.folder}: row {printable(row.image)} was made by model {row.model_sha256[:12]}, "
                    f"not {first.model_sha256[:12]}"
                )
    for option, default in (("frames", "first"), ("anonymize", False)):  # a run.json before DICOM: the defaults
        used = {str((o.run.get("options") or {}).get(option, default)) for o in outputs}
        if len(used) > 1:
            raise MergeError(
                f"made with different --{option} ({' vs '.join(sorted(used))}); rerun with the same options"
            )
    settings = {(o.folder, r.settings) for o in outputs for r in o.rows if r.settings}
    if len({s for _, s in settings}) > 1:
        found = sorted({s for _, s in settings})
        raise MergeError(f"made with different settings ({' vs '.join(found)}); rerun with the same options")
    sharded = [o for o in outputs if o.shard]
    if sharded and len(sharded) != len(outputs):
        plain = next(o for o in outputs if not o.shard)
        raise MergeError(f"{plain.folder} is not a shard, but {sharded[0].label} is: merge shards of one study")
    if sharded:
        counts = {o.shard.count for o in sharded}
        if len(counts) > 1:
            raise MergeError(f"shards of different N: {', '.join(o.label for o in sharded)}")
        seen: dict[int, ShardOutput] = {}
        for o in sharded:
            if o.shard.index in seen:
                raise MergeError(f"shard {o.shard} twice: {seen[o.shard.index].folder} and {o.folder}")
            seen[o.shard.index] = o
        missing = missing_shards([o.shard for o in sharded])
        if missing:
            n = sharded[0].shard.count
            raise MergeError(f"shards missing: {', '.join(f'{i}/{n}' for i in missing)}; merge all {n} shards")
        totals = {o.run.get("study_images") for o in sharded}
        if len(totals) > 1:
            raise MergeError(
                "shards saw different studies (images in the whole study: "
                + ", ".join(f"{o.label}: {o.run.get('study_images')}" for o in sharded)
                + "); run every shard on the same study"
            )
    owner: dict[str, Path] = {}
    mask_owner: dict[str, Path] = {}
    for o in outputs:
        for row in o.rows:
            if row.image in owner:
                raise MergeError(f"image {printable(row.image)} is in both {owner[row.image]} and {o.folder}")
            owner[row.image] = o.folder
            if row.ok and row.mask:
                if row.mask in mask_owner:
                    raise MergeError(f"mask {printable(row.mask)} is in both {mask_owner[row.mask]} and {o.folder}")
                mask_owner[row.mask] = o.folder


def merge_outputs(folders: list[Path], out: Path) -> MergeSummary:
    """Merge finished output folders into ``out``; raises UsageError / MergeError with a one-line reason."""
    started = time.time()
    folders = [Path(f) for f in folders]
    if not folders:
        raise UsageError("merge needs at least one output folder")
    out = Path(out)
    out_r = out.resolve()
    for folder in folders:
        if out_r == folder.resolve() or out_r.is_relative_to(folder.resolve()):
            raise UsageError(f"{out}: the merged folder may not be, or be inside, an input folder ({folder})")
    if len({f.resolve() for f in folders}) != len(folders):
        raise UsageError("the same output folder is given twice")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BusiBatchError(f"{out}: cannot create output folder: {err.strerror or err}") from err
    with ExitStack() as stack:
        for folder in folders:
            if not folder.is_dir():
                raise UsageError(f"{folder}: no such output folder")
            stack.enter_context(_shared_lock(folder))  # a shard still running holds its lock: refused
        stack.enter_context(output_lock(out))
        outputs = [read_shard_output(f) for f in folders]
        check_compatible(outputs)
        remove_temp_files(out)
        rows = sorted((r for o in outputs for r in o.rows), key=lambda r: r.image)
        summary = MergeSummary(out=out_r, folders=len(outputs), found=len(rows))
        for o in outputs:
            summary.masks_copied += _copy_masks(o, out)
        summary.metrics = compute_metrics(rows)
        write_results_csv(out / CSV_NAME, rows)
        if summary.metrics is not None:
            write_json(out / METRICS_JSON, summary.metrics)
        elif (out / METRICS_JSON).exists():
            (out / METRICS_JSON).unlink()
        if (out / JOURNAL_NAME).exists():
            (out / JOURNAL_NAME).unlink()
        summary.ok = sum(r.ok for r in rows)
        summary.error_rows = [(r.image, r.error) for r in rows if not r.ok]
        summary.errors = len(summary.error_rows)
        summary.seconds = time.time() - started
        write_json(out / RUN_JSON, merged_provenance(outputs, summary))
    return summary


def _copy_masks(output: ShardOutput, out: Path) -> int:
    """Copy the shard's mask files (atomically); an identical file already there is left alone."""
    copied = 0
    for row in output.rows:
        if not (row.ok and row.mask):
            continue
        try:
            data = read_bytes(output.folder / row.mask)
        except ImageDecodeError as err:
            raise MergeError(f"{output.folder / row.mask}: mask of {printable(row.image)} unusable: {err}") from err
        target = out / row.mask
        try:
            if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
                continue
        except OSError:
            pass
        atomic_write_bytes(target, data)
        copied += 1
    return copied


def merged_provenance(outputs: list[ShardOutput], summary: MergeSummary) -> dict[str, Any]:
    """``run.json`` of the merged folder: the keys a run writes (so the report reads it), plus each shard's."""
    first = outputs[0].run
    inputs = [str(o.run.get("input", "")) for o in outputs]
    passed: dict[str, str] = {}
    for o in outputs:
        for entry in o.run.get("passed_over") or []:
            passed.setdefault(entry["path"], entry["reason"])
    options = dict(first.get("options") or {})
    options.pop("shard", None)
    counts = [o.run.get("counts") or {} for o in outputs]
    return {
        "tool": "busi-batch",
        "tool_version": __version__,
        "status": STATUS_COMPLETE,
        "error": "",
        "merged": True,
        "started": min(str(o.run.get("started", "")) for o in outputs),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "interrupted": False,
        "shard": None,
        "study_images": first.get("study_images"),
        "input": inputs[0],
        "inputs": sorted(set(inputs)),
        "output": str(summary.out),
        "options": options,
        "model": first.get("model"),
        "device": ", ".join(sorted({str(o.run.get("device", "")) for o in outputs})),
        "platform": first.get("platform"),
        "counts": {
            "found": summary.found,
            "processed": sum(int(c.get("processed", 0)) for c in counts),
            "skipped_unchanged": sum(int(c.get("skipped_unchanged", 0)) for c in counts),
            "ok": summary.ok,
            "error": summary.errors,
            "removed_since_last_run": sum(int(c.get("removed_since_last_run", 0)) for c in counts),
            "passed_over": len(passed),
        },
        "passed_over": [{"path": p, "reason": r} for p, r in sorted(passed.items())],
        "timings": {"merge_s": round(summary.seconds, 3),
                    "total_s": round(sum(float((o.run.get("timings") or {}).get("total_s", 0)) for o in outputs), 3)},
        "merged_from": [
            {
                "folder": str(o.folder.resolve()),
                "shard": str(o.shard) if o.shard else None,
                "host": o.run.get("host"),
                "input": o.run.get("input"),
                "device": o.run.get("device"),
                "started": o.run.get("started"),
                "finished": o.run.get("finished"),
                "tool_version": o.run.get("tool_version"),
                "counts": o.run.get("counts"),
            }
            for o in outputs
        ],
    }
