"""Reading DICOM: recognising a file by content, its header, and one frame of its pixels.

A clinic's export is a folder of DICOM files, often without an extension, so a file is DICOM when it carries
``DICM`` at byte 128 (the Part 10 preamble); only those 132 bytes are read to decide. Objects without an image
(structured reports, presentation states, key-object selections, encapsulated PDFs, DICOMDIRs, segmentations)
are passed over with a reason, never an error.

Pixels come from pydicom (uncompressed, RLE, and through its plugins JPEG baseline/extended via Pillow,
JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg or Pillow) and are returned in the conventions of
:func:`busi_batch.imageio.decode_image`: grey ``uint8``, or grey ``uint16`` using the full 16-bit range.
MONOCHROME1 is inverted (higher stored value = darker), RGB / YBR / palette colour become grey with the usual
luma weights, and one frame of a multi-frame object is decoded at a time; frame ``N`` of file ``F`` is named
``F#N`` (:func:`frame_name`).

pydicom is an optional dependency, imported only when a header or pixels are read. Everything here but
:func:`sniff_dicom`, :func:`read_header` and :func:`decode_dicom` is a pure function.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from ..errors import ImageDecodeError
from ..limits import MAX_PIXELS
from .calibration import Calibration, calibration_from_dataset
from .values import as_int, as_list, as_text

#: The Part 10 preamble: 128 bytes of anything, then ``DICM``.
DICM_OFFSET = 128
SNIFF_LENGTH = DICM_OFFSET + 4

#: SOP classes that may carry rows and columns yet are not images to segment, or that never do (by UID prefix).
_NON_IMAGE_SOP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report or key-object selection"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.9.", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data, registration, fiducials or segmentation"),
    ("1.2.840.10008.1.3.10", "media directory (DICOMDIR)"),
)


# ----------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class DicomIdentifiers:
    """What a researcher needs to join a result back to the archive (kept by ``--anonymize``)."""

    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    sop_class_uid: str = ""


@dataclass(frozen=True)
class PatientInfo:
    """Patient identifiers and dates: written only without ``--anonymize``, and scrubbed from outputs with it."""

    name: str = ""
    patient_id: str = ""
    other_ids: tuple[str, ...] = ()
    accession_number: str = ""
    study_date: str = ""
    dates: tuple[str, ...] = ()


@dataclass(frozen=True)
class DicomHeader:
    """Everything read from a DICOM object's header (no pixels): travels from discovery and decoding onwards."""

    identifiers: DicomIdentifiers
    patient: PatientInfo
    calibration: Calibration
    frames: int = 1
    rows: int = 0
    columns: int = 0
    photometric: str = ""
    transfer_syntax: str = ""
    sop_class_name: str = ""
    burned_in_annotation: str = ""
    skip_reason: str | None = None

    @property
    def is_image(self) -> bool:
        return self.skip_reason is None


@dataclass
class DicomFrame:
    """One decoded frame (1-based ``frame``) and the header of the object it came from."""

    pixels: np.ndarray
    header: DicomHeader
    frame: int = 1


# ----------------------------------------------------------------------------------------------------------
# Recognising DICOM


def is_dicom_bytes(head: bytes) -> bool:
    """True when ``head`` (at least the first 132 bytes of a file) has the Part 10 ``DICM`` marker."""
    return len(head) >= SNIFF_LENGTH and head[DICM_OFFSET:SNIFF_LENGTH] == b"DICM"


