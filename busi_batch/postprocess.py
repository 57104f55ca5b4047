"""From the model's low-resolution lesion probability to a mask at the image's own size, and its measures."""

from __future__ import annotations

import cv2
import numpy as np


def probability_to_size(probability: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a square lesion-probability map back to (height, width) with bilinear interpolation.

    Interpolating the probability (not the binary mask) keeps outlines smooth at any scale.
    """
    return cv2.resize(probability.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def binarise(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return probability >= threshold


def lesion_area(mask: np.ndarray) -> int:
    """Pixels in the mask."""
    return int(np.count_nonzero(mask))


def lesion_count(mask: np.ndarray) -> int:
    """Connected components of the mask (8-connectivity)."""
    if not mask.any():
        return 0
    count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return int(count - 1)


def area_mm2(area_px: int, pixel_size_mm: float | tuple[float, float] | None) -> float | None:
    """Area in mm² given a square pixel size (mm) or (row, column) spacing; None when unknown."""
    if pixel_size_mm is None:
        return None
    if isinstance(pixel_size_mm, tuple):
        return area_px * pixel_size_mm[0] * pixel_size_mm[1]
    return area_px * pixel_size_mm * pixel_size_mm
