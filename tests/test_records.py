"""predictions.csv round trip."""

from __future__ import annotations

from pathlib import Path

from busi_batch.records import CSV_COLUMNS, ImageResult, read_results_csv, write_results_csv


def test_csv_round_trip_keeps_types_and_odd_names(tmp_path: Path) -> None:
    rows = [
        ImageResult(image='we"ird, name ü.png', status="ok", pred_class="benign", confidence=0.5, p_normal=0.25,
                    p_benign=0.5, p_malignant=0.25, lesion_area_px=12, lesion_count=1, mask="masks/x_mask.png",
                    width=10, height=20),
        ImageResult(image="bad.png", status="error", error="empty file (0 bytes)"),
    ]
    path = tmp_path / "p.csv"
    write_results_csv(path, rows)
    assert path.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    assert read_results_csv(path) == rows


def test_older_csv_and_journal_without_the_dicom_columns_still_read(tmp_path: Path) -> None:
    """An output folder written before the DICOM columns existed resumes: the missing columns take defaults."""
    from busi_batch.records import journal_lines, read_journal

    old_columns = CSV_COLUMNS[:CSV_COLUMNS.index("frame")]
    assert CSV_COLUMNS[len(old_columns):] == ("frame", "pixel_size_mm_x", "pixel_size_mm_y", "pixel_size_source",
                                               "study_uid", "series_uid", "sop_uid", "patient_id", "study_date")
    path = tmp_path / "old.csv"
    path.write_text(",".join(old_columns) + "\n" + "a.png,ok," + "," * (len(old_columns) - 3) + "\n")
    (row,) = read_results_csv(path)
    assert row == ImageResult(image="a.png", status="ok")
    journal = tmp_path / "j"
    line = journal_lines([ImageResult(image="b.png", status="ok", lesion_area_px=3)]).decode()
    old_line = line.split(', "frame"')[0] + "}\n"
    journal.write_text(old_line + '{"status": "ok"}\n')  # the second line has no image: damaged, skipped
    assert read_journal(journal) == [ImageResult(image="b.png", status="ok", lesion_area_px=3)]
