"""DICOM ultrasound input: recognising objects by content, their pixels, their calibration, and anonymisation.

* :mod:`.decode`: is a file DICOM (``DICM`` at byte 128), its header (identifiers, patient, calibration), one
  frame of its pixels, and the ``file#N`` names of frames;
* :mod:`.calibration`: ultrasound regions and pixel spacings, and the rule that gives an image's pixel size;
* :mod:`.anonymize`: pseudonyms, and scrubbing patient names, IDs and dates from every output.

pydicom (the ``dicom`` extra) is imported only when a header or pixels are read; without it a DICOM file is an
error row with the reason.
"""

from .anonymize import (
    MIN_SCRUB_LENGTH,
    REDACTED,
    Scrubber,
    anonymous_name,
    patient_columns,
    phi_values,
    pseudonym,
    scrub_row,
    scrub_text,
)
from .calibration import (
    SOURCE_IMAGER_PIXEL_SPACING,
    SOURCE_NONE,
    SOURCE_OVERRIDE,
    SOURCE_PIXEL_SPACING,
    SOURCE_US_REGION,
    UNITS_CM,
    Calibration,
    PixelSize,
    UltrasoundRegion,
    calibration_from_dataset,
    choose_region,
    region_pixel_counts,
    regions_from_dataset,
    resolve_pixel_size,
)
from .decode import (
    DICM_OFFSET,
    SNIFF_LENGTH,
    DicomFrame,
    DicomHeader,
    DicomIdentifiers,
    PatientInfo,
    decode_dicom,
    frame_name,
    header_from_dataset,
    is_dicom_bytes,
    non_image_reason,
    patient_from_dataset,
    read_header,
    sniff_dicom,
    split_frame_name,
    to_display_grey,
)

__all__ = [
    "DICM_OFFSET", "MIN_SCRUB_LENGTH", "REDACTED", "SNIFF_LENGTH", "SOURCE_IMAGER_PIXEL_SPACING", "SOURCE_NONE",
    "SOURCE_OVERRIDE", "SOURCE_PIXEL_SPACING", "SOURCE_US_REGION", "UNITS_CM",
    "Calibration", "DicomFrame", "DicomHeader", "DicomIdentifiers", "PatientInfo", "PixelSize", "Scrubber",
    "UltrasoundRegion",
    "anonymous_name", "calibration_from_dataset", "choose_region", "decode_dicom", "frame_name",
    "header_from_dataset", "is_dicom_bytes", "non_image_reason", "patient_columns", "patient_from_dataset",
    "phi_values", "pseudonym", "read_header", "region_pixel_counts", "regions_from_dataset", "resolve_pixel_size",
    "scrub_row", "scrub_text", "sniff_dicom", "split_frame_name", "to_display_grey",
]
