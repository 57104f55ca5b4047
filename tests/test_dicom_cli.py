"""DICOM studies end to end through the CLI: discovery by content, frames, calibration, identifiers, anonymisation.

The study is built with pydicom in ``tmp_path`` (see test_dicom.py); the network is the tiny random-weight
checkpoint, so the masks are arbitrary, and every mm² is checked against the mask file actually written and the
pixel size the header prescribes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner, Result

import pydicom  # noqa: E402,F401  (the test extra holds it: a missing module fails, never skips the suite)


from busi_batch.cli import app  # noqa: E402
from busi_batch.inference import Prediction  # noqa: E402
from busi_batch.records import read_results_csv  # noqa: E402
from conftest import tree_digest  # noqa: E402
from test_dicom import (  # noqa: E402
    PATIENT,
    SERIES_UID,
    STUDY_UID,
    gradient,
    make_dicom,
    make_sr,
    us_region,
)
from pydicom.uid import JPEGBaseline8Bit  # noqa: E402

#: The study folder is named after the patient, as clinic exports often are: --anonymize must hide it too.
PATIENT_FOLDER = "DOE_JANE_PID73921"
PLANTED = ["PID73921", "20190417", "2019-04-17", "17.04.2019", "19610307", "1961-03-07", "ACC55120", "DOE^JANE",
           "DOE_JANE"]
PLANTED_WORDS = re.compile(r"(?<![A-Za-z0-9])(DOE|JANE)(?![A-Za-z0-9])", re.IGNORECASE)
#: Identifiers glued to other characters, as file and folder names hold them: the check below looks for the
#: values anywhere, not only as whole tokens.
GLUED = ["JaneDoe2019-04-17_scan", "xPID73921y", "DoeJane17.04.2019"]
PLANTED_ANYWHERE = re.compile("|".join(["PID73921", "JANE", "DOE(?!S)", "20190417", "2019-04-17", "17.04.2019"]),
                              re.IGNORECASE)  # (?!S): "does" in the report's own text is no leak

SOP = {name: f"1.2.826.0.1.3680043.8.498.{n}" for n, name in enumerate(("IM0001", "IM0002", "IM0003", "SR"), 11)}
# IM0001: the Doppler strip's item comes first and spans the whole image; its numbers (0.01 s, 5 cm/s) must
# never become a pixel size. The B-mode item: 0.01 cm x 0.02 cm = 0.1 mm x 0.2 mm.
BMODE_MM = (0.1, 0.2)
SPACING_MM = (0.25, 0.3)  # IM0002's PixelSpacing [0.3, 0.25] is (row, column)
OVERRIDE_MM = 0.5


def build_study(root: Path) -> Path:
    folder = root / PATIENT_FOLDER
    image = gradient(48, 64)
    make_dicom(folder / "IM0001", image, photometric="MONOCHROME1", sop_uid=SOP["IM0001"], regions=[
        us_region(0, 0, 63, 47, 0.01, 5.0, ux=4, uy=7, data_type=3, spatial_format=3),
        us_region(0, 0, 63, 47, 0.01, 0.02),
    ])
    cine = np.stack([np.roll(image, 9 * k, axis=1) for k in range(3)])
    make_dicom(folder / "IM0002", cine, sop_uid=SOP["IM0002"], pixel_spacing=[0.3, 0.25])
    rgb = np.dstack([image, image[::-1], 255 - image])
    ok, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    make_dicom(folder / "IM0003", rgb, photometric="RGB", sop_uid=SOP["IM0003"], transfer_syntax=JPEGBaseline8Bit,
               encoded_frames=[jpeg.tobytes()])
    make_sr(folder / "SR0001")
    (folder / "IM0004").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)  # corrupt
    cv2.imwrite(str(root / "plain.png"), image)
    (root / "notes.txt").write_text("not an image, not DICOM")
    return root


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["run", *args], catch_exceptions=False)


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return build_study(tmp_path / "study")


def rows_by_image(out: Path) -> dict:
    return {r.image: r for r in read_results_csv(out / "predictions.csv")}


def mask_pixels(out: Path, mask_rel: str) -> tuple[int, tuple[int, int]]:
    mask = cv2.imread(str(out / mask_rel), cv2.IMREAD_UNCHANGED)
    assert mask is not None, mask_rel
    return int(np.count_nonzero(mask)), mask.shape[:2]


def test_dicom_study_all_frames(study: Path, tmp_path: Path, tiny_weights: Path) -> None:
    before = tree_digest(study)
    out = tmp_path / "out"
    result = run_cli(str(study), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0",
                     "--frames", "all", "--pixel-size", str(OVERRIDE_MM), "--quiet")
    assert result.exit_code == 3, result.output  # the corrupt file is an error row
    assert tree_digest(study) == before
    rows = rows_by_image(out)
    d = PATIENT_FOLDER
    assert set(rows) == {f"{d}/IM0001", f"{d}/IM0002#1", f"{d}/IM0002#2", f"{d}/IM0002#3", f"{d}/IM0003",
                         f"{d}/IM0004", "plain.png"}

    corrupt = rows[f"{d}/IM0004"]
    assert corrupt.status == "error" and corrupt.error.startswith("corrupt DICOM header") and "\n" not in corrupt.error
    assert f"{d}/IM0004" in result.output  # its one line on stderr

    run_json = json.loads((out / "run.json").read_text())
    passed = {p["path"]: p["reason"] for p in run_json["passed_over"]}
    assert "structured report" in passed[f"{d}/SR0001"]
    assert run_json["options"]["frames"] == "all" and run_json["options"]["anonymize"] is False

    expected = {
        f"{d}/IM0001": ("us_region", BMODE_MM, 1, SOP["IM0001"]),
        f"{d}/IM0002#1": ("pixel_spacing", SPACING_MM, 1, SOP["IM0002"]),
        f"{d}/IM0002#2": ("pixel_spacing", SPACING_MM, 2, SOP["IM0002"]),
        f"{d}/IM0002#3": ("pixel_spacing", SPACING_MM, 3, SOP["IM0002"]),
        f"{d}/IM0003": ("override", (OVERRIDE_MM, OVERRIDE_MM), 1, SOP["IM0003"]),
        "plain.png": ("override", (OVERRIDE_MM, OVERRIDE_MM), None, ""),
    }
    masks = set()
    for name, (source, (x_mm, y_mm), frame, sop) in expected.items():
        row = rows[name]
        assert row.status == "ok", (name, row.error)
        assert (row.pixel_size_source, row.frame, row.sop_uid) == (source, frame, sop), name
        assert (row.pixel_size_mm_x, row.pixel_size_mm_y) == pytest.approx((x_mm, y_mm)), name
        pixels, shape = mask_pixels(out, row.mask)
        assert shape == (48, 64) == (row.height, row.width)  # native size, every frame
        assert row.lesion_area_px == pixels
        assert row.lesion_area_mm2 == pytest.approx(pixels * x_mm * y_mm, rel=1e-5, abs=1e-9), name
        masks.add(row.mask)
        if sop:
            assert (row.study_uid, row.series_uid) == (STUDY_UID, SERIES_UID)
            assert (row.patient_id, row.study_date) == (PATIENT["PatientID"], PATIENT["StudyDate"])
        else:
            assert row.study_uid == row.series_uid == row.patient_id == row.study_date == ""
    assert len(masks) == len(expected)  # one mask per frame
    assert f"masks/{d}/IM0002#2_mask.png" in masks

    # resume: nothing changed, nothing redone, calibration columns kept
    again = run_cli(str(study), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0",
                    "--frames", "all", "--pixel-size", str(OVERRIDE_MM), "--quiet")
    assert again.exit_code == 3
    assert json.loads((out / "run.json").read_text())["counts"]["skipped_unchanged"] == len(expected)
    rerun = rows_by_image(out)
    for name in expected:
        assert (rerun[name].pixel_size_source, rerun[name].lesion_area_mm2) == (
            rows[name].pixel_size_source, rows[name].lesion_area_mm2)


def test_frames_first_is_the_default(study: Path, tmp_path: Path, tiny_weights: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(str(study), "--out", str(out), "--weights", str(tiny_weights), "--workers", "0", "--quiet")
    assert result.exit_code == 3, result.output
    rows = rows_by_image(out)
    cine = rows[f"{PATIENT_FOLDER}/IM0002"]
    assert cine.frame == 1 and not any("#" in name for name in rows)
    assert rows[f"{PATIENT_FOLDER}/IM0003"].pixel_size_source == ""  # no calibration and no --pixel-size
    assert rows[f"{PATIENT_FOLDER}/IM0003"].lesion_area_mm2 is None
    assert rows["plain.png"].lesion_area_mm2 is None


def test_anonymize_removes_patient_identifiers_from_every_output(
    study: Path, tmp_path: Path, tiny_weights: Path
) -> None:
    out = tmp_path / "anon"
    patient = shutil.copytree(study / PATIENT_FOLDER, tmp_path / "in" / PATIENT_FOLDER)
    (patient / GLUED[0] / GLUED[1]).mkdir(parents=True)
    cv2.imwrite(str(patient / GLUED[0] / GLUED[1] / f"{GLUED[2]}.png"), gradient(40, 40))
    result = run_cli(str(patient), "--out", str(out), "--weights", str(tiny_weights),
                     "--workers", "0", "--frames", "all", "--anonymize")
    assert result.exit_code == 3, result.output
    report = tmp_path / "report.html"
    rendered = CliRunner().invoke(app, ["report", str(out), "--report", str(report), "--quiet"])
    assert rendered.exit_code == 0, rendered.output

    texts = {"stderr": result.output, "report.html": report.read_text(errors="replace")}
    for path in out.rglob("*"):
        texts[f"name:{path.relative_to(out)}"] = str(path.relative_to(out))
        if path.is_file() and path.suffix in (".csv", ".json", ".html", ".jsonl", ".txt"):
            texts[str(path.relative_to(out))] = path.read_text(errors="replace")
    assert "predictions.csv" in texts and "run.json" in texts
    for where, text in texts.items():
        for value in PLANTED:
            assert value not in text, f"{value!r} found in {where}"
        assert not PLANTED_WORDS.search(text), f"patient name found in {where}: {PLANTED_WORDS.search(text)}"
        assert not PLANTED_ANYWHERE.search(text), f"identifier found in {where}: {PLANTED_ANYWHERE.search(text)}"
    assert any(name.endswith(".png") and "[removed]" in name for name in rows_by_image(out))

    rows = rows_by_image(out)
    # images are named by SOP Instance UID; the join keys stay
    assert {SOP["IM0001"], f"{SOP['IM0002']}#1", f"{SOP['IM0002']}#3", SOP["IM0003"]} <= set(rows)
    cine = rows[f"{SOP['IM0002']}#2"]
    assert (cine.study_uid, cine.series_uid, cine.sop_uid, cine.frame) == (STUDY_UID, SERIES_UID, SOP["IM0002"], 2)
    assert cine.patient_id == cine.study_date == ""
    assert rows[SOP["IM0001"]].pixel_size_source == "us_region"
    assert json.loads((out / "run.json").read_text())["options"]["anonymize"] is True


def test_bad_frames_option_is_a_usage_error(study: Path, tmp_path: Path, tiny_weights: Path) -> None:
    result = run_cli(str(study), "--out", str(tmp_path / "o"), "--weights", str(tiny_weights), "--frames", "some")
    assert result.exit_code == 2
    assert "--frames" in result.output


# ----------------------------------------------------------------------------------- rows, by hand (no CLI)


def lesion_prediction(shape: tuple[int, int], rows: slice, cols: slice) -> Prediction:
    """A prediction whose lesion probability is 1 on a rectangle at the image's own size (so the mask is it)."""
    probability = np.zeros(shape, dtype=np.float32)
    probability[rows, cols] = 1.0
    return Prediction(index=0, input_sha256="x", height=shape[0], width=shape[1],
                      probabilities=np.array([0.1, 0.8, 0.1]), lesion_probability=probability)


