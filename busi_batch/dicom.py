"""DICOM ultrasound objects: recognising them by content, their pixels, their calibration and identifiers.

A clinic's export is a folder of DICOM files, often without an extension, so a file is DICOM when it carries
``DICM`` at byte 128 (the Part 10 preamble); only those 132 bytes are read to decide. Objects without an image
(structured reports, presentation states, key-object selections, encapsulated PDFs, DICOMDIRs, segmentations)
are passed over with a reason, never an error.

Pixels come from pydicom (uncompressed, RLE, and through its plugins JPEG baseline/extended via Pillow,
JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg or Pillow) and are returned in the conventions of
:func:`busi_batch.imageio.decode_image`: grey ``uint8``, or grey ``uint16`` using the full 16-bit range.
MONOCHROME1 is inverted (higher stored value = darker), RGB / YBR / palette colour become grey with the usual
luma weights, and one frame of a multi-frame object is decoded at a time.

Calibration rule (why a region, and which one): an ultrasound image usually holds several regions (the B-mode
image, a Doppler strip, an M-mode trace), each with its own physical scale in the Sequence of Ultrasound Regions
(0018,6011). Only a *spatial* region — ``PhysicalUnitsXDirection`` and ``PhysicalUnitsYDirection`` both cm
(code 3) with non-zero deltas — may scale an area. Among those, the region holding the most lesion-mask pixels
is chosen (ties: the larger region, then the first in the sequence); with an empty mask, the largest spatial
region (the area is 0 mm² anyway). A lesion that lies in no spatial region gets no physical size. PixelSpacing
(0028,0030, also from the shared functional groups of enhanced objects) and then ImagerPixelSpacing
(0018,1164) are used only when the object has no spatial region at all, and ``--pixel-size`` only when it has
no calibration of any kind (and for every non-DICOM input).

Everything here but :func:`sniff_dicom`, :func:`read_header` and :func:`decode_dicom` is a pure function.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from .errors import ImageDecodeError

#: The Part 10 preamble: 128 bytes of anything, then ``DICM``.
DICM_OFFSET = 128
SNIFF_LENGTH = DICM_OFFSET + 4

#: PhysicalUnitsX/YDirection codes (PS3.3 C.8.5.5.1.15); only cm (3) is spatial.
UNITS_CM = 3
UNIT_NAMES = {
    0: "none", 1: "percent", 2: "dB", 3: "cm", 4: "seconds", 5: "hertz", 6: "dB/s", 7: "cm/s", 8: "cm²",
    9: "cm²/s", 10: "cm³", 11: "cm³/s", 12: "degrees",
}

SOURCE_US_REGION = "us_region"
SOURCE_PIXEL_SPACING = "pixel_spacing"
SOURCE_IMAGER_PIXEL_SPACING = "imager_pixel_spacing"
SOURCE_OVERRIDE = "override"
SOURCE_NONE = ""

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
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions; bounds are inclusive pixel coordinates."""

    x0: int
    y0: int
    x1: int
    y1: int
    units_x: int | None = None
    units_y: int | None = None
    delta_x: float | None = None
    delta_y: float | None = None
    data_type: int | None = None
    spatial_format: int | None = None

    @property
    def is_spatial(self) -> bool:
        """Both axes in cm with a usable scale: the only regions that may turn pixels into mm²."""
        return (
            self.units_x == UNITS_CM and self.units_y == UNITS_CM
            and bool(self.delta_x) and bool(self.delta_y)
            and np.isfinite(self.delta_x) and np.isfinite(self.delta_y)
            and self.x1 >= self.x0 and self.y1 >= self.y0
        )

    @property
    def pixel_size_mm(self) -> tuple[float, float]:
        """(x, y) pixel size in mm: the deltas are cm per pixel; the sign only says the axis direction."""
        return abs(float(self.delta_x or 0.0)) * 10.0, abs(float(self.delta_y or 0.0)) * 10.0

    @property
    def n_pixels(self) -> int:
        return max(0, self.x1 - self.x0 + 1) * max(0, self.y1 - self.y0 + 1)

    def describe(self) -> str:
        ux, uy = UNIT_NAMES.get(self.units_x, str(self.units_x)), UNIT_NAMES.get(self.units_y, str(self.units_y))
        return f"({self.x0},{self.y0})-({self.x1},{self.y1}) units {ux} x {uy}"


@dataclass(frozen=True)
class Calibration:
    """What a DICOM object says about its physical pixel size. Spacings are (row, column) in mm, as stored."""

    regions: tuple[UltrasoundRegion, ...] = ()
    pixel_spacing: tuple[float, float] | None = None
    imager_pixel_spacing: tuple[float, float] | None = None

    @property
    def spatial_regions(self) -> tuple[UltrasoundRegion, ...]:
        return tuple(r for r in self.regions if r.is_spatial)

    @property
    def calibrated(self) -> bool:
        """Any physical scale at all: then ``--pixel-size`` never applies, even when no region holds the lesion."""
        return bool(self.spatial_regions) or self.pixel_spacing is not None or self.imager_pixel_spacing is not None


