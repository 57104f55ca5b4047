"""``busi-batch merge``: the output folders of ``--shard I/N`` runs -> one output folder, as one run would write it.

The merged folder holds what an unsharded run of the same study with the same model would have written: every
row (sorted by image path, the order of a run), the masks, the shards' ``ground_truth.json`` joined,
``metrics.json`` recomputed from the merged rows with the same function a run uses, and a ``run.json`` with the
provenance of every shard. It is also a valid folder to resume: ``busi-batch run STUDY --out ALL`` afterwards
only does what changed.

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

import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BusiBatchError, ImageDecodeError, UsageError
from .imageio import read_bytes
from .metrics import compute_metrics
from .records import ImageResult, printable, read_results_csv
from .runfolder import (
    CSV_NAME, JOURNAL_NAME, RUN_JSON, STATUS_COMPLETE, RunCounts, RunFolder, RunRecord, claim, now_iso,
    output_lock, read_run_record, read_truth_masks, shared_lock,
)
from .shard import Shard, missing_shards

logger = logging.getLogger(__name__)


class MergeError(BusiBatchError):
    """The folders cannot be merged into one honest whole (exit code 1)."""


@dataclass
class ShardOutput:
    """One finished output folder, read back."""

    folder: Path
    run: RunRecord
    rows: list[ImageResult]
    shard: Shard | None

    @property
    def model_sha256(self) -> str:
        return self.run.model.sha256

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
        run = read_run_record(folder)
    except BusiBatchError as err:
        raise MergeError(str(err)) from err
    try:
        rows = read_results_csv(csv_path)
    except (OSError, ValueError, TypeError) as err:
        raise MergeError(f"{folder}: cannot read the run's files: {err}") from err
    status = run.status
    if status != STATUS_COMPLETE:
        hint = {"running": "killed, or still running", "interrupted": "stopped by a signal",
                "failed": run.error or "a fatal error"}.get(status, status)
        raise MergeError(f"{folder}: the run did not finish (status {status}: {hint}); run it again to finish")
    if (folder / JOURNAL_NAME).exists():
        raise MergeError(f"{folder}: a journal of an unfinished run is left; run it again to finish")
    found = run.counts.found
    if found != len(rows):
        raise MergeError(f"{csv_path}: {len(rows)} rows, but the run found {found} images")
    try:
        shard = Shard.parse(run.shard) if run.shard else None
    except UsageError as err:
        raise MergeError(f"{run_json}: bad shard {run.shard!r}") from err
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
        used = {str(o.run.option(option, default)) for o in outputs}
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
        totals = {o.run.study_images for o in sharded}
        if len(totals) > 1:
            raise MergeError(
                "shards saw different studies (images in the whole study: "
                + ", ".join(f"{o.label}: {o.run.study_images}" for o in sharded)
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
    claim(out)
    target = RunFolder(out)
    with ExitStack() as stack:
        for folder in folders:
            if not folder.is_dir():
                raise UsageError(f"{folder}: no such output folder")
            stack.enter_context(shared_lock(folder))  # a shard still running holds its lock: refused
        stack.enter_context(output_lock(out))
        outputs = [read_shard_output(f) for f in folders]
        check_compatible(outputs)
        target.prepare()
        rows = sorted((r for o in outputs for r in o.rows), key=lambda r: r.image)
        summary = MergeSummary(out=out_r, folders=len(outputs), found=len(rows))
        target.start([])  # no row of an earlier merge may describe a mask copied over it
        for o in outputs:
            summary.masks_copied += _copy_masks(o, target)
        target.sync()  # every mask durable before the rows that describe them
        summary.metrics = compute_metrics(rows)
        target.finish(rows, summary.metrics)
        target.write_truth_masks(dict(sorted(
            (name, paths) for o in outputs for name, paths in read_truth_masks(o.folder).items())))
        summary.ok = sum(r.ok for r in rows)
        summary.error_rows = [(r.image, r.error) for r in rows if not r.ok]
        summary.errors = len(summary.error_rows)
        summary.seconds = time.time() - started
        target.write_record(merged_provenance(outputs, summary))
    return summary


def _copy_masks(output: ShardOutput, target: RunFolder) -> int:
    """Copy the shard's mask files (atomically); an identical file already there is left alone."""
    copied = 0
    for row in output.rows:
        if not (row.ok and row.mask):
            continue
        try:
            data = read_bytes(output.folder / row.mask)
        except ImageDecodeError as err:
            raise MergeError(f"{output.folder / row.mask}: mask of {printable(row.image)} unusable: {err}") from err
        path = target.out / row.mask
        try:
            if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
                continue
        except OSError:
            pass
        target.write_mask(row.mask, data)
        copied += 1
    return copied


def merged_provenance(outputs: list[ShardOutput], summary: MergeSummary) -> RunRecord:
    """``run.json`` of the merged folder: what a run records (so the report reads it), plus each shard's."""
    first = outputs[0].run
    inputs = [o.run.input for o in outputs]
    passed: dict[str, str] = {}
    for o in outputs:
        for path, reason in o.run.passed_over:
            passed.setdefault(path, reason)
    options = dict(first.options)
    options.pop("shard", None)
    counts = [o.run.counts for o in outputs]
    return RunRecord(
        tool_version=__version__,
        status=STATUS_COMPLETE,
        merged=True,
        started=min(o.run.started for o in outputs),
        finished=now_iso(),
        shard=None,
        study_images=first.study_images,
        input=inputs[0],
        inputs=tuple(sorted(set(inputs))),
        output=str(summary.out),
        options=options,
        settings=first.settings,
        model=first.model,
        device=", ".join(sorted({o.run.device for o in outputs})),
        precision=first.precision,
        platform=first.platform,
        counts=RunCounts(
            found=summary.found,
            processed=sum(c.processed for c in counts),
            skipped_unchanged=sum(c.skipped_unchanged for c in counts),
            ok=summary.ok,
            error=summary.errors,
            removed_since_last_run=sum(c.removed_since_last_run for c in counts),
            passed_over=len(passed),
        ),
        passed_over=tuple(sorted(passed.items())),
        timings={"merge_s": round(summary.seconds, 3),
                 "total_s": round(sum(float(o.run.timings.get("total_s", 0)) for o in outputs), 3)},
        merged_from=tuple(
            {
                "folder": str(o.folder.resolve()),
                "shard": str(o.shard) if o.shard else None,
                "host": o.run.host,
                "input": o.run.input,
                "device": o.run.device,
                "started": o.run.started,
                "finished": o.run.finished,
                "tool_version": o.run.tool_version,
                "counts": asdict(o.run.counts),
            }
            for o in outputs
        ),
    )
