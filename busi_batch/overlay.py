"""Drawing mask outlines over an image: one copy for the report, the demo and anything else that shows a result."""

from __future__ import annotations

import cv2
import numpy as np

from .preprocess import to_gray_float

PRED_COLOUR_BGR = (0, 200, 255)    # amber: the model's prediction
TRUTH_COLOUR_BGR = (80, 220, 60)   # green: the ground truth


def to_display_bgr(image: np.ndarray) -> np.ndarray:
    """Any decoded image (grey / BGR / BGRA, 8 or 16 bit) as 8-bit BGR for drawing on."""
    gray = (to_gray_float(image) * 255.0 + 0.5).astype(np.uint8)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def draw_outline(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    """Draw the external contours of a binary mask onto ``canvas`` in place."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, colour, thickness, lineType=cv2.LINE_8)


def outline_overlay(
    image: np.ndarray, predicted: np.ndarray | None, truth: np.ndarray | None = None, thickness: int | None = None
) -> np.ndarray:
    """8-bit BGR picture of ``image`` with the predicted outline (amber) and the ground truth (green) on top.

    The line width scales with the image so that outlines stay visible after downscaling for a report page.
    """
    canvas = to_display_bgr(image)
    if thickness is None:
        thickness = max(1, round(max(canvas.shape[:2]) / 250))
    if truth is not None:
        draw_outline(canvas, truth, TRUTH_COLOUR_BGR, thickness)
    if predicted is not None:
        draw_outline(canvas, predicted, PRED_COLOUR_BGR, thickness)
    return canvas
