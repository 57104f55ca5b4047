"""Reading images and masks, and writing files atomically.

Decoding is defensive, because a nightly job meets whatever lands in a folder:

* a file is read only if it is a regular file of at most ``MAX_FILE_BYTES`` (a FIFO named ``x.png`` would block
  the read forever, a device would never end);
* the header is read first (Pillow, lazily, for the supported formats only) so that a file claiming a gigantic
  size is refused before a single pixel buffer is allocated;
* pixels come from OpenCV, except where Pillow is the better judge: a PNG whose chunks are incomplete or fail
  their CRC, a JPEG without its end-of-image marker (OpenCV 4 fills a truncated JPEG with grey and says nothing;
  Pillow refuses it), or whatever OpenCV cannot decode (palette TIFFs...). So a truncated file is an error
  whatever the OpenCV version, never a silently grey image;
* the EXIF orientation is applied in one place, the same way on both paths, so the array (and so the mask, the
  CSV's width and height) always follows the image as it is displayed.

Every failure becomes ``ImageDecodeError`` with a one-line reason. Writes go to a temporary file in the target
folder and are renamed into place, so a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import re
import stat
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import decode_dicom, is_dicom_bytes
from .errors import ImageDecodeError, OutputWriteError
from .limits import MAX_PIXELS

#: Refuse files above this size before reading them (an uncompressed 16-bit RGB image at ``MAX_PIXELS`` is 600 MB).
MAX_FILE_BYTES = 1 << 30

#: Pillow openers accepted as input (a JPEG with extra pictures, as cameras write, comes back as format MPO).
SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")

_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

cv2.setNumThreads(1)  # decoding runs in DataLoader workers; OpenCV's own pool would oversubscribe the cores
# Our own one-line ImageDecodeError replaces OpenCV's log lines ("[ERROR:0@...] imdecode_ ..."), which would
# otherwise land on the stderr of a quiet unattended run.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or ImageDecodeError with the reason (folder, FIFO or device, too large, OS error).

    ``os.stat`` follows symbolic links, so a link loop fails here with the OS's "too many levels of symbolic
    links", and a link to a FIFO or ``/dev/zero`` is refused before it is opened.
    """
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError("is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageDecodeError("not a regular file (a FIFO, socket or device)")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageDecodeError(f"file too large: {info.st_size:,} bytes (limit {MAX_FILE_BYTES:,})")
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ImageDecodeError(f"cannot read file: {err.strerror or err}") from err
    if len(data) > MAX_FILE_BYTES:
        raise ImageDecodeError(f"file too large: more than {MAX_FILE_BYTES:,} bytes")
    return data


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded: format, Pillow mode, size, EXIF orientation (1-8).

    The size is as stored, except for an oriented TIFF, whose size Pillow already reports turned.
    """

    format: str
    mode: str
    width: int
    height: int
    orientation: int = 1


def read_header(data: bytes) -> ImageHeader:
    """The header of a supported image; ImageDecodeError if the bytes are empty, unknown or unsupported."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as im:
                width, height = im.size
                orientation = 1
                if im.format != "PNG" or _png_may_hold_exif(data):
                    try:
                        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
                    except Exception:  # a damaged EXIF block is not worth refusing the pixels for
                        orientation = 1
                return ImageHeader(
                    format=str(im.format), mode=str(im.mode), width=int(width), height=int(height),
                    orientation=orientation if 1 <= orientation <= 8 else 1,
                )
    except Image.DecompressionBombError as err:  # Pillow's own guard, above twice its MAX_IMAGE_PIXELS
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "a gigantic size"
        raise ImageDecodeError(f"image too large: header claims {size} (limit {MAX_PIXELS:,})") from err
    except UnidentifiedImageError:
        other = _other_format(data)
        if other:
            raise ImageDecodeError(
                f"unsupported image format {other} (supported: PNG, JPEG, BMP, TIFF)"
            ) from None
        raise ImageDecodeError("not a readable image (unknown format or corrupt header)") from None
    except Exception as err:  # Pillow's header parsers raise many types (struct.error, IndexError...) on junk
        raise ImageDecodeError(f"not a readable image (corrupt header: {type(err).__name__})") from err


def _other_format(data: bytes) -> str | None:
    """The name of a format Pillow knows but we do not accept (GIF, WebP...), for a clearer message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return str(im.format)
    except Exception:  # any failure just means "unknown"
        return None


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode bytes to a grey (H, W) or BGR (H, W, 3) array of 8 or 16 bits, EXIF orientation applied."""
    header = read_header(data)
    if header.width * header.height > max_pixels:
        raise ImageDecodeError(
            f"image too large: header claims {header.width}x{header.height} pixels (limit {max_pixels:,})"
        )
    if header.width < 1 or header.height < 1:
        raise ImageDecodeError("image has no pixels")
    if header.format == "TIFF" and header.orientation != 1:
        # Pillow turns an oriented TIFF while loading (and reports the turned size); OpenCV's TIFF reader turns
        # it too, depending on version and layout. One judge, so the result does not depend on the OpenCV build.
        return _decode_with_pillow(data)
    image = _decode_with_opencv(data, header) if _looks_complete(header.format, data) else None
    if image is None:
        return _decode_with_pillow(data)
    return apply_orientation(image, header.orientation)


def _looks_complete(fmt: str, data: bytes) -> bool:
    """Cheap structural check, so that OpenCV is only given files it will not half-decode or complain about."""
    if fmt == "PNG":
        return _png_complete(data)
    if fmt in ("JPEG", "MPO"):
        return data.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")
    return True


def _png_complete(data: bytes) -> bool:
    """Every chunk present with a correct CRC, up to IEND (zlib.crc32 runs at memory speed)."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    pos, size = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > size:
            return False
        kind = data[pos + 4:pos + 8]
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4:end - 4]) != crc:
            return False
        if kind == b"IEND":
            return True
        pos = end
    return False


#: PNG chunks Pillow reads EXIF from: ``eXIf``, and text chunks under ImageMagick's keyword.
_PNG_EXIF_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")
_PNG_EXIF_KEYWORD = b"Raw profile type exif\x00"


def _png_may_hold_exif(data: bytes) -> bool:
    """Whether a PNG has a chunk Pillow could read an EXIF orientation from (True when the layout is unclear).

    Why it matters: for a PNG, Pillow's ``getexif()`` decodes the whole image to look for chunks after the pixel
    data, which doubled the cost of reading a header. Most scanner exports carry no such chunk at all.
    """
    pos, size = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= size:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        if kind == b"eXIf":
            return True
        if kind in _PNG_EXIF_CHUNKS and data.startswith(_PNG_EXIF_KEYWORD, pos + 8):
            return True
        if kind == b"IEND":
            return False
        pos += 12 + length
    return True


def _decode_with_opencv(data: bytes, header: ImageHeader) -> np.ndarray | None:
    """OpenCV's decode as stored (orientation is ours to apply), or None when OpenCV cannot or disagrees."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(buffer, flags)
    except cv2.error:
        return None
    if image is None or image.size == 0 or image.shape[:2] != (header.height, header.width):
        return None
    return image


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an array as stored into the array as displayed, for EXIF orientation 1..8 (Pillow's exif_transpose)."""
    if orientation == 2:
        image = image[:, ::-1]
    elif orientation == 3:
        image = image[::-1, ::-1]
    elif orientation == 4:
        image = image[::-1]
    elif orientation == 5:
        image = np.swapaxes(image, 0, 1)
    elif orientation == 6:
        image = np.rot90(image, k=-1)
    elif orientation == 7:
        image = np.swapaxes(image[::-1, ::-1], 0, 1)
    elif orientation == 8:
        image = np.rot90(image, k=1)
    else:
        return image
    return np.ascontiguousarray(image)


def _decode_with_pillow(data: bytes) -> np.ndarray:
    """Fallback for what OpenCV refuses (palette TIFFs, damaged files...); truncated files fail here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                    array = np.asarray(im, dtype=np.uint16)
                elif im.mode == "I":
                    array = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
                else:
                    array = np.asarray(im.convert("L"))
    except Exception as err:  # Pillow raises a wide variety for damaged data
        raise ImageDecodeError(f"corrupt or truncated image data ({_reason(err)})") from err
    if array.size == 0:
        raise ImageDecodeError("image has no pixels")
    return array


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return decode_image(read_bytes(path), max_pixels=max_pixels)


def decode_input(data: bytes, frame: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An input file's pixels: a DICOM object (told by content, not name) is one frame (from 1) decoded by
    :mod:`busi_batch.dicom`; anything else goes through :func:`decode_image`. Failures are ImageDecodeError.

    The one dispatch point, so a run, a report picture and the resume hash all see the same pixels of a file.
    """
    if frame is not None or is_dicom_bytes(data):
        return decode_dicom(data, frame or 1, max_pixels=max_pixels).pixels
    return decode_image(data, max_pixels=max_pixels)


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


def encode_png(array: np.ndarray, compression: int = 3, row_filter: int | None = None) -> bytes:
    """PNG bytes of an 8/16-bit grey or BGR array; ``row_filter`` (a ``cv2.IMWRITE_PNG_FILTER_*``) fixes libpng's
    per-row filter instead of its adaptive choice."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression]
    if row_filter is not None:
        params += [cv2.IMWRITE_PNG_FILTER, row_filter]
    ok, buffer = cv2.imencode(".png", array, params)
    if not ok:
        raise OutputWriteError("PNG encoding failed")
    return buffer.tobytes()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as a single-channel 8-bit PNG with values 0 and 255.

    No PNG row filter: a two-valued image gains nothing from prediction, and libpng's adaptive choice among the
    five filters made encoding about 3x slower (``benchmarks/bench_cpu_choices.py --parts stages``).
    """
    return encode_png(mask.astype(np.uint8) * 255, row_filter=cv2.IMWRITE_PNG_FILTER_NONE)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

#: Prefix of the temporary files behind atomic writes: a name only busi-batch makes, so that clean-up can never
#: take a file of someone else's. Only a killed process can leave one behind.
TEMP_PREFIX = ".busi-batch-tmp-"


def atomic_write_bytes(path: Path, data: bytes, temp_dir: Path | None = None, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``; with ``durable``, durable when it returns.

    The temporary file is made in ``temp_dir`` (default: ``path``'s folder), which must be on the same file system.
    Readers see the old file or the new one, never a partial one. ``durable``: the file's data is fsynced before
    the rename and its folder after it (without both, a power cut can lose a write that had returned). A caller
    committing many files at once passes False and calls :func:`sync_filesystem` once for all of them, and
    must not count them as done before that returns (one fsync per file cost about 50 ms here).
    On any failure, including an exception that interrupts the write (KeyboardInterrupt, or a DataLoader's SIGCHLD
    handler raising), the temporary file is removed; an OS failure becomes OutputWriteError naming the file and
    the reason (for example a full disk). Only SIGKILL can leave a temporary file behind, and
    :func:`remove_temp_files` clears those.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=temp_dir or path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    except OSError as err:
        raise OutputWriteError(f"{path}: cannot write: {err.strerror or err}") from err
    done = False
    try:
        # mkstemp creates the file 0600; results are meant to be shared, so apply the usual 0666 & ~umask.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        done = True
        if durable:
            fsync_dir(path.parent)
    except OSError as err:
        raise OutputWriteError(f"{path}: cannot write: {err.strerror or err}") from err
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (renames, new and removed files) durable; OSError on failure.

    A file system that cannot fsync a folder (EINVAL: some network and FUSE ones) is left as it is.
    """
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def sync_filesystem(folder: Path) -> None:
    """Make every write to the file system holding ``folder`` durable (Linux ``syncfs``; elsewhere ``sync``).

    One call commits a whole batch of files written with ``durable=False``: their data, their names and folders.
    OSError on failure.
    """
    libc = linux_libc()
    if libc is None or not hasattr(libc, "syncfs"):
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(folder))
    finally:
        os.close(fd)


def linux_libc() -> ctypes.CDLL | None:
    """The C library's symbols of this process on Linux (``syncfs``, ``prctl``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def append_bytes(path: Path, data: bytes, sync: bool = True) -> None:
    """Append ``data`` to ``path`` in one ``write`` (O_APPEND); with ``sync``, fsync it (and its folder when it is
    new). OutputWriteError names the file and the reason.

    For journals: a process killed during the call leaves at most a torn last line, which readers skip.
    """
    try:
        new = not os.path.exists(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if sync and new:
            fsync_dir(Path(path).parent)
    except OSError as err:
        raise OutputWriteError(f"{path}: cannot write: {err.strerror or err}") from err


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary files (``TEMP_PREFIX``) a killed writer left directly in ``folder``; returns how many.

    Only ``folder`` itself is looked at, never its subfolders: the caller names the one folder its temporaries go to.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def atomic_write_text(path: Path, text: str, temp_dir: Path | None = None) -> None:
    """UTF-8 text; file names that were not valid UTF-8 keep their original bytes (surrogateescape)."""
    atomic_write_bytes(path, text.encode("utf-8", errors="surrogateescape"), temp_dir=temp_dir)
