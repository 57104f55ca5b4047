"""Reading images and masks, and writing files atomically.

Decoding is defensive: the header is read first (Pillow, lazily) so that a file claiming a gigantic size is
refused before a single pixel buffer is allocated; every failure becomes ``ImageDecodeError`` with a one-line
reason. Writes go to a temporary file in the target folder and are renamed into place, so a killed run never
leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError, OutputWriteError

#: Refuse images above this many pixels (about 12,000 x 8,300): far beyond any ultrasound frame, and small
#: enough that one decode cannot exhaust memory.
MAX_PIXELS = 100_000_000

cv2.setNumThreads(1)  # decoding runs in DataLoader workers; OpenCV's own pool would oversubscribe the cores


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or ImageDecodeError with the OS's reason (permission, folder, vanished file)."""
    try:
        if Path(path).is_dir():
            raise ImageDecodeError("is a folder, not an image file")
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise ImageDecodeError(f"cannot read file: {err.strerror or err}") from err


def image_header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; ImageDecodeError if the bytes are no known image format."""
    import io

    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageDecodeError("not a readable image (unknown or corrupt header)") from err


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode bytes to a grey (H, W) or BGR (H, W, 3) array of 8 or 16 bits, EXIF orientation applied."""
    width, height = image_header_size(data)
    if width * height > max_pixels:
        raise ImageDecodeError(f"image too large: header claims {width}x{height} pixels (limit {max_pixels:,})")
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if image is None or image.size == 0:
        image = _decode_with_pillow(data)
    return image


def _decode_with_pillow(data: bytes) -> np.ndarray:
    """Fallback for what OpenCV refuses (palette TIFFs, CMYK JPEGs...); truncated files still fail here."""
    import io

    from PIL import ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(im, dtype=np.uint16) if im.mode != "I" else np.asarray(im).astype(np.uint16)
            else:
                array = np.asarray(im.convert("L"))
    except Exception as err:  # Pillow raises a wide variety for damaged data
        raise ImageDecodeError(f"corrupt or truncated image data ({type(err).__name__})") from err
    if array.size == 0:
        raise ImageDecodeError("image has no pixels")
    return array


def load_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return decode_image(read_bytes(path), max_pixels=max_pixels)


def load_truth_mask(paths: tuple[Path, ...], shape: tuple[int, int]) -> np.ndarray:
    """Union of ground-truth mask files as a bool (H, W) array; sizes must match the image."""
    union = np.zeros(shape, dtype=bool)
    for path in paths:
        try:
            mask = decode_image(read_bytes(path))
        except ImageDecodeError as err:
            raise ImageDecodeError(f"ground-truth mask {path.name}: {err}") from err
        if mask.ndim == 3:
            mask = mask.max(axis=2)
        if mask.shape != shape:
            raise ImageDecodeError(
                f"ground-truth mask {path.name} is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}"
            )
        union |= mask > 0
    return union


def encode_png(array: np.ndarray, compression: int = 3) -> bytes:
    ok, buffer = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise OutputWriteError("PNG encoding failed")
    return buffer.tobytes()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as a single-channel 8-bit PNG with values 0 and 255."""
    return encode_png(mask.astype(np.uint8) * 255)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    Readers see the old file or the new one, never a partial one; on failure the temporary file is removed and
    OutputWriteError names the file and the reason (for example a full disk).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    except OSError as err:
        raise OutputWriteError(f"{path}: cannot write: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputWriteError(f"{path}: cannot write: {err.strerror or err}") from err


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text; file names that were not valid UTF-8 keep their original bytes (surrogateescape)."""
    atomic_write_bytes(path, text.encode("utf-8", errors="surrogateescape"))
