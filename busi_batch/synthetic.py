"""Synthetic ultrasound-like studies for benchmarks and scale tests (no patient data, any size, reproducible).

Each image is Rayleigh speckle, smoothed, with depth attenuation and a dark elliptical "lesion"; sizes vary like
BUSI's (about 400-900 px a side, portrait and landscape) so decoding and resizing costs are realistic.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .imageio import atomic_write_bytes, encode_png

SIZES: tuple[tuple[int, int], ...] = ((470, 560), (480, 640), (600, 800), (500, 400), (650, 900), (380, 450))


def ultrasound_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One 8-bit grey frame: speckle texture, depth attenuation and a hypoechoic ellipse."""
    speckle = rng.rayleigh(scale=1.0, size=(height, width)).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=1.5)
    depth = np.linspace(1.0, 0.45, height, dtype=np.float32)[:, None]
    image = speckle * depth * 70.0
    lesion = np.zeros((height, width), np.uint8)
    centre = (int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(height // 4, 3 * height // 4)))
    axes = (int(rng.integers(width // 12, width // 5)), int(rng.integers(height // 14, height // 6)))
    cv2.ellipse(lesion, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    image[lesion > 0] *= 0.25
    return np.clip(image, 0, 255).astype(np.uint8)


def write_study(root: Path, count: int, seed: int = 0, distinct: int = 64) -> list[Path]:
    """Write ``count`` PNGs under ``root`` (100 per sub-folder); returns their paths.

    Only ``distinct`` different frames are generated and then reused under new names, so a 5,000-image study takes
    seconds to write; every file still goes through the whole pipeline on its own.
    """
    rng = np.random.default_rng(seed)
    frames = [encode_png(ultrasound_like(*SIZES[i % len(SIZES)], rng)) for i in range(min(distinct, count))]
    paths = []
    for i in range(count):
        path = Path(root) / f"part{i // 100:03d}" / f"synthetic_{i:05d}.png"
        atomic_write_bytes(path, frames[i % len(frames)])
        paths.append(path)
    return paths
