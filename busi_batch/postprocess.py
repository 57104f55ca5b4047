"""From the model's low-resolution lesion probability to a mask at the image's own size, and its measures."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .preprocess import letterbox_box


def probability_to_size(probability: np.ndarray, height: int, width: int, letterbox: bool = False) -> np.ndarray:
    """Resize a square lesion-probability map back to (height, width) with bilinear interpolation; with
    ``letterbox`` the padding around the image (see :func:`busi_batch.preprocess.letterbox_box`) is cut off first.

    Interpolating the probability (not the binary mask) keeps outlines smooth at any scale.
    """
    if letterbox:
        top, left, inner_h, inner_w = letterbox_box(height, width, probability.shape[0])
        probability = probability[top : top + inner_h, left : left + inner_w]
    return cv2.resize(probability.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def binarise(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return probability >= threshold


@dataclass(frozen=True)
class MaskRules:
    """How a lesion-probability map becomes the reported mask; tuned per model on its validation fold and stored
    in the model card, so that a checkpoint always travels with the rules it was measured with.

    ``threshold`` binarises the probability. ``min_component_fraction`` drops connected components smaller than
    that share of the image (specks the network paints on speckle noise). ``empty_when_normal`` returns no mask
    when the predicted class is *normal*: a lesion outline on an image the same model calls normal contradicts
    itself, and on BUSI most such outlines are false positives.
    """

    threshold: float = 0.5
    min_component_fraction: float = 0.0
    empty_when_normal: bool = False
    #: the probability map covers a letterboxed square (the model card's ``input_geometry``), not a squashed one
    letterbox: bool = False

    def key(self) -> str:
        """A compact, stable description for resume settings and reports."""
        key = (f"threshold={self.threshold:g};min_component={self.min_component_fraction:g};"
               f"empty_when_normal={int(self.empty_when_normal)}")
        return key + (";letterbox=1" if self.letterbox else "")


def _occupied(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of a bool mask's pixels as slices, None when empty.

    Component labelling runs on this box only: a lesion covers a few percent of the frame, so labelling the
    whole frame (and indexing a full-size label image) cost several times more, per image, than the rest of the
    post-processing together.
    """
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0 or h == 0:
        return None
    return slice(y, y + h), slice(x, x + w)


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without the 8-connected components of fewer than ``min_pixels`` pixels."""
    mask = mask.astype(bool, copy=False)
    box = _occupied(mask) if min_pixels > 1 else None
    if box is None:
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask[box].view(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    if keep[1:].all():
        return mask
    cleaned = np.zeros_like(mask)
    cleaned[box] = keep[labels]
    return cleaned


def lesion_mask(
    probability: np.ndarray, height: int, width: int, predicted_class: str, rules: MaskRules = MaskRules()
) -> np.ndarray:
    """The reported binary mask at (height, width): resize, binarise, drop specks, respect a *normal* verdict."""
    if rules.empty_when_normal and predicted_class == "normal":
        return np.zeros((height, width), dtype=bool)
    mask = binarise(probability_to_size(probability, height, width, rules.letterbox), rules.threshold)
    if rules.min_component_fraction > 0:
        mask = remove_small_components(mask, int(np.ceil(rules.min_component_fraction * height * width)))
    return mask


def lesion_area(mask: np.ndarray) -> int:
    """Pixels in the mask."""
    return int(np.count_nonzero(mask))


def lesion_count(mask: np.ndarray) -> int:
    """Connected components of the mask (8-connectivity)."""
    mask = mask.astype(bool, copy=False)
    box = _occupied(mask)
    if box is None:
        return 0
    count, _ = cv2.connectedComponents(mask[box].view(np.uint8), connectivity=8)
    return int(count - 1)


def area_mm2(area_px: int, pixel_size_mm: float | tuple[float, float] | None) -> float | None:
    """Area in mm² given a square pixel size (mm) or (row, column) spacing; None when unknown."""
    if pixel_size_mm is None:
        return None
    if isinstance(pixel_size_mm, tuple):
        return area_px * pixel_size_mm[0] * pixel_size_mm[1]
    return area_px * pixel_size_mm * pixel_size_mm
