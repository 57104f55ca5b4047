"""Decode BUSI once into a compact cache of square images, union masks and labels.

Training reads this cache instead of 780 PNGs of varying size every epoch: decoding and resizing would
otherwise cost more CPU than the network on a 2-core machine. Images go through the same
``to_gray_float`` + ``resize_square`` as inference, so the model never sees a different preprocessing.

    python -m train.prepare --data ../shared/data/busi --size 256 --out train/cache/busi_256.npz
    python -m train.prepare --geometry letterbox --out train/cache/busi_256_letterbox.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from busi_batch.classes import class_index
from busi_batch.discover import ImageItem, discover
from busi_batch.imageio import load_image, load_truth_mask
from busi_batch.preprocess import GEOMETRIES, letterbox_box, resize_square, to_gray_float

from .annotations import annotation_mask, painted_out


def resize_mask(mask: np.ndarray, size: int, geometry: str = "squash") -> np.ndarray:
    """Bool (H, W) mask -> uint8 0/1 (size, size): area-average the float mask, then keep pixels >= half covered.

    Area averaging keeps thin lesions' coverage honest when shrinking; thresholding at 0.5 makes the cached
    target the same binary mask a nearest-neighbour resize would approximate, without its jagged edges.
    """
    if geometry == "squash":
        resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        return (resized >= 0.5).astype(np.uint8)
    top, left, inner_h, inner_w = letterbox_box(*mask.shape[:2], size)
    square = np.zeros((size, size), dtype=np.uint8)
    inner = cv2.resize(mask.astype(np.float32), (inner_w, inner_h), interpolation=cv2.INTER_AREA)
    square[top : top + inner_h, left : left + inner_w] = inner >= 0.5
    return square


def to_square_uint8(image: np.ndarray, size: int, geometry: str) -> np.ndarray:
    """A decoded frame -> the cached uint8 (S, S) grey square, through inference's own preprocessing."""
    gray = resize_square(to_gray_float(image), size, geometry)
    return np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)


def painted_square(item: ImageItem, size: int, geometry: str = "squash") -> np.ndarray:
    """The cached square of ``item`` with its burnt-in annotations painted out at native resolution first
    (:mod:`train.annotations`); frames deeper than 8 bits are cached unpainted (the detector's thresholds are
    8-bit grey levels)."""
    image = load_image(item.path)
    if image.dtype == np.uint8:
        image = painted_out(image, annotation_mask(image))
    return to_square_uint8(image, size, geometry)


def prepare_item(item: ImageItem, size: int, geometry: str = "squash") -> tuple[np.ndarray, np.ndarray, int]:
    """(image uint8 (S,S), mask uint8 0/1 (S,S), class index) for one labelled BUSI image, brought to the square in
    ``geometry`` (see :mod:`busi_batch.preprocess`)."""
    if item.true_class is None:
        raise ValueError(f"{item.rel}: no class (BUSI images sit in normal/ benign/ malignant/ folders)")
    image = load_image(item.path)
    mask = load_truth_mask(item.truth_masks, image.shape[:2])
    return (
        to_square_uint8(image, size, geometry),
        resize_mask(mask, size, geometry),
        class_index(item.true_class),
    )


def prepare(data_root: Path, size: int, geometry: str = "squash", paint: bool = False) -> dict[str, np.ndarray]:
    """Arrays ``images`` (N,S,S) uint8, ``masks`` (N,S,S) uint8, ``labels`` (N,) int64, ``rel`` (N,) str, and the
    ``size`` and ``geometry`` they were made with; with ``paint``, also ``painted`` (N,S,S) uint8, each image
    with its burnt-in annotations painted out (:func:`painted_square`)."""
    items = discover(Path(data_root)).items
    if not items:
        raise ValueError(f"{data_root}: no images found")
    images = np.empty((len(items), size, size), dtype=np.uint8)
    masks = np.empty_like(images)
    labels = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        images[i], masks[i], labels[i] = prepare_item(item, size, geometry)
    extra = {"painted": np.stack([painted_square(item, size, geometry) for item in items])} if paint else {}
    return {
        **extra,
        "images": images,
        "masks": masks,
        "labels": labels,
        "rel": np.array([item.rel for item in items]),
        "size": np.array(size),
        "geometry": np.array(geometry),
    }


def delta_encode(images: np.ndarray) -> np.ndarray:
    """Left-neighbour differences along each row (mod 256): lossless, and deflate shrinks them ~25% more
    than raw speckle, which keeps the 256x256 cache under 40 MB."""
    return np.diff(images, axis=-1, prepend=np.zeros_like(images[..., :1]))


def delta_decode(deltas: np.ndarray) -> np.ndarray:
    """Inverse of :func:`delta_encode` (uint8 cumulative sum wraps mod 256 exactly as the differences did)."""
    return np.cumsum(deltas, axis=-1, dtype=np.uint8)


def save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write :func:`prepare`'s arrays compressed, images delta-coded (see :func:`delta_encode`)."""
    stored = {k: v for k, v in arrays.items() if k not in ("images", "painted")}
    for key in ("images", "painted"):
        if key in arrays:
            stored[f"{key}_delta"] = delta_encode(arrays[key])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **stored)


def load_cache(path: Path) -> dict[str, np.ndarray]:
    """The cache written by :func:`save_cache`, fully loaded into memory, with ``images`` decoded."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    for key in ("images", "painted"):
        if f"{key}_delta" in arrays:
            arrays[key] = delta_decode(arrays.pop(f"{key}_delta"))
    return arrays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/busi"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--geometry", choices=GEOMETRIES, default="squash")
    parser.add_argument("--out", type=Path, default=Path("train/cache/busi_256.npz"))
    parser.add_argument("--paint-annotations", action="store_true",
                        help="also cache each image with its burnt-in annotations painted out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    arrays = prepare(args.data, args.size, args.geometry, paint=args.paint_annotations)
    save_cache(args.out, arrays)
    counts = np.bincount(arrays["labels"], minlength=3)
    print(
        f"{len(arrays['labels'])} images (per class {counts.tolist()}) -> {args.out} "
        f"({args.out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
