"""The physical size of a DICOM object's pixels: its calibration as stored, and the rule that picks one scale.

An ultrasound image usually holds several regions (the B-mode image, a Doppler strip, an M-mode trace), each with
its own physical scale in the Sequence of Ultrasound Regions (0018,6011). Only a *spatial* region —
``PhysicalUnitsXDirection`` and ``PhysicalUnitsYDirection`` both cm (code 3) with non-zero deltas — may scale an
area. Among those, the region holding the most lesion-mask pixels is chosen (ties: the larger region, then the
first in the sequence); with an empty mask, the largest spatial region (the area is 0 mm² anyway). A lesion that
lies in no spatial region gets no physical size. PixelSpacing (0028,0030, also from the shared functional groups
of enhanced objects) and then ImagerPixelSpacing (0018,1164) are used only when the object has no spatial region
at all, and ``--pixel-size`` only when it has no calibration of any kind (and for every non-DICOM input).

Every function here is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .values import as_float, as_int

#: PhysicalUnitsX/YDirection code (PS3.3 C.8.5.5.1.15) of cm, the only spatial unit.
UNITS_CM = 3

SOURCE_US_REGION = "us_region"
SOURCE_PIXEL_SPACING = "pixel_spacing"
SOURCE_IMAGER_PIXEL_SPACING = "imager_pixel_spacing"
SOURCE_OVERRIDE = "override"
SOURCE_NONE = ""


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


# ----------------------------------------------------------------------------------------------------------
# From the header


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
        bounds = [as_int(item.get(k)) for k in
                  ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")]
        if any(b is None for b in bounds):
            continue
        regions.append(UltrasoundRegion(
            x0=bounds[0], y0=bounds[1], x1=bounds[2], y1=bounds[3],
            units_x=as_int(item.get("PhysicalUnitsXDirection")), units_y=as_int(item.get("PhysicalUnitsYDirection")),
            delta_x=as_float(item.get("PhysicalDeltaX")), delta_y=as_float(item.get("PhysicalDeltaY")),
            data_type=as_int(item.get("RegionDataType")), spatial_format=as_int(item.get("RegionSpatialFormat")),
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


# ----------------------------------------------------------------------------------------------------------
# The rule


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
    """The pixel size for one image's mm², by the calibration rule of this module's docstring.

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
