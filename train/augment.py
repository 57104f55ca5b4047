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
    # Scanner and field-of-view differences (0 = off, as in v1). ``aspect`` scales width and height each by up to
    # this factor on their own; ``p_crop`` zooms into a random crop (a narrower field of view); ``p_gain_ramp`` is a
    # smooth brightness gradient (time-gain compensation and probe-contact differences); ``p_speckle`` multiplies
    # every pixel by its own noise; ``p_resolution`` downsamples and upsamples (older or lower-resolution scanners).
    aspect: float = 0.0
    p_crop: float = 0.0
    crop_min_area: float = 0.6
    p_gain_ramp: float = 0.0
    p_speckle: float = 0.0
    p_resolution: float = 0.0
    # Lesion-preserving geometry: a lesion image whose augmented mask keeps less than this share of its lesion
    # area is drawn again (up to ``lesion_tries`` times, then used unaugmented). Crops, zooms and shifts can push
    # a lesion out of the frame while its label stays benign or malignant, which teaches the classifier that
    # lesion-free tissue can be a lesion class. 0 = off (the v1 and v2 recipes).
    lesion_keep: float = 0.0
    lesion_tries: int = 5
    # Share of training draws that use the copy of the image with its burnt-in annotations painted out
    # (:mod:`train.annotations`, cached by ``train.prepare --paint-annotations``), so that calipers and text stop
    # being a cue for the class. 0 = off (v1-v3).
    p_paint_annotations: float = 0.0


def build_augment(config: AugmentConfig | None = None, seed: int | None = None, size: int = 256) -> A.Compose:
    """The albumentations pipeline for ``size`` x ``size`` pairs; call it as ``pipeline(image=img, mask=mask)``.
    ``seed`` makes it repeatable."""
    c = config or AugmentConfig()
    scale: tuple[float, float] | dict[str, tuple[float, float]] = (c.scale_min, c.scale_max)
    if c.aspect > 0:  # width and height scaled independently: the image's aspect ratio changes
        low, high = c.scale_min / (1 + c.aspect), c.scale_max * (1 + c.aspect)
        scale = {"x": (low, high), "y": (low, high)}
    crop = [A.RandomResizedCrop(size=(size, size), scale=(c.crop_min_area, 1.0), p=c.p_crop)] if c.p_crop > 0 else []
    scanner = []
    if c.p_gain_ramp > 0:
        scanner.append(A.Illumination(mode="linear", intensity_range=(0.05, 0.2), effect_type="both",
                                      p=c.p_gain_ramp))
    if c.p_speckle > 0:
        scanner.append(A.MultiplicativeNoise(multiplier=(0.8, 1.2), elementwise=True, p=c.p_speckle))
    if c.p_resolution > 0:
        scanner.append(A.Downscale(scale_range=(0.4, 0.85), p=c.p_resolution))
    return A.Compose(
        [
            A.HorizontalFlip(p=c.p_flip),
            *crop,
            A.Affine(
                rotate=(-c.rotate_deg, c.rotate_deg),
                scale=scale,
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
            *scanner,
        ],
        seed=seed,
    )


def augment_pair(
    pipeline: A.Compose, image: np.ndarray, mask: np.ndarray, lesion_keep: float = 0.0, tries: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``pipeline`` to one pair; returns (image uint8, mask uint8 0/1) of the same shape.

    With ``lesion_keep`` > 0, a pair with a lesion is augmented again while the result keeps less than that share
    of the lesion's area; after ``tries`` failed draws the pair comes back unchanged, so a lesion-class label never
    travels with a frame the lesion has left. Pairs without a lesion are augmented once, as usual.
    """
    area = int(np.count_nonzero(mask)) if lesion_keep > 0 else 0
    for _ in range(max(1, tries) if area else 1):
        out = pipeline(image=image, mask=mask)
        kept = (out["mask"] > 0).astype(np.uint8)
        if not area or np.count_nonzero(kept) >= lesion_keep * area:
            return out["image"], kept
    return image.copy(), (mask > 0).astype(np.uint8)