def test_pixel_size_source_and_mm2_by_hand(tmp_path: Path, tiny_weights: Path) -> None:
    from busi_batch.discover import discover
    from busi_batch.model import load_model
    from busi_batch.rows import result_from_prediction

    study = tmp_path / "s"
    image = gradient(48, 64)
    doppler = us_region(0, 0, 63, 47, 0.01, 5.0, ux=4, uy=7, data_type=3)
    make_dicom(study / "a_region", image, regions=[doppler, us_region(0, 0, 63, 47, 0.01, 0.02)],
               pixel_spacing=[0.9, 0.9])  # the region wins over PixelSpacing
    make_dicom(study / "b_two_regions", image, regions=[us_region(0, 0, 31, 47, 0.01, 0.01),
                                                         us_region(32, 0, 63, 47, 0.02, 0.02)])
    make_dicom(study / "c_outside", image, regions=[us_region(0, 0, 31, 47, 0.01, 0.01), doppler])
    make_dicom(study / "d_spacing", image, pixel_spacing=[0.3, 0.25])
    make_dicom(study / "e_imager", image, imager_pixel_spacing=[0.4, 0.5])
    make_dicom(study / "f_none", image, patient={"PatientID": "P1", "StudyDate": "20200101"})
    cv2.imwrite(str(study / "g.png"), image)
    items = {i.name: i for i in discover(study).items}
    loaded = load_model(tiny_weights, "cpu")
    box = (slice(10, 20), slice(5, 25))       # 10 x 20 = 200 px, all in the left half
    right = (slice(0, 10), slice(28, 60))     # 10 x 32 = 320 px: 4 columns left of x=32, 28 right of it
    far_right = (slice(0, 10), slice(40, 50))  # 100 px, only in the Doppler strip / right half
    cases = {  # name: (lesion, override, source, x mm, y mm, mm²)
        "a_region": (box, 0.5, "us_region", 0.1, 0.2, 200 * 0.1 * 0.2),        # 0.01 cm = 0.1 mm: 4.0 mm²
        "b_two_regions": (right, None, "us_region", 0.2, 0.2, 320 * 0.04),      # most pixels on the right: 12.8
        "c_outside": (far_right, 0.5, "", None, None, None),                    # calibrated, lesion in no region
        "d_spacing": (box, 0.5, "pixel_spacing", 0.25, 0.3, 200 * 0.075),       # (row, column) = (0.3, 0.25): 15
        "e_imager": (box, None, "imager_pixel_spacing", 0.5, 0.4, 200 * 0.2),   # 40 mm²
        "f_none": (box, 0.5, "override", 0.5, 0.5, 200 * 0.25),                 # nothing in the header: 50 mm²
        "g.png": (box, 0.5, "override", 0.5, 0.5, 50.0),
    }
    for name, (lesion, override, source, x_mm, y_mm, mm2) in cases.items():
        row, mask = result_from_prediction(items[name], lesion_prediction((48, 64), *lesion), loaded,
                                           "masks/m_mask.png", "s", override)
        assert row.ok and row.lesion_area_px == int(mask.sum()), name
        assert (row.pixel_size_source, row.pixel_size_mm_x, row.pixel_size_mm_y) == (
            source, pytest.approx(x_mm) if x_mm else None, pytest.approx(y_mm) if y_mm else None), name
        assert row.lesion_area_mm2 == (pytest.approx(mm2) if mm2 is not None else None), name
    plain, _ = result_from_prediction(items["f_none"], lesion_prediction((48, 64), *box), loaded, "m", "s", None)
    assert (plain.pixel_size_source, plain.lesion_area_mm2) == ("", None)
    assert (plain.frame, plain.patient_id, plain.study_date) == (1, "P1", "20200101")
    anon, _ = result_from_prediction(items["f_none"], lesion_prediction((48, 64), *box), loaded, "m", "s", None,
                                     anonymize=True)
    assert (anon.study_uid, anon.patient_id, anon.study_date) == (STUDY_UID, "", "")