def sniff_dicom(path: Path) -> bool:
    """Whether a file is DICOM, reading only its first 132 bytes; unreadable files are simply not DICOM here.

    Discovery calls this on every file of a study, so only regular files are opened, and without blocking: a FIFO
    or a device (whatever its name) must not hang the walk.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as fh:
            return is_dicom_bytes(fh.read(SNIFF_LENGTH))
    except OSError:
        return False


def non_image_reason(sop_class_uid: str, has_rows: bool) -> str | None:
    """Why an object is not an image to segment (a one-line reason), or None when it is one."""
    from pydicom.uid import UID

    name = UID(sop_class_uid).name if sop_class_uid else "unknown SOP class"
    for prefix, kind in _NON_IMAGE_SOP_PREFIXES:
        if sop_class_uid.startswith(prefix):
            return f"not an image: {name} ({kind})"
    if not has_rows:
        return f"not an image: {name} (no image pixel module)"
    return None


# ----------------------------------------------------------------------------------------------------------
# Header


def patient_from_dataset(ds: Any) -> PatientInfo:
    """Patient identifiers and every top-level date (DA) or date-time (DT) in the object."""
    dates = []
    for element in ds:  # top level: where the study, series, acquisition and birth dates live
        if element.VR in ("DA", "DT") and element.value:
            dates.extend(as_text(v) for v in as_list(element.value) if as_text(v))
    other_ids = tuple(as_text(v) for v in as_list(ds.get("OtherPatientIDs", None)) if as_text(v))
    return PatientInfo(
        name=as_text(ds.get("PatientName", None)),
        patient_id=as_text(ds.get("PatientID", None)),
        other_ids=other_ids,
        accession_number=as_text(ds.get("AccessionNumber", None)),
        study_date=as_text(ds.get("StudyDate", None)),
        dates=tuple(dict.fromkeys(dates)),
    )


def header_from_dataset(ds: Any) -> DicomHeader:
    """The header record of a parsed dataset (pixels are neither needed nor touched).

    ImageDecodeError when the file meta has no transfer syntax or the object no SOP class: pydicom reads
    garbage after a ``DICM`` marker without complaint, and such a file is corrupt, not a non-image object.
    """
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None) or {}
    sop_class = as_text(ds.get("SOPClassUID", None)) or as_text(meta.get("MediaStorageSOPClassUID", None))
    rows, columns = as_int(ds.get("Rows", None)), as_int(ds.get("Columns", None))
    transfer_syntax = as_text(meta.get("TransferSyntaxUID", None))
    # pydicom parses almost any bytes after DICM; a real Part 10 object always names both of these
    if not transfer_syntax:
        raise ImageDecodeError("corrupt DICOM header: no Transfer Syntax UID in the file meta information")
    if not sop_class:
        raise ImageDecodeError("corrupt DICOM header: no SOP Class UID")
    frames = as_int(ds.get("NumberOfFrames", None))
    return DicomHeader(
        identifiers=DicomIdentifiers(
            study_uid=as_text(ds.get("StudyInstanceUID", None)),
            series_uid=as_text(ds.get("SeriesInstanceUID", None)),
            sop_uid=as_text(ds.get("SOPInstanceUID", None)) or as_text(meta.get("MediaStorageSOPInstanceUID", None)),
            sop_class_uid=sop_class,
        ),
        patient=patient_from_dataset(ds),
        calibration=calibration_from_dataset(ds),
        frames=frames if frames and frames > 0 else 1,
        rows=rows or 0,
        columns=columns or 0,
        photometric=as_text(ds.get("PhotometricInterpretation", None)).upper(),
        transfer_syntax=transfer_syntax,
        sop_class_name=UID(sop_class).name if sop_class else "",
        burned_in_annotation=as_text(ds.get("BurnedInAnnotation", None)).upper(),
        skip_reason=non_image_reason(sop_class, bool(rows) and bool(columns)),
    )


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[-1] if lines else type(err).__name__)[:300]


def _require_pydicom() -> Any:
    """pydicom is an optional dependency (the ``dicom`` extra): without it a DICOM file is a clear error row."""
    try:
        import pydicom
    except ImportError as err:
        raise ImageDecodeError("DICOM file, but pydicom is not installed (pip install 'busi-batch[dicom]')") from err
    return pydicom


def _dcmread(source: Path | bytes | BinaryIO, stop_before_pixels: bool) -> Any:
    pydicom = _require_pydicom()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not is_dicom_bytes(bytes(source[:SNIFF_LENGTH])):
            raise ImageDecodeError("not a DICOM file (no DICM marker at byte 128)")
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)


def read_header(source: Path | bytes) -> DicomHeader:
    """Parse a DICOM header without reading its pixel data; a damaged header is ImageDecodeError."""
    try:
        ds = _dcmread(source, stop_before_pixels=True)
        return header_from_dataset(ds)
    except ImageDecodeError:
        raise
    except OSError as err:
        raise ImageDecodeError(f"cannot read file: {err.strerror or err}") from err
    except Exception as err:  # pydicom raises a wide variety of types for damaged headers
        raise ImageDecodeError(f"corrupt DICOM header: {_one_line(err)}") from err


# ----------------------------------------------------------------------------------------------------------
# Pixels


def to_display_grey(
    array: np.ndarray, photometric: str, bits_stored: int, signed: bool = False
) -> np.ndarray:
    """One decoded frame -> grey ``uint8`` (8 bits stored or fewer) or full-range ``uint16`` (more).

    Signed data is shifted to unsigned, values are clipped to ``bits_stored``, MONOCHROME1 is inverted (its
    largest value is black), more than 8 stored bits are stretched to the full 16-bit range (so a 12-bit
    image is not nearly black, as it would be divided by 65535 as stored), and RGB becomes grey with the luma
    weights OpenCV applies to colour PNGs. ``array`` is (rows, columns) or (rows, columns, 3) RGB.
    """
    photometric = photometric.upper()
    bits = int(bits_stored) if bits_stored else 8 * array.dtype.itemsize
    bits = max(1, min(bits, 16))
    maxval = (1 << bits) - 1
    native = {8: np.uint8, 16: np.uint16}.get(bits)
    if not signed and native is not None and array.dtype == native:  # the usual case: no arithmetic needed
        out = (maxval - array).astype(native) if photometric == "MONOCHROME1" else array
    else:
        values = array.astype(np.int32)
        if signed:
            values += 1 << (bits - 1)
        np.clip(values, 0, maxval, out=values)
        if photometric == "MONOCHROME1":
            values = maxval - values
        if bits <= 8:
            out = (values * 255 // maxval).astype(np.uint8)
        else:
            out = np.rint(values * (65535.0 / maxval)).astype(np.uint16)
    if out.ndim == 3:
        if out.shape[2] == 1:
            out = out[:, :, 0]
        elif out.shape[2] == 3:
            out = cv2.cvtColor(np.ascontiguousarray(out), cv2.COLOR_RGB2GRAY)
        else:
            raise ImageDecodeError(f"unsupported DICOM samples per pixel: {out.shape[2]}")
    return np.ascontiguousarray(out)


def _missing_decoder_reason(transfer_syntax: str) -> str | None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    if not uid or not uid.is_compressed:
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid.name} is not supported"
    if not decoder.is_available:
        return (
            f"transfer syntax {uid.name} needs a pixel-data decoder that is not installed "
            "(pip install 'busi-batch[dicom]', or python-gdcm / pylibjpeg-libjpeg for JPEG lossless)"
        )
    return None


def decode_dicom(data: bytes, frame: int = 1, max_pixels: int = MAX_PIXELS) -> DicomFrame:
    """Decode frame ``frame`` (counted from 1) of a DICOM file's bytes; every failure is ImageDecodeError.

    Only the asked frame is decompressed. The header is checked first: non-image objects, a frame beyond
    NumberOfFrames, or a claimed size above ``max_pixels`` are refused before any pixel is decoded.
    """
    try:
        ds = _dcmread(data, stop_before_pixels=True)
        header = header_from_dataset(ds)
    except ImageDecodeError:
        raise
    except Exception as err:  # pydicom raises a wide variety of types for damaged headers
        raise ImageDecodeError(f"corrupt DICOM header: {_one_line(err)}") from err
    if header.skip_reason:
        raise ImageDecodeError(header.skip_reason)
    if not 1 <= frame <= header.frames:
        raise ImageDecodeError(f"frame {frame} asked for, but the object has {header.frames} frame(s)")
    if header.rows * header.columns > max_pixels:
        raise ImageDecodeError(
            f"image too large: header claims {header.columns}x{header.rows} pixels (limit {max_pixels:,})"
        )
    reason = _missing_decoder_reason(header.transfer_syntax)
    if reason:
        raise ImageDecodeError(reason)
    try:
        from pydicom.pixels import apply_color_lut, pixel_array

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # From the bytes, not from a parsed dataset: only this frame's pixels are read (a 48 MB cine
            # costs about 1.4 ms a frame this way, 60 ms when the whole pixel data is parsed each time).
            array = pixel_array(io.BytesIO(data), index=frame - 1)
            if header.photometric == "PALETTE COLOR":
                array = apply_color_lut(array, ds)
                bits = 8 * array.dtype.itemsize
            else:
                bits = as_int(ds.get("BitsStored", None)) or 8 * array.dtype.itemsize
        signed = as_int(ds.get("PixelRepresentation", 0)) == 1 and header.photometric != "PALETTE COLOR"
        pixels = to_display_grey(array, header.photometric, bits, signed=signed)
    except ImageDecodeError:
        raise
    except Exception as err:  # decoders raise many types for truncated or damaged pixel data
        raise ImageDecodeError(f"corrupt DICOM pixel data: {_one_line(err)}") from err
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageDecodeError(f"unexpected DICOM pixel array shape {pixels.shape}")
    return DicomFrame(pixels=pixels, header=header, frame=frame)


# ----------------------------------------------------------------------------------------------------------
# Frame names


def frame_name(rel: str, frame: int | None) -> str:
    """``<file>#<frame>``: the CSV name of one frame of a multi-frame file (frames count from 1)."""
    return rel if frame is None else f"{rel}#{frame}"


def split_frame_name(name: str) -> tuple[str, int | None]:
    """The inverse of :func:`frame_name`: ``("a/IM1", 3)`` from ``a/IM1#3``; a name without ``#N`` is its own file."""
    match = re.fullmatch(r"(?P<rel>.+)#(?P<frame>[1-9][0-9]*)", name)
    return (match.group("rel"), int(match.group("frame"))) if match else (name, None)
