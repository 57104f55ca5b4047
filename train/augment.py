"""Training-time augmentation of a cached (image uint8 SxS, mask uint8 0/1 SxS) pair with albumentations.

Chosen for ultrasound: horizontal flips (left/right breast and probe orientation are arbitrary; vertical flips
are not, since depth runs top to bottom), small affine changes (probe angle and zoom), mild elastic warps (tissue
compression), brightness/contrast/gamma (gain and time-gain-compensation settings differ between scanners) and
light noise or blur (speckle and focus). Geometric transforms move image and mask together; the mask is warped
with nearest-neighbour interpolation so it stays binary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402  (the environment variable must be set first)
import cv2  # noqa: E402
import numpy as np  # noqa: E402


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; the defaults are the v1 training recipe (also restated in the YAML config)."""

    p_flip: float = 0.5
    p_affine: float = 0.7
    rotate_deg: float = 15.0
    scale_min: float = 0.85
    scale_max: float = 1.15
    translate: float = 0.08
    p_elastic: float = 0.2
    p_brightness_contrast: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    p_gamma: float = 0.3
    p_noise_or_blur: float = 0.2


def build_augment(config: AugmentConfig | None = None, seed: int | None = None) -> A.Compose:
    """The albumentations pipeline; call it as ``pipeline(image=img, mask=mask)``. ``seed`` makes it repeatable."""
    c = config or AugmentConfig()
    return A.Compose(
        [
            A.HorizontalFlip(p=c.p_flip),
            A.Affine(
                rotate=(-c.rotate_deg, c.rotate_deg),
                scale=(c.scale_min, c.scale_max),
                translate_percent=(-c.translate, c.translate),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=c.p_affine,
            ),
            A.ElasticTransform(alpha=30.0, sigma=6.0, mask_interpolation=cv2.INTER_NEAREST, p=c.p_elastic),
            A.RandomBrightnessContrast(
                brightness_limit=c.brightness, contrast_limit=c.contrast, p=c.p_brightness_contrast
            ),
            A.RandomGamma(gamma_limit=(80, 120), p=c.p_gamma),
            A.OneOf(
                [
                    A.GaussNoise(std_range=(0.02, 0.06), p=1.0),
                    A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2), p=1.0),
                ],
                p=c.p_noise_or_blur,
            ),
        ],
        seed=seed,
    )


def augment_pair(pipeline: A.Compose, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``pipeline`` to one pair; returns (image uint8, mask uint8 0/1) of the same shape."""
    out = pipeline(image=image, mask=mask)
    return out["image"], (out["mask"] > 0).astype(np.uint8)
