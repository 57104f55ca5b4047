"""Turning a decoded image into the model's input: the one copy used by ``run``, training and the demo.

Decoded pixels arrive in any depth and channel layout; the model sees a single grey channel in [0, 1] brought
to a square of the card's input size, then normalised with the card's mean and std. The square is reached in one
of two geometries, named in the model card: ``squash`` resizes each side on its own (the aspect ratio is lost),
``letterbox`` scales the longer side to the square and pads the shorter one with black, centred, so that a lesion
keeps its shape whatever the scanner's field of view.
"""

from __future__ import annotations

import cv2
import numpy as np


def _gray(image: np.ndarray) -> np.ndarray:
    """One channel, in the image's own pixel type (alpha dropped, colour averaged with the usual luma weights)."""
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ValueError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            return image[:, :, 0]
        if channels == 3:
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        if channels == 4:
            return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        raise ValueError(f"unsupported channel count {channels}")
    if image.ndim != 2:
        raise ValueError(f"unsupported image shape {image.shape}")
    return image


def _full_scale(dtype: np.dtype) -> float:
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def to_gray_float(image: np.ndarray) -> np.ndarray:
    """Grey float32 in [0, 1] from a grey, BGR or BGRA array of 8 or 16 bits (cv2's channel order).

    Alpha is dropped (ultrasound frames are opaque); colour overlays are averaged into grey with the usual
    luma weights, as a scanner's grey export would.
    """
    gray = _gray(image)
    return np.clip(gray.astype(np.float32) / _full_scale(gray.dtype), 0.0, 1.0)


GEOMETRIES = ("squash", "letterbox")


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """``(top, left, inner_height, inner_width)`` of a height x width image scaled into a size x size square with
    its aspect ratio kept and centred; the rest of the square is padding."""
    scale = size / max(height, width)
    inner_h = min(size, max(1, round(height * scale)))
    inner_w = min(size, max(1, round(width * scale)))
    return (size - inner_h) // 2, (size - inner_w) // 2, inner_h, inner_w


def _resize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """INTER_AREA when shrinking avoids aliasing speckle; INTER_LINEAR when enlarging."""
    h, w = gray.shape[:2]
    interpolation = cv2.INTER_AREA if (h >= height and w >= width) else cv2.INTER_LINEAR
    return cv2.resize(gray, (width, height), interpolation=interpolation)


def resize_square(gray: np.ndarray, size: int, geometry: str = "squash") -> np.ndarray:
    """Bring a 2-D array to ``size`` x ``size`` in ``geometry`` (see the module docstring); padding is 0."""
    if geometry == "squash":
        return _resize(gray, size, size)
    if geometry != "letterbox":
        raise ValueError(f"unknown input geometry {geometry!r}; known: {', '.join(GEOMETRIES)}")
    top, left, inner_h, inner_w = letterbox_box(*gray.shape[:2], size)
    square = np.zeros((size, size), dtype=gray.dtype)
    square[top : top + inner_h, left : left + inner_w] = _resize(gray, inner_h, inner_w)
    return square


def normalise(gray01: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((gray01 - mean) / std).astype(np.float32)


def model_input(
    image: np.ndarray, size: int, mean: float, std: float, geometry: str = "squash"
) -> np.ndarray:
    """Decoded image -> float32 [size, size] ready for the network (add batch and channel axes yourself).

    The same as ``normalise(resize_square(to_gray_float(image), size, geometry), ...)`` up to float rounding
    (about 1e-6), but integer pixels are scaled after the resize, on the small image: half the cost per image.
    """
    gray = _gray(image)
    if gray.dtype in (np.uint8, np.uint16):  # already within [0, full scale]: no clip needed, scaling commutes
        small = resize_square(gray.astype(np.float32), size, geometry) * np.float32(1.0 / _full_scale(gray.dtype))
        return normalise(small, mean, std)
    return normalise(resize_square(to_gray_float(gray), size, geometry), mean, std)
