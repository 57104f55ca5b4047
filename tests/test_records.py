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
