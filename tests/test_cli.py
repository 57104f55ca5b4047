"""End-to-end behaviour of `busi-batch run` through the CLI, on the bundled sample study and hostile extras."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from busi_batch.cli import app
from busi_batch.pipeline import output_lock
from busi_batch.records import read_results_csv
from conftest import BUSI, make_tiny_checkpoint, tree_digest

runner = CliRunner()
LOCK = ".busi-batch.lock"  # its holder line is rewritten by every run that takes the lock
METRIC_KEYS = {"accuracy", "precision_weighted", "recall_weighted", "f1_weighted", "f1_macro", "mcc",
               "confusion_matrix", "per_class", "roc_auc", "accuracy_ci95", "mcc_ci95"}


def invoke(*args: str | Path):
    return runner.invoke(app, ["run", *map(str, args)])


def copy_study(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def check_masks(out: Path, rows) -> None:
    for row in rows:
        if row.status != "ok":
            continue
        mask = cv2.imread(str(out / row.mask), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (row.height, row.width), row.image
        assert set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == row.lesion_area_px


def test_sample_study_end_to_end(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    before = tree_digest(sample_study)
    out = tmp_path / "out"
    result = invoke(sample_study, "--out", out, "--weights", tiny_weights, "--workers", "2", "-b", "3")
    assert result.exit_code == 0, result.output
    rows = read_results_csv(out / "predictions.csv")
    assert [r.image for r in rows] == sorted(r.image for r in rows)
    assert len(rows) == 8 and all(r.status == "ok" for r in rows)
    for r in rows:
        assert r.p_normal + r.p_benign + r.p_malignant == pytest.approx(1.0, abs=1e-4)
        assert r.confidence == pytest.approx(max(r.p_normal, r.p_benign, r.p_malignant), abs=1e-6)
        assert r.true_class in {"normal", "benign", "malignant"} and r.dice is not None
        img = cv2.imread(str(sample_study / r.image), cv2.IMREAD_UNCHANGED)
        assert (r.height, r.width) == img.shape[:2]
    check_masks(out, rows)
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m["classification"])
    assert {"dice_mean", "iou_mean", "dice_mean_all", "iou_mean_all", "false_positive_rate_normal",
            "empty_mask_rule"} <= set(m["segmentation"])
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["test_model"] is True and run["model"]["sha256"] == rows[0].model_sha256
    assert run["counts"]["found"] == 8 and run["counts"]["ok"] == 8
    assert tree_digest(sample_study) == before


def test_bad_files_become_error_rows_and_exit_3(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    study = copy_study(sample_study, tmp_path / "study")
    (study / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    (study / "empty.png").write_bytes(b"")
    (study / "notes.txt").write_text("not an image")
    result = invoke(study, "--out", tmp_path / "out", "--weights", tiny_weights, "-j", "0")
    assert result.exit_code == 3, result.output
    rows = {r.image: r for r in read_results_csv(tmp_path / "out" / "predictions.csv")}
    assert len(rows) == 10 and "notes.txt" not in rows
    assert rows["empty.png"].status == "error" and "empty" in rows["empty.png"].error
    assert rows["corrupt.png"].status == "error" and rows["corrupt.png"].error
    assert "corrupt.png" in result.output and "empty.png" in result.output
    assert sum(r.status == "ok" for r in rows.values()) == 8


def test_rerun_skips_unchanged_and_redoes_edited(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    study = copy_study(sample_study, tmp_path / "study")
    out = tmp_path / "out"
    assert invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0").exit_code == 0
    first = read_results_csv(out / "predictions.csv")
    again = invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0")
    assert "0 processed, 8 unchanged" in again.output
    assert read_results_csv(out / "predictions.csv") == first
    # an edited image (same name, new content) is redone; a deleted one leaves the CSV
    shutil.copy(study / "normal" / "normal (48).png", study / "normal" / "normal (73).png")
    (study / "benign" / "benign (271).png").unlink()
    edited = invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0")
    assert "1 processed, 6 unchanged" in edited.output
    rows = {r.image: r for r in read_results_csv(out / "predictions.csv")}
    assert "benign/benign (271).png" not in rows
    assert rows["normal/normal (73).png"].input_sha256 == rows["normal/normal (48).png"].input_sha256
    forced = invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0", "--force")
    assert "7 processed, 0 unchanged" in forced.output


def test_other_model_is_refused_then_redoes_everything_with_force(
    sample_study: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert invoke(sample_study, "--out", out, "--weights", tiny_weights, "-j", "0").exit_code == 0
    before = tree_digest(out, skip=(LOCK,))
    other = make_tiny_checkpoint(tmp_path / "other.pt", seed=9)
    refused = invoke(sample_study, "--out", out, "--weights", other, "-j", "0")
    assert refused.exit_code == 5 and "made by model" in refused.output and "--force" in refused.output
    assert tree_digest(out, skip=(LOCK,)) == before  # nothing written but the lock's holder line
    result = invoke(sample_study, "--out", out, "--weights", other, "-j", "0", "--force")
    assert result.exit_code == 0 and "8 processed, 0 unchanged" in result.output


def test_output_inside_input_is_refused(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    study = copy_study(sample_study, tmp_path / "study")
    before = tree_digest(study)
    result = invoke(study, "--out", study / "results", "--weights", tiny_weights)
    assert result.exit_code == 2 and "inside the input folder" in result.output
    assert tree_digest(study) == before


def test_missing_study_is_usage_error(tmp_path: Path, tiny_weights: Path) -> None:
    result = invoke(tmp_path / "absent", "--out", tmp_path / "o", "--weights", tiny_weights)
    assert result.exit_code == 2 and "no such folder" in result.output


def test_unloadable_model_is_fatal_before_any_image(sample_study: Path, tmp_path: Path) -> None:
    weights = make_tiny_checkpoint(tmp_path / "m.pt")
    weights.write_bytes(weights.read_bytes()[:-10])
    result = invoke(sample_study, "--out", tmp_path / "out", "--weights", weights)
    assert result.exit_code == 1 and "m.pt" in result.output and "does not match" in result.output
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_default_output_folder_is_next_to_cwd(sample_study: Path, tiny_weights: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert invoke(sample_study, "--weights", tiny_weights, "-j", "0", "-q").exit_code == 0
    assert (tmp_path / "sample_study-results" / "predictions.csv").is_file()


def test_pixel_size_gives_mm2(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke(sample_study, "--out", out, "--weights", tiny_weights, "-j", "0", "--pixel-size", "0.1").exit_code == 0
    for r in read_results_csv(out / "predictions.csv"):
        assert r.lesion_area_mm2 == pytest.approx(r.lesion_area_px * 0.01, rel=1e-5)


def test_labels_and_mirrored_masks(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    flat, gt = tmp_path / "flat", tmp_path / "gt"
    flat.mkdir(), gt.mkdir()
    lines = ["image,class"]
    for img in sorted(sample_study.rglob("*.png")):
        if "_mask" in img.name:
            shutil.copy(img, gt / img.name)
        else:
            shutil.copy(img, flat / img.name)
            lines.append(f"{img.name},{img.parent.name}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = invoke(flat, "--out", out, "--weights", tiny_weights, "-j", "0",
                    "--labels", tmp_path / "labels.csv", "--masks", gt)
    assert result.exit_code == 0, result.output
    rows = read_results_csv(out / "predictions.csv")
    assert {r.true_class for r in rows} == {"normal", "benign", "malignant"}
    assert all(r.dice is not None for r in rows)
    assert json.loads((out / "metrics.json").read_text())["classification"]["n_images"] == 8


def test_concurrent_run_is_refused(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):
        result = invoke(sample_study, "--out", out, "--weights", tiny_weights)
    assert result.exit_code == 1 and "another busi-batch run" in result.output
    assert invoke(sample_study, "--out", out, "--weights", tiny_weights, "-j", "0").exit_code == 0


def test_console_script_is_quiet_and_honest(sample_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("busi-batch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "busi_batch"]
    proc = subprocess.run([*cmd, "run", str(sample_study), "--out", str(tmp_path / "o"), "--weights",
                           str(tiny_weights), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=120)
    assert version.stdout.startswith("busi-batch ")


@pytest.mark.skipif(not BUSI.is_dir(), reason="needs ../shared/data/busi")
def test_acceptance_thirty_busi_images_plus_bad_files(tiny_weights: Path, tmp_path: Path) -> None:
    """The issue's 'done when': 30 labelled BUSI images + corrupt PNG + empty PNG + a text file."""
    study = tmp_path / "study"
    for cls, count in (("benign", 12), ("malignant", 10), ("normal", 8)):
        images = sorted(p for p in (BUSI / cls).glob("*.png") if "_mask" not in p.name)[:count]
        (study / cls).mkdir(parents=True)
        for img in images:
            for f in [img, *img.parent.glob(img.stem.replace("(", "[(]").replace(")", "[)]") + "_mask*.png")]:
                shutil.copy(f, study / cls / f.name)
    (study / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\xff" * 40)
    (study / "empty.png").write_bytes(b"")
    (study / "readme.txt").write_text("text")
    before = tree_digest(study)
    out = tmp_path / "out"
    result = invoke(study, "--out", out, "--weights", tiny_weights)
    assert result.exit_code == 3, result.output
    rows = read_results_csv(out / "predictions.csv")
    assert len(rows) == 32
    assert sum(r.status == "ok" for r in rows) == 30 and sum(r.status == "error" for r in rows) == 2
    check_masks(out, rows)
    m = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(m["classification"]) and m["segmentation"]["n_with_lesion"] == 22
    assert tree_digest(study) == before
    rerun = invoke(study, "--out", out, "--weights", tiny_weights)
    assert rerun.exit_code == 3 and "30 unchanged and skipped" in rerun.output
