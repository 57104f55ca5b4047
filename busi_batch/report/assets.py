"""The pictures a report embeds: downscaled JPEGs of each image's outline overlay and of its predicted mask.

JPEG files on disk, read through ``file://``: WeasyPrint embeds a JPEG as it is (no re-encoding), and file
references keep memory flat where data URIs would grow with every page. The run's mask files stay PNG; only their
pictures in the report are JPEG.

Renditions are written into ``OUT/report_assets/`` (atomically) and regenerated on every report, so a
re-rendered report never shows a picture from an older run. The input images are read from the input folder the
run recorded, the ground-truth masks from the paths the run recorded (``ground_truth.json``); an image that is
missing or changed since the run gets a notice on its page instead of a picture.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import imageio
from ..errors import ImageDecodeError
from ..imageio import atomic_write_bytes, decode_image, load_truth_mask, read_bytes
from ..overlay import outline_overlay
from .content import Entry, RunInfo

ASSETS_DIR = "report_assets"
OVERLAY_MAX_SIDE = 512
MASK_MAX_SIDE = 256
JPEG_QUALITY = 80


@dataclass(frozen=True)
class RenditionJob:
    """What one worker needs to draw the pictures of one image (plain data: it crosses a process boundary)."""

    key: str                         # asset file name stem, e.g. "00012"
    image_path: Path | None          # None when the row has no readable input (an error row)
    frame: int | None                # frame of a multi-frame DICOM file (CSV name ``file#N``), else None
    mask_path: Path | None           # the run's predicted mask PNG, None for error rows
    truth_paths: tuple[Path, ...]    # ground-truth mask files the run recorded
    input_sha256: str                # the hash recorded at run time, to notice an image edited since
    assets_dir: Path


@dataclass(frozen=True)
class Rendition:
    """The pictures written for one image (file names inside the assets folder) and anything worth saying."""

    key: str
    overlay: str | None = None
    mask: str | None = None
    width: int | None = None
    height: int | None = None
    truth_drawn: bool = False        # a ground-truth lesion outline is in the picture
    truth_empty: bool = False        # a ground-truth mask exists and marks no lesion
    notices: tuple[str, ...] = ()


def downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longest side is at most ``max_side`` (INTER_AREA: no aliasing); never enlarge."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JPEG bytes (8-bit grey or BGR)."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


def overlay_rendition(image: np.ndarray, predicted: np.ndarray | None, truth: np.ndarray | None) -> bytes:
    """The outline overlay drawn at full size (so line widths match the demo), then downscaled to JPEG."""
    return encode_jpeg(downscale(outline_overlay(image, predicted, truth), OVERLAY_MAX_SIDE))


def mask_rendition(mask: np.ndarray) -> bytes:
    """A binary mask as a small white-on-black grey JPEG."""
    return encode_jpeg(downscale(mask.astype(np.uint8) * 255, MASK_MAX_SIDE))


def make_rendition(job: RenditionJob) -> Rendition:
    """Draw and write the pictures for one image; every problem becomes a notice on its page, never an exception.

    Runs in a worker process. Only write failures in the output folder propagate (they are fatal for the report).
    """
    notices: list[str] = []
    predicted = None
    if job.mask_path is not None:
        try:
            predicted = _as_binary(decode_image(read_bytes(job.mask_path)))
        except ImageDecodeError as err:
            notices.append(f"predicted mask {job.mask_path.name}: {err}")
    image = None
    if job.image_path is not None:
        try:
            data = read_bytes(job.image_path)
        except ImageDecodeError as err:
            notices.append(f"input image {job.image_path}: {err} (moved or deleted since the run?)")
        else:
            if job.input_sha256 and hashlib.sha256(data).hexdigest() != job.input_sha256:
                notices.append("the input image has changed since the run; the outline was drawn on the new file")
            try:
                image = decode_input(data, job.frame)
            except ImageDecodeError as err:
                notices.append(f"input image {job.image_path}: {err}")
    if image is not None and predicted is not None and predicted.shape != image.shape[:2]:
        notices.append("the predicted mask no longer matches the image size; outline not drawn")
        predicted_for_overlay = None
    else:
        predicted_for_overlay = predicted
    truth = None
    if image is not None and job.truth_paths:
        try:
            truth = load_truth_mask(job.truth_paths, image.shape[:2])
        except ImageDecodeError as err:
            notices.append(f"ground truth not drawn: {err}")
    overlay_name = mask_name = None
    if image is not None:
        overlay_name = f"{job.key}-overlay.jpg"
        atomic_write_bytes(job.assets_dir / overlay_name, overlay_rendition(image, predicted_for_overlay, truth))
    if predicted is not None:
        mask_name = f"{job.key}-mask.jpg"
        atomic_write_bytes(job.assets_dir / mask_name, mask_rendition(predicted))
    shape = image.shape[:2] if image is not None else (predicted.shape if predicted is not None else None)
    return Rendition(
        key=job.key,
        overlay=overlay_name,
        mask=mask_name,
        width=shape[1] if shape else None,
        height=shape[0] if shape else None,
        truth_drawn=truth is not None and overlay_name is not None and bool(truth.any()),
        truth_empty=truth is not None and not truth.any(),
        notices=tuple(notices),
    )


def decode_input(data: bytes, frame: int | None) -> np.ndarray:
    """Pixels of an input file as the run saw them: the run's own dispatch (DICOM frame, or any other image)."""
    return imageio.decode_input(data, frame)


def _as_binary(mask: np.ndarray) -> np.ndarray:
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    return mask > 0


def remove_stale(assets_dir: Path, keep: set[str], max_age_s: float = 3600.0) -> None:
    """Delete renditions of an earlier report that this one did not write (old runs, other page selections), and
    the chunk folders of a report that was killed (``.report-*``, older than ``max_age_s``: a report rendering
    right now into the same folder keeps its own)."""
    if not assets_dir.is_dir():
        return
    for path in assets_dir.iterdir():
        if path.is_file() and path.suffix == ".jpg" and path.name not in keep:
            path.unlink(missing_ok=True)
        elif path.is_dir() and path.name.startswith(".report-") and time.time() - path.stat().st_mtime > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


def input_location(input_root: Path, image: str) -> tuple[Path, int | None]:
    """The file (and DICOM frame) behind a CSV ``image`` name: ``a/IM1#3`` is frame 3 of ``a/IM1``, unless a file
    is literally called that."""
    from ..dicom import split_frame_name

    path = input_root / image
    if path.exists():
        return path, None
    rel, frame = split_frame_name(image)
    return input_root / rel, frame


def rendition_jobs(entries: list[Entry], info: RunInfo, truth: dict[str, tuple[Path, ...]],
                   assets_dir: Path) -> list[RenditionJob]:
    """What to draw for each entry. An anonymised run's images are never drawn: their names are pseudonyms, and
    ultrasound pixels often carry the patient's name burned in."""
    jobs = []
    for e in entries:
        path, frame = input_location(info.input, e.row.image) if e.row.ok else (None, None)
        if info.anonymized:
            path = frame = None
        jobs.append(RenditionJob(
            key=f"{e.number:05d}",
            image_path=path,
            frame=frame,
            mask_path=(info.folder / e.row.mask) if e.row.ok and e.row.mask else None,
            truth_paths=truth.get(e.row.image, ()),
            input_sha256=e.row.input_sha256,
            assets_dir=assets_dir,
        ))
    return jobs


def make_renditions(jobs: list[RenditionJob]) -> list[Rendition]:
    """The pictures of one chunk of images (one task for a worker process)."""
    return [make_rendition(job) for job in jobs]