@dataclass(frozen=True)
class PixelSize:
    """The physical size of one pixel used for an image's mm², and where it came from.

    ``source`` is one of ``us_region``, ``pixel_spacing``, ``imager_pixel_spacing``, ``override`` or empty
    (unknown: no mm²); ``region`` is the index of the chosen ultrasound region; ``note`` says why none was used.
    """

    x_mm: float | None = None
    y_mm: float | None = None
    source: str = SOURCE_NONE
    region: int | None = None
    note: str = ""

    @property
    def known(self) -> bool:
        return self.x_mm is not None and self.y_mm is not None

    def area_mm2(self, area_px: int) -> float | None:
        """Area of ``area_px`` pixels in mm², or None when the pixel size is unknown."""
        if not self.known:
            return None
        return float(area_px) * float(self.x_mm) * float(self.y_mm)


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


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        result = None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None
    return result if result is not None and np.isfinite(result) else None


def _spacing(value: Any) -> tuple[float, float] | None:
    """A (row, column) spacing in mm from a 2-valued DS, or None when missing or not positive."""
    try:
        pair = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(np.isfinite(v) and v > 0 for v in pair):
        return None
    return pair[0], pair[1]


def regions_from_dataset(ds: Any) -> tuple[UltrasoundRegion, ...]:
    """Every item of (0018,6011) with its four bounds; items without bounds are dropped (they locate nothing)."""
    regions = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or ():
        bounds = [_int(item.get(k)) for k in
                  ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")]
        if any(b is None for b in bounds):
            continue
        regions.append(UltrasoundRegion(
            x0=bounds[0], y0=bounds[1], x1=bounds[2], y1=bounds[3],
            units_x=_int(item.get("PhysicalUnitsXDirection")), units_y=_int(item.get("PhysicalUnitsYDirection")),
            delta_x=_float(item.get("PhysicalDeltaX")), delta_y=_float(item.get("PhysicalDeltaY")),
            data_type=_int(item.get("RegionDataType")), spatial_format=_int(item.get("RegionSpatialFormat")),
        ))
    return tuple(regions)


def calibration_from_dataset(ds: Any) -> Calibration:
    """Regions, PixelSpacing (top level, else the shared functional groups) and ImagerPixelSpacing."""
    pixel_spacing = _spacing(ds.get("PixelSpacing", None))
    if pixel_spacing is None:
        for group in ds.get("SharedFunctionalGroupsSequence", None) or ():
            for measures in group.get("PixelMeasuresSequence", None) or ():
                pixel_spacing = pixel_spacing or _spacing(measures.get("PixelSpacing", None))
    return Calibration(
        regions=regions_from_dataset(ds),
        pixel_spacing=pixel_spacing,
        imager_pixel_spacing=_spacing(ds.get("ImagerPixelSpacing", None)),
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _as_list(value: Any) -> list[Any]:
    """A DICOM value as a list: multi-valued elements are sequences, single values are not."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def patient_from_dataset(ds: Any) -> PatientInfo:
    """Patient identifiers and every top-level date (DA) or date-time (DT) in the object."""
    dates = []
    for element in ds:  # top level: where the study, series, acquisition and birth dates live
        if element.VR in ("DA", "DT") and element.value:
            dates.extend(_text(v) for v in _as_list(element.value) if _text(v))
    other_ids = tuple(_text(v) for v in _as_list(ds.get("OtherPatientIDs", None)) if _text(v))
    return PatientInfo(
        name=_text(ds.get("PatientName", None)),
        patient_id=_text(ds.get("PatientID", None)),
        other_ids=other_ids,
        accession_number=_text(ds.get("AccessionNumber", None)),
        study_date=_text(ds.get("StudyDate", None)),
        dates=tuple(dict.fromkeys(dates)),
    )


def header_from_dataset(ds: Any) -> DicomHeader:
    """The header record of a parsed dataset (pixels are neither needed nor touched).

    ImageDecodeError when the file meta has no transfer syntax or the object no SOP class: pydicom reads
    garbage after a ``DICM`` marker without complaint, and such a file is corrupt, not a non-image object.
    """
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None) or {}
    sop_class = _text(ds.get("SOPClassUID", None)) or _text(meta.get("MediaStorageSOPClassUID", None))
    rows, columns = _int(ds.get("Rows", None)), _int(ds.get("Columns", None))
    transfer_syntax = _text(meta.get("TransferSyntaxUID", None))
    # pydicom parses almost any bytes after DICM; a real Part 10 object always names both of these
    if not transfer_syntax:
        raise ImageDecodeError("corrupt DICOM header: no Transfer Syntax UID in the file meta information")
    if not sop_class:
        raise ImageDecodeError("corrupt DICOM header: no SOP Class UID")
    frames = _int(ds.get("NumberOfFrames", None))
    return DicomHeader(
        identifiers=DicomIdentifiers(
            study_uid=_text(ds.get("StudyInstanceUID", None)),
            series_uid=_text(ds.get("SeriesInstanceUID", None)),
            sop_uid=_text(ds.get("SOPInstanceUID", None)) or _text(meta.get("MediaStorageSOPInstanceUID", None)),
            sop_class_uid=sop_class,
        ),
        patient=patient_from_dataset(ds),
        calibration=calibration_from_dataset(ds),
        frames=frames if frames and frames > 0 else 1,
        rows=rows or 0,
        columns=columns or 0,
        photometric=_text(ds.get("PhotometricInterpretation", None)).upper(),
        transfer_syntax=transfer_syntax,
        sop_class_name=UID(sop_class).name if sop_class else "",
        burned_in_annotation=_text(ds.get("BurnedInAnnotation", None)).upper(),
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


def decode_dicom(data: bytes, frame: int = 1, max_pixels: int | None = None) -> DicomFrame:
    """Decode frame ``frame`` (counted from 1) of a DICOM file's bytes; every failure is ImageDecodeError.

    Only the asked frame is decompressed. The header is checked first: non-image objects, a frame beyond
    NumberOfFrames, or a claimed size above ``max_pixels`` are refused before any pixel is decoded.
    """
    from .imageio import MAX_PIXELS

    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
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
                bits = _int(ds.get("BitsStored", None)) or 8 * array.dtype.itemsize
        signed = _int(ds.get("PixelRepresentation", 0)) == 1 and header.photometric != "PALETTE COLOR"
        pixels = to_display_grey(array, header.photometric, bits, signed=signed)
    except ImageDecodeError:
        raise
    except Exception as err:  # decoders raise many types for truncated or damaged pixel data
        raise ImageDecodeError(f"corrupt DICOM pixel data: {_one_line(err)}") from err
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageDecodeError(f"unexpected DICOM pixel array shape {pixels.shape}")
    return DicomFrame(pixels=pixels, header=header, frame=frame)


# ----------------------------------------------------------------------------------------------------------
# Calibration


def region_pixel_counts(regions: tuple[UltrasoundRegion, ...], mask: np.ndarray) -> list[int]:
    """How many mask pixels fall inside each region's (inclusive, clipped) bounds."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape[:2]
    counts = []
    for r in regions:
        x0, y0 = max(r.x0, 0), max(r.y0, 0)
        x1, y1 = min(r.x1, width - 1), min(r.y1, height - 1)
        counts.append(int(np.count_nonzero(mask[y0:y1 + 1, x0:x1 + 1])) if x1 >= x0 and y1 >= y0 else 0)
    return counts


def choose_region(
    regions: tuple[UltrasoundRegion, ...], mask: np.ndarray | None
) -> tuple[int | None, str]:
    """Index (into ``regions``) of the spatial region that calibrates the lesion, or None with the reason.

    The rule: the spatial region holding the most mask pixels (ties: larger region, then sequence order);
    with no mask or an empty one, the largest spatial region. Non-spatial regions (Doppler velocity, time,
    M-mode) are never candidates.
    """
    spatial = [i for i, r in enumerate(regions) if r.is_spatial]
    if not spatial:
        return None, "no ultrasound region is calibrated in cm on both axes"
    if mask is None or not np.any(mask):
        return max(spatial, key=lambda i: (regions[i].n_pixels, -i)), ""
    counts = region_pixel_counts(tuple(regions[i] for i in spatial), mask)
    best = max(range(len(spatial)), key=lambda k: (counts[k], regions[spatial[k]].n_pixels, -spatial[k]))
    if counts[best] == 0:
        return None, "the lesion lies in no ultrasound region calibrated in cm"
    return spatial[best], ""


def resolve_pixel_size(
    calibration: Calibration | None, mask: np.ndarray | None = None, override_mm: float | None = None
) -> PixelSize:
    """The pixel size for one image's mm², by the module's calibration rule (see the module docstring).

    ``calibration`` is None for non-DICOM inputs, whose only source is ``override_mm`` (``--pixel-size``).
    """
    if calibration is not None:
        if calibration.spatial_regions:
            index, note = choose_region(calibration.regions, mask)
            if index is None:
                return PixelSize(note=note)
            x_mm, y_mm = calibration.regions[index].pixel_size_mm
            return PixelSize(x_mm=x_mm, y_mm=y_mm, source=SOURCE_US_REGION, region=index)
        if calibration.pixel_spacing is not None:
            row, col = calibration.pixel_spacing
            return PixelSize(x_mm=col, y_mm=row, source=SOURCE_PIXEL_SPACING)
        if calibration.imager_pixel_spacing is not None:
            row, col = calibration.imager_pixel_spacing
            return PixelSize(x_mm=col, y_mm=row, source=SOURCE_IMAGER_PIXEL_SPACING)
    if override_mm is not None:
        return PixelSize(x_mm=float(override_mm), y_mm=float(override_mm), source=SOURCE_OVERRIDE)
    return PixelSize(note="no calibration in the DICOM header" if calibration is not None else "")


# ----------------------------------------------------------------------------------------------------------
# Names and anonymisation


def frame_name(rel: str, frame: int | None) -> str:
    """``<file>#<frame>``: the CSV name of one frame of a multi-frame file (frames count from 1)."""
    return rel if frame is None else f"{rel}#{frame}"


def split_frame_name(name: str) -> tuple[str, int | None]:
    """The inverse of :func:`frame_name`: ``("a/IM1", 3)`` from ``a/IM1#3``; a name without ``#N`` is its own file."""
    match = re.fullmatch(r"(?P<rel>.+)#(?P<frame>[1-9][0-9]*)", name)
    return (match.group("rel"), int(match.group("frame"))) if match else (name, None)


def pseudonym(identifiers: DicomIdentifiers, fallback: str) -> str:
    """The name an image gets under ``--anonymize`` instead of its path (folder names often name the patient).

    The SOP Instance UID when there is one (it is the join key anyway), else a hash of ``fallback``.
    """
    if identifiers.sop_uid and re.fullmatch(r"[0-9.]{1,64}", identifiers.sop_uid):
        return identifiers.sop_uid
    return "dicom-" + hashlib.sha256(fallback.encode("utf-8", "surrogateescape")).hexdigest()[:16]


#: Shorter name parts and identifiers are not scrubbed from free text: "LI" or "7" would mangle everything.
MIN_SCRUB_LENGTH = 3
REDACTED = "[removed]"


#: Separators a date is written with between its parts (none: 20190417, 17042019).
_DATE_SEPARATORS = ("", "-", ".", "/", "_", " ")


def _date_forms(value: str) -> list[str]:
    """A DICOM date (YYYYMMDD, or the date part of a DT) and the usual ways it is spelled elsewhere: year first,
    day first or month first, with any of ``_DATE_SEPARATORS`` (2019-04-17, 17.04.2019, 04/17/2019, 17042019...)."""
    digits = value[:8]
    if not re.fullmatch(r"\d{8}", digits):
        return [value] if len(value) >= MIN_SCRUB_LENGTH else []
    y, m, d = digits[:4], digits[4:6], digits[6:]
    return [sep.join(parts) for sep in _DATE_SEPARATORS for parts in ((y, m, d), (d, m, y), (m, d, y))]


def phi_values(patient: PatientInfo) -> frozenset[str]:
    """Strings that must not appear in any output under ``--anonymize``: name (whole and each part), IDs, dates."""
    values: set[str] = set()
    if patient.name:
        values.add(patient.name.strip("^ "))
        values.update(part for part in re.split(r"[\^=\s,]+", patient.name) if part)
    values.update(v for v in (patient.patient_id, patient.accession_number, *patient.other_ids) if v)
    for date in (patient.study_date, *patient.dates):
        if date:
            values.update(_date_forms(date))
    return frozenset(v for v in values if len(v) >= MIN_SCRUB_LENGTH)


def scrub_text(text: str, values: frozenset[str] | set[str]) -> str:
    """``text`` with every occurrence of ``values``, case-insensitive and wherever it stands (glued to letters or
    digits too: ``DoeJane_PID73921x``), replaced by ``[removed]``.

    One pass, longest values first, so no value is left in what was there: a name in any order of its parts
    (each part is a value), an ID inside a longer token, a date in any spelling :func:`phi_values` lists. The price:
    a name part also goes where it is part of an ordinary word (a surname "Ann" out of "annotation"). The only
    text the result can show that matches a value is the word ``removed`` of the marker itself.
    """
    if not values or not text:
        return text
    pattern = "|".join(re.escape(v) for v in sorted(values, key=lambda v: (-len(v), v)))
    return re.sub(pattern, REDACTED, text, flags=re.IGNORECASE)


@dataclass
class Scrubber:
    """Collects the patient values of every DICOM object seen in a run and removes them from output text."""

    values: set[str] = field(default_factory=set)

    def add(self, patient: PatientInfo) -> None:
        self.values.update(phi_values(patient))

    def __call__(self, text: str) -> str:
        return scrub_text(text, self.values)
