"""Burnt-in annotations (calipers, measurement text, colour marks) found and painted out of an ultrasound frame.

BUSI frames carry what the sonographer drew on screen, and calipers are drawn on lesions, never on normal scans: a
shortcut a model can learn that does not travel to scanners or operators that mark differently. The same two
functions serve training (``train.prepare`` caches a painted copy of every image, ``train.fit`` swaps it in at
random) and the measurement of how much a model relies on the marks (``benchmarks/annotation_sensitivity.py``).
"""

from __future__ import annotations

import cv2
import numpy as np

#: White top-hat threshold (grey levels) and minimum grey level of an annotation pixel, at native resolution.
CONTRAST = 60
BRIGHT = 200


def annotation_mask(image: np.ndarray, contrast: int = CONTRAST, bright: int = BRIGHT) -> np.ndarray:
    """Bool mask of likely burnt-in annotations in a native-resolution frame (grey or BGR): thin bright strokes
    (white top-hat above ``contrast`` and at least ``bright``) and coloured pixels, slightly dilated."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    tophat = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (9, 9)))
    marks = (tophat > contrast) & (grey >= bright)
    if image.ndim == 3:
        colour = image[..., :3].astype(np.int16)
        marks |= (colour.max(axis=2) - colour.min(axis=2)) > 40
    return cv2.dilate(marks.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def painted_out(image: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """The grey frame with the ``marks`` pixels filled in from their surroundings (OpenCV's Telea inpainting)."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    return cv2.inpaint(grey, marks.astype(np.uint8), 3, cv2.INPAINT_TELEA)
