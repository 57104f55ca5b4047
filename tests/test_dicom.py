"""DICOM input: recognition by content, pixels, ultrasound-region calibration, identifiers and anonymisation.

Every DICOM file here is built with pydicom in ``tmp_path``; expected pixels, pixel sizes and mm² areas are
computed by hand in the tests (the comments show the arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# pydicom is part of the test extra: a missing or renamed module fails here, it never skips the DICOM suite.
import pydicom  # noqa: E402

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.sequence import Sequence as DicomSequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    ExplicitVRLittleEndian,
    UID,
)

from busi_batch import dicom  # noqa: E402
from busi_batch.dicom import (  # noqa: E402
    Calibration,
    DicomIdentifiers,
    PatientInfo,
    UltrasoundRegion,
    choose_region,
    decode_dicom,
    is_dicom_bytes,
    phi_values,
    read_header,
    resolve_pixel_size,
    scrub_text,
    sniff_dicom,
)
from busi_batch.errors import ImageDecodeError  # noqa: E402

US_IMAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
US_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")
COMPREHENSIVE_SR = UID("1.2.840.10008.5.1.4.1.1.88.33")
GSPS = UID("1.2.840.10008.5.1.4.1.1.11.1")

PATIENT = {"PatientName": "DOE^JANE", "PatientID": "PID73921", "PatientBirthDate": "19610307",
           "StudyDate": "20190417", "SeriesDate": "20190417", "AccessionNumber": "ACC55120"}
STUDY_UID, SERIES_UID = "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002"


# --------------------------------------------------------------------------------------------------------
# Building DICOM files (also used by test_dicom_cli.py)


def us_region(
    x0: int, y0: int, x1: int, y1: int, dx: float, dy: float, ux: int = 3, uy: int = 3, data_type: int = 1,
    spatial_format: int = 1,
) -> Dataset:
    """One item of the Sequence of Ultrasound Regions; dx, dy in the units ux, uy (3 = cm, 4 = s, 7 = cm/s)."""
    item = Dataset()
    item.RegionSpatialFormat = spatial_format
    item.RegionDataType = data_type
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    item.PhysicalUnitsXDirection, item.PhysicalUnitsYDirection = ux, uy
    item.PhysicalDeltaX, item.PhysicalDeltaY = dx, dy
    return item


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    regions: Sequence[Dataset] = (),
    pixel_spacing: Sequence[float] | None = None,
    imager_pixel_spacing: Sequence[float] | None = None,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    sop_class: UID | None = None,
    sop_uid: str | None = None,
    patient: dict[str, str] | None = None,
    encoded_frames: list[bytes] | None = None,
) -> Path:
    """Write a Part 10 file (preamble + DICM) holding ``pixels`` (rows, cols[, 3]) or (frames, rows, cols[, 3]).

    ``transfer_syntax`` RLE / JPEG-LS / JPEG 2000 are encoded by pydicom's encoders; ``encoded_frames`` gives
    already-compressed frames (JPEG baseline from OpenCV), written encapsulated under ``transfer_syntax``.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    multiframe = pixels.ndim == 4 or (pixels.ndim == 3 and photometric in ("MONOCHROME1", "MONOCHROME2"))
    sop_class = sop_class or (US_MULTIFRAME if multiframe else US_IMAGE)
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.Modality = "US"
    for key, value in (PATIENT if patient is None else patient).items():
        setattr(ds, key, value)
    bits = bits_stored or 8 * pixels.dtype.itemsize
    ds.set_pixel_data(pixels, photometric, bits)
    ds.SOPInstanceUID = sop_uid or pydicom.uid.generate_uid()
    if regions:
        ds.SequenceOfUltrasoundRegions = DicomSequence(list(regions))
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing)
    if encoded_frames is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate(encoded_frames)
        ds["PixelData"].VR = "OB"
        if photometric == "RGB" and transfer_syntax == JPEGBaseline8Bit:
            ds.PhotometricInterpretation = "YBR_FULL_422"
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_sr(path: Path) -> Path:
    """A minimal Comprehensive SR: a DICOM object with no image to segment."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = COMPREHENSIVE_SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(rows: int = 48, cols: int = 64, dtype: type = np.uint8, top: int = 255) -> np.ndarray:
    """A deterministic test pattern whose every value is known."""
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x * 7 + y * 13) % (top + 1)).astype(dtype)


# --------------------------------------------------------------------------------------------------------
# Recognition


def test_sniff_recognises_dicom_by_content_not_name(tmp_path: Path) -> None:
    no_extension = make_dicom(tmp_path / "IM0001", gradient())
    misleading = make_dicom(tmp_path / "scan.txt", gradient())
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), gradient())
    short = tmp_path / "short"
    short.write_bytes(b"\0" * 100)
    assert sniff_dicom(no_extension) and sniff_dicom(misleading)
    assert not sniff_dicom(png) and not sniff_dicom(short) and not sniff_dicom(tmp_path)
    assert not sniff_dicom(tmp_path / "missing")
    assert is_dicom_bytes(b"\0" * 128 + b"DICM") and not is_dicom_bytes(b"\0" * 128 + b"DICX")


def test_header_counts_frames_without_pixels(tmp_path: Path) -> None:
    frames = np.stack([np.full((20, 30), v, np.uint8) for v in (10, 20, 30)])
    path = make_dicom(tmp_path / "cine", frames)
    header = read_header(path)
    assert (header.frames, header.rows, header.columns) == (3, 20, 30)
    assert header.is_image and header.sop_class_name == "Ultrasound Multi-frame Image Storage"
    assert read_header(make_dicom(tmp_path / "single", gradient())).frames == 1


def test_structured_report_and_presentation_state_are_not_images(tmp_path: Path) -> None:
    sr = read_header(make_sr(tmp_path / "SR0001"))
    assert not sr.is_image
    assert sr.skip_reason == "not an image: Comprehensive SR Storage (structured report or key-object selection)"
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_dicom((tmp_path / "SR0001").read_bytes())
    assert "presentation state" in dicom.non_image_reason(GSPS, has_rows=False)
    assert "no image pixel module" in dicom.non_image_reason("1.2.840.10008.5.1.4.1.1.481.3", has_rows=False)
    assert dicom.non_image_reason(US_IMAGE, has_rows=True) is None


def test_identifiers_and_patient_are_read(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a", gradient(), sop_uid="1.2.826.0.1.3680043.8.498.77")
    header = read_header(path)
    assert header.identifiers == DicomIdentifiers(
        study_uid=STUDY_UID, series_uid=SERIES_UID, sop_uid="1.2.826.0.1.3680043.8.498.77", sop_class_uid=US_IMAGE
    )
    assert header.patient.name == "DOE^JANE" and header.patient.patient_id == "PID73921"
    assert header.patient.study_date == "20190417"
    assert set(header.patient.dates) == {"19610307", "20190417"}
    assert header.patient.accession_number == "ACC55120"


# --------------------------------------------------------------------------------------------------------
# Pixels


def test_monochrome2_8bit_pixels_are_exact(tmp_path: Path) -> None:
    image = gradient()
    decoded = decode_dicom(make_dicom(tmp_path / "m2", image).read_bytes())
    assert decoded.pixels.dtype == np.uint8 and decoded.frame == 1
    np.testing.assert_array_equal(decoded.pixels, image)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    image = gradient()
    decoded = decode_dicom(make_dicom(tmp_path / "m1", image, photometric="MONOCHROME1").read_bytes())
    np.testing.assert_array_equal(decoded.pixels, 255 - image)  # stored 0 is white in MONOCHROME1


def test_monochrome1_12bit_is_inverted_and_stretched_to_16_bits(tmp_path: Path) -> None:
    image = np.array([[0, 4095, 2048, 1]], dtype=np.uint16)
    decoded = decode_dicom(make_dicom(tmp_path / "m1", image, photometric="MONOCHROME1", bits_stored=12).read_bytes())
    # inverted: 4095 - v, then * 65535 / 4095 (= 16.00366...): 0 -> 65535, 4095 -> 0,
    # 2048 -> 2047 * 16.00366 = 32759.498 -> 32759, 1 -> 4094 * 16.00366 = 65518.996 -> 65519
    assert decoded.pixels.dtype == np.uint16
    assert decoded.pixels.tolist() == [[65535, 0, 32759, 65519]]


def test_monochrome2_12bit_and_signed_16bit(tmp_path: Path) -> None:
    twelve = decode_dicom(make_dicom(
        tmp_path / "m12", np.array([[0, 4095, 100]], dtype=np.uint16), bits_stored=12).read_bytes())
    assert twelve.pixels.tolist() == [[0, 65535, 1600]]  # 100 * 16.00366 = 1600.37 -> 1600
    signed = decode_dicom(make_dicom(
        tmp_path / "s16", np.array([[-32768, 0, 32767]], dtype=np.int16), bits_stored=16).read_bytes())
    assert signed.pixels.tolist() == [[0, 32768, 65535]]  # shifted by 2**15 to unsigned


RGB_PATCHES = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [128, 128, 128]]], np.uint8)
# luma 0.299 R + 0.587 G + 0.114 B: red 76.2 -> 76, green 149.7 -> 150, blue 29.1 -> 29, white 255, grey 128
RGB_GREY = [[76, 150, 29, 255, 128]]


def test_rgb_becomes_grey_with_luma_weights(tmp_path: Path) -> None:
    decoded = decode_dicom(make_dicom(tmp_path / "rgb", RGB_PATCHES, photometric="RGB").read_bytes())
    assert decoded.pixels.ndim == 2 and decoded.pixels.tolist() == RGB_GREY


def test_ybr_full_becomes_grey(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    ybr = convert_color_space(RGB_PATCHES, "RGB", "YBR_FULL")
    decoded = decode_dicom(make_dicom(tmp_path / "ybr", ybr, photometric="YBR_FULL").read_bytes())
    assert np.abs(decoded.pixels.astype(int) - np.array(RGB_GREY)).max() <= 2  # 8-bit colour round trip


def test_palette_colour_becomes_grey(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "pal", np.array([[0, 1, 2]], dtype=np.uint8), photometric="PALETTE COLOR")
    ds = pydicom.dcmread(path)
    # 3-entry 16-bit palette: index 0 red, 1 green, 2 white
    lut = {"Red": [65535, 0, 65535], "Green": [0, 65535, 65535], "Blue": [0, 0, 65535]}
    for colour, entries in lut.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [3, 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(entries, "<u2").tobytes())
    ds.save_as(path, enforce_file_format=True)
    decoded = decode_dicom(path.read_bytes())
    # 16-bit luma: red 0.299 * 65535 = 19595, green 0.587 * 65535 = 38469, white 65535 (±1 for fixed point)
    assert np.abs(decoded.pixels.astype(int) - [[19595, 38469, 65535]]).max() <= 1


def test_multiframe_decodes_only_the_asked_frame(tmp_path: Path) -> None:
    frames = np.stack([gradient() // 4 + 60 * k for k in range(3)]).astype(np.uint8)
    data = make_dicom(tmp_path / "cine", frames).read_bytes()
    for k in (1, 2, 3):
        np.testing.assert_array_equal(decode_dicom(data, frame=k).pixels, frames[k - 1])
    with pytest.raises(ImageDecodeError, match="frame 4 asked for, but the object has 3 frame"):
        decode_dicom(data, frame=4)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_lossless_compressed_syntaxes_decode_exactly(tmp_path: Path, syntax: UID) -> None:
    if not get_decoder(syntax).is_available:
        pytest.skip(f"no decoder installed for {syntax.name}")
    frames = np.stack([gradient(), 255 - gradient()])
    data = make_dicom(tmp_path / "c", frames, transfer_syntax=syntax).read_bytes()
    assert read_header(data).transfer_syntax == syntax
    np.testing.assert_array_equal(decode_dicom(data, frame=2).pixels, 255 - gradient())


def test_jpeg_baseline_grey_and_colour(tmp_path: Path) -> None:
    grey = cv2.GaussianBlur(gradient(), (5, 5), 0)  # smooth content: JPEG error stays small
    ok, jpeg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    data = make_dicom(tmp_path / "jg", grey, transfer_syntax=JPEGBaseline8Bit,
                      encoded_frames=[jpeg.tobytes()]).read_bytes()
    decoded = decode_dicom(data).pixels
    assert decoded.shape == grey.shape and np.abs(decoded.astype(int) - grey).mean() < 2.0

    rgb = np.repeat(np.repeat(RGB_PATCHES, 16, axis=0), 16, axis=1)  # 16 x 80: flat 16-pixel patches
    ok, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])  # OpenCV wants BGR
    data = make_dicom(tmp_path / "jc", rgb, photometric="RGB", transfer_syntax=JPEGBaseline8Bit,
                      encoded_frames=[jpeg.tobytes()]).read_bytes()
    assert read_header(data).photometric == "YBR_FULL_422"
    decoded = decode_dicom(data).pixels
    centres = decoded[8, 8::16].astype(int)  # centre of each patch, away from chroma bleeding at the edges
    assert np.abs(centres - np.array(RGB_GREY[0])).max() <= 4


def test_corrupt_dicoms_are_one_line_errors(tmp_path: Path) -> None:
    garbage = b"\0" * 128 + b"DICM" + bytes(range(256)) * 4
    with pytest.raises(ImageDecodeError, match="corrupt DICOM header") as info:
        decode_dicom(garbage)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageDecodeError, match="corrupt DICOM header"):
        read_header(garbage)

    whole = make_dicom(tmp_path / "t", gradient()).read_bytes()
    with pytest.raises(ImageDecodeError, match="corrupt DICOM pixel data") as info:
        decode_dicom(whole[:-500])  # pixel data cut short
    assert "\n" not in str(info.value)
    with pytest.raises(ImageDecodeError, match="not a DICOM file"):
        decode_dicom(b"\x89PNG" + b"\0" * 200)


def test_missing_decoder_is_named(tmp_path: Path) -> None:
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG lossless decoder is installed here")
    data = make_dicom(tmp_path / "jl", gradient(), transfer_syntax=JPEGLosslessSV1,
                      encoded_frames=[b"\xff\xd8\xff\xd9"]).read_bytes()
    with pytest.raises(ImageDecodeError, match="needs a pixel-data decoder that is not installed"):
        decode_dicom(data)


def test_header_size_refused_before_decoding(tmp_path: Path) -> None:
    data = make_dicom(tmp_path / "big", gradient()).read_bytes()
    with pytest.raises(ImageDecodeError, match="image too large: header claims 64x48"):
        decode_dicom(data, max_pixels=1000)


# --------------------------------------------------------------------------------------------------------
# Calibration: files built with regions, the choice and the mm² checked against hand-computed values


def rect_mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def test_single_bmode_region_gives_mm_and_area(tmp_path: Path) -> None:
    # 0.005 cm = 0.05 mm across, 0.008 cm = 0.08 mm down
    path = make_dicom(tmp_path / "a", gradient(48, 64), regions=[us_region(0, 0, 63, 47, 0.005, 0.008)])
    calibration = read_header(path).calibration
    mask = rect_mask((48, 64), slice(10, 20), slice(20, 35))  # 10 rows x 15 columns = 150 px
    size = resolve_pixel_size(calibration, mask)
    assert size.source == "us_region" and size.region == 0
    assert (size.x_mm, size.y_mm) == pytest.approx((0.05, 0.08))
    assert size.area_mm2(int(mask.sum())) == pytest.approx(0.6)  # 150 * 0.05 * 0.08


def bmode_and_doppler(tmp_path: Path, doppler_first: bool = False, pixel_spacing: bool = False) -> Calibration:
    """100 x 80 image: B-mode on rows 0-39 (0.01 cm = 0.1 mm square pixels), spectral Doppler on rows 40-79
    (x in seconds, y in cm/s: 0.02 s and 2.5 cm/s per pixel, which must never become mm)."""
    bmode = us_region(0, 0, 99, 39, 0.01, 0.01)
    doppler = us_region(0, 40, 99, 79, 0.02, 2.5, ux=4, uy=7, data_type=3, spatial_format=3)
    regions = [doppler, bmode] if doppler_first else [bmode, doppler]
    path = make_dicom(tmp_path / "bd", gradient(80, 100), regions=regions,
                      pixel_spacing=[0.3, 0.3] if pixel_spacing else None)
    return read_header(path).calibration


def test_lesion_in_bmode_region_uses_it_not_the_doppler_one(tmp_path: Path) -> None:
    calibration = bmode_and_doppler(tmp_path, doppler_first=True)
    assert len(calibration.regions) == 2 and len(calibration.spatial_regions) == 1
    mask = rect_mask((80, 100), slice(5, 15), slice(10, 30))  # 10 x 20 = 200 px in the B-mode region
    size = resolve_pixel_size(calibration, mask)
    assert size.source == "us_region" and size.region == 1  # the B-mode item, second in the sequence
    assert size.area_mm2(200) == pytest.approx(2.0)  # 200 * 0.1 * 0.1

    mostly_doppler = rect_mask((80, 100), slice(36, 50), slice(0, 5))  # 4 rows B-mode, 10 rows Doppler
    size = resolve_pixel_size(calibration, mostly_doppler)
    assert size.region == 1 and size.area_mm2(70) == pytest.approx(0.7)


def test_lesion_only_in_doppler_region_gets_no_area(tmp_path: Path) -> None:
    calibration = bmode_and_doppler(tmp_path, pixel_spacing=True)
    mask = rect_mask((80, 100), slice(50, 60), slice(10, 30))
    size = resolve_pixel_size(calibration, mask, override_mm=0.5)
    # region calibration exists, so neither PixelSpacing nor --pixel-size stands in for it
    assert not size.known and size.source == "" and size.area_mm2(200) is None
    assert size.note == "the lesion lies in no ultrasound region calibrated in cm"


def test_two_spatial_regions_majority_of_lesion_pixels_wins(tmp_path: Path) -> None:
    # dual view: left half 0.1 mm pixels, right half 0.2 mm pixels
    regions = [us_region(0, 0, 49, 79, 0.01, 0.01), us_region(50, 0, 99, 79, 0.02, 0.02)]
    calibration = read_header(make_dicom(tmp_path / "dual", gradient(80, 100), regions=regions)).calibration
    mask = rect_mask((80, 100), slice(10, 20), slice(47, 57))  # 10 rows: 3 columns left, 7 right = 30 + 70
    assert dicom.region_pixel_counts(calibration.regions, mask) == [30, 70]
    size = resolve_pixel_size(calibration, mask)
    assert size.region == 1 and size.area_mm2(100) == pytest.approx(4.0)  # 100 * 0.2 * 0.2


def test_empty_mask_uses_largest_spatial_region() -> None:
    regions = (UltrasoundRegion(0, 0, 9, 9, 3, 3, 0.01, 0.01), UltrasoundRegion(10, 0, 99, 79, 3, 3, 0.02, 0.02))
    assert choose_region(regions, np.zeros((80, 100), bool)) == (1, "")
    assert choose_region(regions, None) == (1, "")


def test_non_spatial_regions_are_never_candidates() -> None:
    m_mode = UltrasoundRegion(0, 0, 99, 79, units_x=4, units_y=3, delta_x=0.001, delta_y=0.01)  # s x cm
    velocity = UltrasoundRegion(0, 0, 99, 79, units_x=4, units_y=7, delta_x=0.01, delta_y=2.0)
    zero_delta = UltrasoundRegion(0, 0, 99, 79, units_x=3, units_y=3, delta_x=0.0, delta_y=0.01)
    for region in (m_mode, velocity, zero_delta):
        assert not region.is_spatial
    index, note = choose_region((m_mode, velocity, zero_delta), np.ones((80, 100), bool))
    assert index is None and note == "no ultrasound region is calibrated in cm on both axes"


def test_negative_delta_is_a_direction_not_a_size() -> None:
    region = UltrasoundRegion(0, 0, 9, 9, 3, 3, -0.01, 0.02)
    assert region.is_spatial and region.pixel_size_mm == pytest.approx((0.1, 0.2))


def test_pixel_spacing_fallback_row_then_column(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "ps", gradient(), pixel_spacing=[0.2, 0.1])  # (row, column) mm
    size = resolve_pixel_size(read_header(path).calibration, rect_mask((48, 64), slice(0, 10), slice(0, 15)))
    assert (size.source, size.x_mm, size.y_mm) == ("pixel_spacing", 0.1, 0.2)
    assert size.area_mm2(150) == pytest.approx(3.0)  # 150 * 0.1 * 0.2


def test_only_doppler_region_falls_back_to_pixel_spacing(tmp_path: Path) -> None:
    doppler = us_region(0, 0, 63, 47, 0.02, 2.5, ux=4, uy=7, data_type=3)
    path = make_dicom(tmp_path / "d", gradient(), regions=[doppler], pixel_spacing=[0.25, 0.25])
    size = resolve_pixel_size(read_header(path).calibration, rect_mask((48, 64), slice(0, 4), slice(0, 4)))
    assert size.source == "pixel_spacing" and size.area_mm2(16) == pytest.approx(1.0)  # 16 * 0.25 * 0.25


def test_imager_pixel_spacing_then_override_then_nothing(tmp_path: Path) -> None:
    mask = rect_mask((48, 64), slice(0, 10), slice(0, 15))
    imager = read_header(make_dicom(tmp_path / "ips", gradient(), imager_pixel_spacing=[0.5, 0.4])).calibration
    size = resolve_pixel_size(imager, mask, override_mm=9.0)
    assert (size.source, size.x_mm, size.y_mm) == ("imager_pixel_spacing", 0.4, 0.5)
    assert size.area_mm2(150) == pytest.approx(30.0)  # 150 * 0.4 * 0.5

    bare = read_header(make_dicom(tmp_path / "bare", gradient())).calibration
    assert bare == Calibration()
    size = resolve_pixel_size(bare, mask, override_mm=0.3)
    assert size.source == "override" and size.area_mm2(150) == pytest.approx(13.5)  # 150 * 0.3 * 0.3
    size = resolve_pixel_size(bare, mask)
    assert size.source == "" and size.area_mm2(150) is None and size.note == "no calibration in the DICOM header"
    assert resolve_pixel_size(None, mask, override_mm=0.3).source == "override"  # a PNG with --pixel-size
    assert resolve_pixel_size(None, mask) == dicom.PixelSize()


def test_enhanced_shared_functional_group_pixel_spacing() -> None:
    measures = Dataset()
    measures.PixelSpacing = [0.15, 0.12]
    group = Dataset()
    group.PixelMeasuresSequence = DicomSequence([measures])
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = DicomSequence([group])
    assert dicom.calibration_from_dataset(ds).pixel_spacing == (0.15, 0.12)


@settings(max_examples=60, deadline=None)
@given(
    top=st.integers(0, 39), left=st.integers(0, 99), height=st.integers(1, 40), width=st.integers(1, 100),
    dx=st.floats(0.001, 0.1), dy=st.floats(0.001, 0.1),
)
def test_area_is_pixel_count_times_region_pixel_area(
    top: int, left: int, height: int, width: int, dx: float, dy: float
) -> None:
    regions = (UltrasoundRegion(0, 0, 99, 39, 3, 3, dx, dy), UltrasoundRegion(0, 40, 99, 79, 4, 7, 0.01, 2.0))
    mask = rect_mask((80, 100), slice(top, min(top + height, 40)), slice(left, left + width))
    size = resolve_pixel_size(Calibration(regions=regions), mask)
    n = int(mask.sum())
    assert size.region == 0 and size.area_mm2(n) == pytest.approx(n * (dx * 10) * (dy * 10))


# --------------------------------------------------------------------------------------------------------
# Names and anonymisation


def test_frame_names_and_pseudonyms() -> None:
    assert dicom.frame_name("a/IM0001", 3) == "a/IM0001#3" and dicom.frame_name("a/IM0001", None) == "a/IM0001"
    assert dicom.split_frame_name("a/IM0001#3") == ("a/IM0001", 3)
    assert dicom.split_frame_name("a/b#c.png") == ("a/b#c.png", None)
    assert dicom.split_frame_name("a/IM#0") == ("a/IM#0", None)
    ids = DicomIdentifiers(sop_uid="1.2.3.4")
    assert dicom.pseudonym(ids, "DOE_JANE/IM1") == "1.2.3.4"
    fallback = dicom.pseudonym(DicomIdentifiers(), "DOE_JANE/IM1")
    assert fallback.startswith("dicom-") and "DOE" not in fallback
    assert fallback == dicom.pseudonym(DicomIdentifiers(sop_uid="../evil"), "DOE_JANE/IM1")


def test_phi_values_and_scrub() -> None:
    patient = PatientInfo(name="DOE^JANE^M", patient_id="PID73921", study_date="20190417", dates=("19610307",),
                          other_ids=("7",))
    values = phi_values(patient)
    assert {"DOE^JANE^M", "DOE", "JANE", "PID73921", "20190417", "2019-04-17", "17.04.2019", "1961-03-07"} <= values
    assert "M" not in values and "7" not in values  # too short to scrub from free text safely
    text = "study /data/Doe_Jane/PID73921/IM1 (2019-04-17), annotation by Janet; uid 1.2.3.20190417123"
    # wherever a value stands, glued to other characters too: "Janet" loses "Jane", the UID its date
    assert scrub_text(text, values) == (
        "study /data/[removed]_[removed]/[removed]/IM1 ([removed]), annotation by [removed]t; uid 1.2.3.[removed]123"
    )
    assert scrub_text("JaneDoe_xPID73921y_17042019", values) == "[removed][removed]_x[removed]y_[removed]"
    scrubber = dicom.Scrubber()
    scrubber.add(patient)
    assert scrubber("DOE^JANE^M") == "[removed]" and scrubber("nothing here") == "nothing here"
    assert dicom.Scrubber()("DOE") == "DOE"


def test_without_pydicom_a_dicom_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_dicom(tmp_path / "a", gradient()).read_bytes()
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(ImageDecodeError, match=r"pydicom is not installed \(pip install 'busi-batch\[dicom\]'\)"):
        decode_dicom(data)
    assert sniff_dicom(tmp_path / "a")  # recognising DICOM needs no pydicom


_NAME_PART = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzäöü"), min_size=3, max_size=8).filter(
    lambda v: v.casefold() not in dicom.REDACTED  # a value inside the marker's own word would "appear" in it
)
_GLUE = st.text(st.sampled_from("abcxyz0123456789_-. /"), max_size=4)
_CASE = st.sampled_from([str.upper, str.lower, str.title, str.swapcase])


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(_NAME_PART, min_size=2, max_size=3, unique_by=str.casefold),
    patient_id=st.text(st.sampled_from("ABC0123456789"), min_size=3, max_size=10),
    date=st.dates(min_value=__import__("datetime").date(1900, 1, 1)),
    spelling=st.integers(0, 17),
    glue=st.lists(_GLUE, min_size=6, max_size=6),
    case=_CASE,
    order=st.randoms(use_true_random=False),
)
def test_scrub_removes_identifiers_glued_to_anything_in_any_case_order_and_date_spelling(
    parts, patient_id, date, spelling, glue, case, order
) -> None:
    """Every name part, ID and date spelling is scrubbed wherever it stands: glued together (``DoeJane_``), inside
    longer tokens, in any case and any order of the name parts."""
    patient = PatientInfo(name="^".join(parts), patient_id=patient_id, study_date=date.strftime("%Y%m%d"))
    values = phi_values(patient)
    shuffled = list(parts)
    order.shuffle(shuffled)
    y, m, d = date.strftime("%Y"), date.strftime("%m"), date.strftime("%d")
    sep = ["", "-", ".", "/", "_", " "][spelling % 6]
    written_date = sep.join([(y, m, d), (d, m, y), (m, d, y)][spelling // 6])
    pieces = [case(p) for p in shuffled] + [case(patient_id), written_date]
    text = "".join(g + p for g, p in zip(glue, pieces)) + glue[-1]
    scrubbed = scrub_text(text, values).casefold()
    for value in [*parts, patient_id, written_date]:
        assert value.casefold() not in scrubbed, (text, value)
