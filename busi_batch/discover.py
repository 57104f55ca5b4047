"""Walking a study folder into image items and pairing each with its ground truth; nothing is decoded here.

Ground truth comes from, in order of precedence:

* ``--labels FILE.csv`` (columns ``image,class``; ``image`` relative to the study root) for the class, else the
  nearest parent folder named normal / benign / malignant (any case);
* ``--masks DIR`` (masks mirrored under another root) for the lesion mask, else BUSI's ``X_mask.png`` /
  ``X_mask_N.png`` beside ``X.png``. Several mask files are one lesion mask: their union.

Mask files are ground truth, never inputs. Symbolic links to files are followed; links to folders are not
(a link loop cannot trap the walk).

DICOM files are recognised by content (``DICM`` at byte 128), whatever their name, and only their header is read
here (no pixels): objects without an image (structured reports, presentation states...) are passed over with
the reason, and with ``frames="all"`` a multi-frame object becomes one item per frame, named ``<file>#<frame>``.
A DICOM file whose header cannot be parsed is still an item: decoding it fails, so it becomes an error row that
names the file. Ground truth for a DICOM file is ``<file>_mask.png`` (``<file>#<frame>_mask.png`` per frame);
a ``.dcm`` / ``.dicom`` / ``.dic`` extension is dropped from that stem, any other dot is part of the name (exports
often name files by UID).

Under ``anonymize`` the items are named so that no patient identifier reaches an output: a DICOM object by its
SOP Instance UID (the join key), any other path with every patient name part, ID and date found in the study's
DICOM headers replaced by ``[removed]`` (clinic exports often name folders after the patient).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .classes import CLASS_NAMES
from .dicom import DicomHeader, anonymous_name, frame_name, phi_values, read_header, scrub_text, sniff_dicom
from .errors import ImageDecodeError, UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_MASK_STEM = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$", re.IGNORECASE)
#: Extensions dropped from a DICOM file's name for its mask and ground-truth stem (other dots are part of a name).
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
#: ``--frames``: the first frame of a multi-frame DICOM object only, or every frame (one row and mask each).
FRAMES_CHOICES = ("first", "all")


@dataclass(frozen=True)
class ImageItem:
    """One input image (a file, or one frame of a multi-frame DICOM file) and whatever ground truth was found for it.

    ``rel`` is the file's path relative to the study (what is read, and what shards are drawn by, so all frames of
    a file land in one shard); ``name`` is the CSV's ``image`` (``rel``, ``rel#N`` for one frame of several, or a
    pseudonym under ``--anonymize``). ``frame`` (from 1) is set for every readable DICOM object; ``dicom`` is its
    header (identifiers, patient, calibration), None for other files and for a DICOM file too damaged to parse.
    """

    path: Path
    rel: str
    true_class: str | None = None
    truth_masks: tuple[Path, ...] = ()
    name: str = ""
    frame: int | None = None
    is_dicom: bool = False
    dicom: DicomHeader | None = None

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.rel)

    @property
    def has_truth_mask(self) -> bool:
        return bool(self.truth_masks)


@dataclass
class Study:
    """The result of discovery: items in a stable order, plus what was passed over and why.

    ``phi`` holds the patient values (name parts, IDs, dates) of every DICOM header read; under ``anonymized``,
    :meth:`scrub` removes them from any text bound for an output.
    """

    root: Path
    items: list[ImageItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    phi: frozenset[str] = frozenset()
    anonymized: bool = False

    @property
    def has_ground_truth(self) -> bool:
        return any(i.true_class is not None or i.truth_masks for i in self.items)

    def scrub(self, text: str) -> str:
        """``text`` without patient identifiers when the study is anonymised; unchanged otherwise."""
        return scrub_text(text, self.phi) if self.anonymized else text


def is_mask_name(name: str) -> bool:
    """True for BUSI ground-truth file names such as ``x_mask.png`` or ``x_mask_2.png``."""
    stem, suffix = os.path.splitext(name)
    return suffix.lower() in IMAGE_SUFFIXES and _MASK_STEM.match(stem) is not None


def class_from_path(rel: str) -> str | None:
    """Class named by the nearest parent folder (normal / benign / malignant, any case), or None."""
    for part in reversed(Path(rel).parts[:-1]):
        if part.lower() in CLASS_NAMES:
            return part.lower()
    return None


def _walk(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of every file under root in sorted order, and entries passed over."""
    files: list[str] = []
    skipped: list[tuple[str, str]] = []

    def onerror(err: OSError) -> None:
        where = os.path.relpath(err.filename, root) if err.filename else "?"
        skipped.append((where, f"cannot list folder: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames.sort()
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                skipped.append((_join(rel_dir, name), "symbolic link to a folder is not followed"))
        for name in filenames:
            files.append(_join(rel_dir, name))
    files.sort()
    return files, skipped


def _join(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"


def read_labels(labels_csv: Path) -> dict[str, str]:
    """``image -> class`` from a CSV with columns ``image,class``; errors name the file and the line."""
    try:
        with open(labels_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"image", "class"} <= set(reader.fieldnames):
                raise UsageError(f"{labels_csv}: labels file needs the columns image,class")
            labels: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                name = (row["class"] or "").strip().lower()
                if name not in CLASS_NAMES:
                    raise UsageError(
                        f"{labels_csv}:{line}: unknown class {row['class']!r}; expected {', '.join(CLASS_NAMES)}"
                    )
                labels[Path(row["image"].strip()).as_posix()] = name
            return labels
    except OSError as err:
        raise UsageError(f"{labels_csv}: cannot read labels file: {err.strerror or err}") from err


def _group_masks(mask_files: list[str]) -> dict[str, list[str]]:
    """Mask files keyed by the relative stem of the image they belong to (``a/X_mask_1.png`` -> ``a/X``)."""
    groups: dict[str, list[str]] = {}
    for rel in mask_files:
        match = _MASK_STEM.match(os.path.splitext(rel)[0])
        if match:
            groups.setdefault(match.group("base"), []).append(rel)
    return groups


def _mirrored_masks(masks_root: Path) -> dict[str, list[str]]:
    """Masks under another root keyed by image stem: ``X_mask*.ext`` or a file named like the image itself."""
    if not masks_root.is_dir():
        raise UsageError(f"{masks_root}: masks folder not found")
    files, _ = _walk(masks_root)
    files = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    groups = _group_masks([f for f in files if is_mask_name(os.path.basename(f))])
    for rel in files:
        if not is_mask_name(os.path.basename(rel)):
            groups.setdefault(os.path.splitext(rel)[0], []).append(rel)
    return groups


def truth_stem(rel: str, is_dicom: bool) -> str:
    """The stem ground-truth and output masks are named after: no image extension; for DICOM only ``.dcm``-like."""
    stem, suffix = os.path.splitext(rel)
    if is_dicom and suffix.lower() not in DICOM_SUFFIXES:
        return rel
    return stem


@dataclass(frozen=True)
class _Candidate:
    """A file that will become one or more items: its header (DICOM) and how many items (frames)."""

    rel: str
    is_dicom: bool = False
    header: DicomHeader | None = None
    frames: int = 1


def _file_names(candidates: list[_Candidate], phi: frozenset[str], anonymize: bool) -> dict[str, str]:
    """The name each file's items are called by (before any ``#frame``), unique across the study."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for c in candidates:
        identifiers = c.header.identifiers if c.header else None
        name = anonymous_name(c.rel, phi, c.is_dicom, identifiers) if anonymize else c.rel
        if name in taken:  # the same SOP instance twice, or two paths that differ only by what was scrubbed
            name = f"{name}~{hashlib.sha1(c.rel.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        taken.add(name)
        names[c.rel] = name
    return names


def discover(
    root: Path, labels_csv: Path | None = None, masks_root: Path | None = None, frames: str = "first",
    anonymize: bool = False,
) -> Study:
    """Find every image under ``root`` (by extension, or DICOM by content; sorted by relative path) and its ground
    truth. ``frames`` is ``first`` or ``all`` (items per multi-frame DICOM object); ``anonymize`` names items and
    passed-over entries without patient identifiers (see the module docstring)."""
    root = Path(root)
    if frames not in FRAMES_CHOICES:
        raise UsageError(f"--frames must be one of {', '.join(FRAMES_CHOICES)}, not {frames!r}")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    labels = read_labels(labels_csv) if labels_csv else {}
    files, skipped = _walk(root)
    mask_files = [f for f in files if is_mask_name(os.path.basename(f))]
    masks_by_stem = _group_masks(mask_files)
    mask_set = set(mask_files)
    if masks_root is not None:
        masks_root = Path(masks_root)
        masks_by_stem = _mirrored_masks(masks_root)
    truth_root = masks_root if masks_root is not None else root
    candidates: list[_Candidate] = []
    passed_over: list[_Candidate] = []
    phi: set[str] = set()
    for rel in files:
        if rel in mask_set:
            continue
        has_suffix = os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES
        if not sniff_dicom(root / rel):
            if has_suffix:
                candidates.append(_Candidate(rel))
            continue
        try:
            header = read_header(root / rel)
        except ImageDecodeError:  # still an item: decoding fails the same way, and the run records an error row
            candidates.append(_Candidate(rel, is_dicom=True))
            continue
        phi.update(phi_values(header.patient))
        if not header.is_image:
            passed_over.append(_Candidate(rel, is_dicom=True, header=header))
            continue
        count = header.frames if frames == "all" else 1
        candidates.append(_Candidate(rel, is_dicom=True, header=header, frames=count))
    frozen_phi = frozenset(phi)
    names = _file_names(candidates + passed_over, frozen_phi, anonymize)
    items: list[ImageItem] = []
    for c in candidates:
        stem = truth_stem(c.rel, c.is_dicom)
        for frame in range(1, c.frames + 1):
            suffix = frame if c.frames > 1 else None  # ``#N`` only when the file gives several items
            truth = tuple(truth_root / m for m in sorted(masks_by_stem.get(frame_name(stem, suffix), [])))
            own = frame_name(c.rel, suffix)
            true_class = (labels.get(own) or labels.get(c.rel)) if labels else class_from_path(c.rel)
            items.append(ImageItem(
                path=root / c.rel, rel=c.rel, true_class=true_class, truth_masks=truth,
                name=frame_name(names[c.rel], suffix),
                frame=frame if c.header is not None else None, is_dicom=c.is_dicom, dicom=c.header,
            ))
    if anonymize:
        skipped = [(scrub_text(rel, frozen_phi), scrub_text(reason, frozen_phi)) for rel, reason in skipped]
    skipped += [(names[c.rel], c.header.skip_reason or "") for c in passed_over]
    return Study(root=root, items=items, skipped=skipped, phi=frozen_phi, anonymized=anonymize)