def test_kept_rows_follow_the_new_pixel_size_unless_calibrated(tmp_path: Path) -> None:
    from busi_batch.discover import discover
    from busi_batch.rows import refresh_kept
    from busi_batch.records import ImageResult

    make_dicom(tmp_path / "spacing", gradient(), pixel_spacing=[0.3, 0.25])
    make_dicom(tmp_path / "plain", gradient())
    items = {i.name: i for i in discover(tmp_path).items}
    calibrated = ImageResult(image="spacing", status="ok", lesion_area_px=100, lesion_area_mm2=7.5,
                             pixel_size_mm_x=0.25, pixel_size_mm_y=0.3, pixel_size_source="pixel_spacing")
    calibrated = refresh_kept(calibrated, items["spacing"], 0.5, anonymize=True)
    assert (calibrated.pixel_size_source, calibrated.lesion_area_mm2) == ("pixel_spacing", 7.5)
    assert (calibrated.sop_uid, calibrated.patient_id) == (items["spacing"].dicom.identifiers.sop_uid, "")
    uncalibrated = ImageResult(image="plain", status="ok", lesion_area_px=100)  # as an older version wrote it
    uncalibrated = refresh_kept(uncalibrated, items["plain"], 0.2, anonymize=False)
    assert (uncalibrated.pixel_size_source, uncalibrated.lesion_area_mm2) == ("override", pytest.approx(4.0))
    assert uncalibrated.patient_id == PATIENT["PatientID"]
    uncalibrated = refresh_kept(uncalibrated, items["plain"], None, anonymize=False)
    assert (uncalibrated.pixel_size_source, uncalibrated.lesion_area_mm2) == ("", None)


