"""Walking a study folder into image items and pairing each with its ground truth; nothing is decoded here.

Ground truth comes from, in order of precedence:

* ``--labels FILE.csv`` (columns ``image,class``; ``image`` relative to the study root) for the class, else the
  nearest parent folder named normal / benign / malignant (any case);
* ``--masks DIR`` (masks mirrored under another root) for the lesion mask, else BUSI's ``X_mask.png`` /
  ``X_mask_N.png`` beside ``X.png``. Several mask files are one lesion mask: their union.

Mask files are ground truth, never inputs. Symbolic links to files are followed; links to folders are not
(a link loop cannot trap the walk).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .classes import CLASS_NAMES
from .errors import UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_MASK_STEM = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$", re.IGNORECASE)


@dataclass(frozen=True)
class ImageItem:
    """One input image and whatever ground truth was found for it."""

    path: Path
    rel: str
    true_class: str | None = None
    truth_masks: tuple[Path, ...] = ()

    @property
    def has_truth_mask(self) -> bool:
        return bool(self.truth_masks)


@dataclass
class Study:
    """The result of discovery: items in a stable order, plus what was passed over and why."""

    root: Path
    items: list[ImageItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_ground_truth(self) -> bool:
        return any(i.true_class is not None or i.truth_masks for i in self.items)


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


def discover(root: Path, labels_csv: Path | None = None, masks_root: Path | None = None) -> Study:
    """Find every image under ``root`` (by extension, sorted by relative path) and its ground truth."""
    root = Path(root)
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
    items: list[ImageItem] = []
    for rel in files:
        name = os.path.basename(rel)
        if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES or rel in mask_set:
            continue
        truth = tuple(truth_root / m for m in sorted(masks_by_stem.get(os.path.splitext(rel)[0], [])))
        true_class = labels.get(rel) if labels else class_from_path(rel)
        items.append(ImageItem(path=root / rel, rel=rel, true_class=true_class, truth_masks=truth))
    return Study(root=root, items=items, skipped=skipped)