def test_mask_names_of_frames_uid_names_and_dcm_files() -> None:
    from busi_batch.discover import ImageItem
    from busi_batch.runfolder import mask_relpaths

    items = [
        ImageItem(path=Path("a/IM1"), rel="a/IM1", name="a/IM1#2", frame=2, is_dicom=True),
        ImageItem(path=Path("a/1.2.3.4"), rel="a/1.2.3.4", frame=1, is_dicom=True),
        ImageItem(path=Path("b/x.dcm"), rel="b/x.dcm", frame=1, is_dicom=True),
        ImageItem(path=Path("c/y.png"), rel="c/y.png"),
    ]
    assert list(mask_relpaths(items).values()) == [
        "masks/a/IM1#2_mask.png", "masks/a/1.2.3.4_mask.png", "masks/b/x_mask.png", "masks/c/y_mask.png"]


def test_corrupt_dicom_decodes_to_a_one_line_error() -> None:
    from busi_batch.errors import ImageDecodeError
    from busi_batch.imageio import decode_input

    with pytest.raises(ImageDecodeError, match="^corrupt DICOM header") as err:
        decode_input(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    assert "\n" not in str(err.value)


def test_frame_rows_shard_merge_and_an_older_csv_resumes(tmp_path: Path, tiny_weights: Path) -> None:
    """Frames of a file stay in one shard, merge joins the frame rows, and the merged folder (its CSV stripped of
    the DICOM columns, as an older version wrote it) resumes: other images are kept, DICOM frames redone."""
    study = tmp_path / "study"
    make_dicom(study / "CINE", np.stack([gradient(), gradient()[::-1]]), pixel_spacing=[0.3, 0.25])
    for k in range(3):
        cv2.imwrite(str(study / f"p{k}.png"), np.roll(gradient(), k, axis=1))
    common = ["--weights", str(tiny_weights), "--workers", "0", "--frames", "all", "--quiet"]
    shards = [tmp_path / f"part{i}" for i in (1, 2)]
    for i, part in enumerate(shards, 1):
        assert run_cli(str(study), "--out", str(part), "--shard", f"{i}/2", *common).exit_code == 0
    parts = [set(rows_by_image(part)) for part in shards]
    assert any({"CINE#1", "CINE#2"} <= names for names in parts)  # both frames in the shard of their file
    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", *map(str, shards), "--out", str(merged), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = rows_by_image(merged)
    assert set(rows) == {"CINE#1", "CINE#2", "p0.png", "p1.png", "p2.png"}
    assert (rows["CINE#2"].frame, rows["CINE#2"].pixel_size_source, rows["CINE#2"].mask) == (
        2, "pixel_spacing", "masks/CINE#2_mask.png")

    csv_path = merged / "predictions.csv"
    header, *lines = csv_path.read_text().splitlines()
    keep = header.split(",").index("frame")
    csv_path.write_text("\n".join(",".join(line.split(",")[:keep]) for line in [header, *lines]) + "\n")
    again = run_cli(str(study), "--out", str(merged), *common)
    assert again.exit_code == 0, again.output
    assert json.loads((merged / "run.json").read_text())["counts"]["skipped_unchanged"] == 3
    assert rows_by_image(merged)["CINE#1"].pixel_size_source == "pixel_spacing"
