"""The web demo's library side, without a browser: the demo's answer for an image is `run`'s CSV row for it.

Gradio is needed only by the few tests that build the page; they skip when the ``demo`` extra is missing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from busi_batch import demo, metrics
from busi_batch.cli import app
from busi_batch.imageio import decode_image, load_truth_mask, read_bytes
from busi_batch.inference import predict_images
from busi_batch.model import ModelCard, card_path_for, load_model
from busi_batch.pipeline import RunConfig, run
from busi_batch.records import read_results_csv
from conftest import SAMPLE_STUDY, make_tiny_checkpoint

runner = CliRunner()
SAMPLE = SAMPLE_STUDY / "benign" / "benign (271).png"


def contrast_checkpoint(path: Path, image: Path = SAMPLE, seed: int = 3) -> Path:
    """A tiny random-weight checkpoint whose card threshold is the median lesion probability of ``image``.

    Random tiny networks put every pixel on one side of 0.5, so their masks are empty or the whole frame and an
    area comparison would prove little. At the median the mask covers part of the image with ragged edges and
    several components, which is what a comparison of two code paths needs. (The sha256 covers only the .pt,
    so rewriting the card's threshold keeps the checkpoint valid.)
    """
    make_tiny_checkpoint(path, seed=seed)
    loaded = load_model(path)
    lesion = next(predict_images(loaded, [demo.upload_item(image)], batch_size=1)).lesion_probability
    card = dataclasses.replace(loaded.card, threshold=float(np.median(lesion)))
    card_path_for(path).write_text(card.to_json())
    return path


@pytest.fixture(scope="module")
def contrast_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contrast_checkpoint(tmp_path_factory.mktemp("contrast") / "contrast.pt")


@pytest.fixture(scope="module")
def loaded(contrast_weights: Path):
    """Loaded as the demo and ``run`` load it by default (bf16 on CPUs that have it), so their answers agree."""
    from busi_batch.runtime import select_precision

    return load_model(contrast_weights, "cpu", select_precision("auto", torch.device("cpu")))


def one_image_run(image: Path, weights: Path, tmp_path: Path, pixel_size: float | None = None):
    """`busi-batch run` on a study holding only ``image``: its CSV row and the mask it wrote."""
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(image, study / image.name)
    out = tmp_path / "out"
    run(RunConfig(study=study, out=out, weights=weights, device="cpu", workers=0, pixel_size_mm=pixel_size))
    (row,) = read_results_csv(out / "predictions.csv")
    return row, decode_image(read_bytes(out / row.mask)) > 0


@pytest.mark.parametrize("image", [SAMPLE, SAMPLE_STUDY / "malignant" / "malignant (123).png"], ids=lambda p: p.stem)
def test_demo_prediction_equals_run_csv_row(image: Path, contrast_weights: Path, loaded, tmp_path: Path) -> None:
    row, run_mask = one_image_run(image, contrast_weights, tmp_path, pixel_size=0.1)
    result = demo.analyse(loaded, demo.upload_item(image), pixel_size_mm=0.1)
    got = result.row
    assert got.ok and row.ok
    assert got.pred_class == row.pred_class
    for name in ("confidence", "p_normal", "p_benign", "p_malignant", "lesion_area_mm2"):
        assert getattr(got, name) == pytest.approx(getattr(row, name), rel=1e-5), name  # CSV keeps 6 digits
    assert (got.lesion_area_px, got.lesion_count, got.width, got.height) == (
        row.lesion_area_px, row.lesion_count, row.width, row.height)
    assert np.array_equal(result.mask, run_mask)
    assert 0 < got.lesion_area_px < got.width * got.height, "the test model should give a partial mask"
    assert got.input_sha256 == row.input_sha256 and got.model_sha256 == row.model_sha256


def test_page_view_shows_the_result_and_pictures(loaded) -> None:
    view = demo.page_view(loaded, str(SAMPLE), None, 0.1, {})
    result = demo.analyse(loaded, demo.upload_item(SAMPLE), 0.1).row
    assert f"| Predicted class | **{result.pred_class}** |" in view.markdown
    assert f"| Lesion area | {result.lesion_area_px:,} px² ({result.lesion_area_mm2:,.1f} mm²) |" in view.markdown
    assert f"| Lesion count | {result.lesion_count} |" in view.markdown
    assert "Dice" not in view.markdown  # an upload has no ground truth
    assert view.probabilities == pytest.approx(demo.probabilities(result))
    assert sum(view.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    height, width = result.height, result.width
    assert view.overlay_rgb.shape == (height, width, 3) and view.overlay_rgb.dtype == np.uint8
    assert set(np.unique(view.mask_image)) == {0, 255}
    assert int((view.mask_image > 0).sum()) == result.lesion_area_px
    assert view.truth_image is None
    # The amber prediction outline (RGB 255, 200, 0) is drawn on the grey picture.
    assert np.all(view.overlay_rgb == (255, 200, 0), axis=2).any()


def test_upload_wins_over_example_and_nothing_gives_a_prompt(loaded) -> None:
    examples = demo.example_items()
    name = next(iter(examples))
    assert demo.page_view(loaded, str(SAMPLE), name, None, examples).markdown.startswith(
        f"### Result for `{SAMPLE.name}`")
    empty = demo.page_view(loaded, None, None, None, examples)
    assert "Upload an ultrasound image" in empty.markdown and empty.overlay_rgb is None
    assert "unknown example" in demo.page_view(loaded, None, "nope", None, examples).markdown


def test_bundled_examples_carry_their_ground_truth(loaded) -> None:
    examples = demo.example_items()
    assert sorted(item.true_class for item in examples.values()) == ["benign", "malignant", "normal"]
    for label, item in examples.items():
        assert item.has_truth_mask and item.path.is_relative_to(demo.EXAMPLES_DIR)
        assert item.path.stat().st_size < 200_000, "keep the shipped examples small"
        result = demo.analyse(loaded, item)
        image = decode_image(read_bytes(item.path))
        truth = load_truth_mask(item.truth_masks, image.shape[:2])
        assert result.row.true_class == item.true_class
        assert result.row.dice == metrics.dice_score(result.mask, truth)
        assert result.row.iou == metrics.iou_score(result.mask, truth)
        assert result.row.truth_area_px == int(truth.sum())
        view = demo.page_view(loaded, None, label, None, examples)
        assert f"| Dice | {result.row.dice:.3f} |" in view.markdown
        assert f"| True class | {item.true_class} |" in view.markdown
        assert view.truth_image.shape == image.shape[:2]
        # The green ground-truth outline is drawn wherever the truth has a lesion.
        assert np.all(view.overlay_rgb == (60, 220, 80), axis=2).any() == bool(truth.any())


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb, in spirit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("notes.png", b"this is not an image", "not a readable image"),
        ("empty.png", b"", "empty file"),
        ("bomb.png", _png_header_claiming(30_000, 30_000), "too large"),
        ("truncated.png", SAMPLE.read_bytes()[:2000], "corrupt"),
    ],
)
def test_bad_upload_gets_a_one_line_reason_not_a_traceback(loaded, tmp_path: Path, name: str, data: bytes,
                                                            reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    result = demo.analyse(loaded, demo.upload_item(path))
    assert not result.ok and reason in result.row.error and "\n" not in result.row.error
    view = demo.page_view(loaded, str(path), None, None, {})
    assert view.markdown.startswith(f"### Cannot analyse `{name}`")
    assert "Traceback" not in view.markdown
    assert view.overlay_rgb is None and view.probabilities is None


def test_pixel_size_box() -> None:
    assert demo.parse_pixel_size(None) is None and demo.parse_pixel_size(0) is None
    assert demo.parse_pixel_size(0.08) == 0.08
    with pytest.raises(ValueError):
        demo.parse_pixel_size(-1)


def test_negative_pixel_size_is_a_message(loaded) -> None:
    view = demo.page_view(loaded, str(SAMPLE), None, -0.1, {})
    assert view.markdown == "**Cannot analyse:** pixel size must be a positive number of millimetres (or empty)."
    assert view.overlay_rgb is None


def test_model_markdown_states_intended_use_name_version_and_card_scores() -> None:
    card = ModelCard(
        name="busi_unet_v1", version="1.2", architecture={}, training_data="BUSI train split",
        metrics={
            "classification": {"n_images": 117, "accuracy": 0.8547, "mcc": 0.7512, "f1_macro": 0.8333},
            "segmentation": {"dice_mean": 0.7801, "iou_mean": 0.6702, "n_with_lesion": 97},
        },
    )
    text = demo.model_markdown(card, "ab" * 32)
    assert demo.DISCLAIMER in text and card.intended_use in text
    assert "busi\\_unet\\_v1, version 1.2" in text and "abababababab" in text
    assert "accuracy 0.855, MCC 0.751, macro F1 0.833 (117 images)" in text
    assert "lesion Dice 0.780, IoU 0.670 (97 images with a lesion)" in text
    assert "TEST MODEL" not in text
    test_card = dataclasses.replace(card, metrics={}, test_model=True)
    text = demo.model_markdown(test_card, "00" * 32)
    assert "TEST MODEL" in text and "none recorded in the model card" in text


def test_result_markdown_escapes_file_names(loaded, tmp_path: Path) -> None:
    path = tmp_path / "a*b_c`d.png"
    shutil.copy(SAMPLE, path)
    text = demo.page_view(loaded, str(path), None, None, {}).markdown
    assert text.startswith("### Result for `a*b_c'd.png`")


def test_run_never_imports_gradio(tiny_weights: Path, tmp_path: Path) -> None:
    """A `gradio` that explodes on import is first on the path: `run` works, and even importing the demo
    module leaves Gradio unimported (one subprocess, so nothing this test process imported counts)."""
    fake = tmp_path / "fake"
    (fake / "gradio").mkdir(parents=True)
    (fake / "gradio" / "__init__.py").write_text("raise RuntimeError('gradio was imported')\n")
    study = tmp_path / "study"
    study.mkdir()
    shutil.copy(SAMPLE, study / SAMPLE.name)
    argv = ["busi-batch", "run", str(study), "--out", str(tmp_path / "out"), "--weights", str(tiny_weights),
            "--workers", "0", "--quiet"]
    script = (
        "import sys\n"
        "import busi_batch.demo\n"
        "from busi_batch.cli import main\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    main()\nexcept SystemExit as end:\n    code = end.code\n"
        "print(code, 'gradio' in sys.modules)\n"
    )
    env = {"PYTHONPATH": str(fake), "NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "False"], proc.stdout + proc.stderr
    assert (tmp_path / "out" / "predictions.csv").is_file()


def test_demo_without_gradio_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    for key in demo.PRIVACY_ENV:
        monkeypatch.delenv(key, raising=False)
    result = runner.invoke(app, ["demo", "--weights", str(tmp_path / "missing.pt")])
    assert result.exit_code == 1
    assert 'pip install "busi-batch[demo]"' in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [(["--port", "0"], "--port"), (["--pixel-size", "-1"], "--pixel-size"),
                                           (["--host", " "], "--host")])
def test_demo_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["demo", *args])
    assert result.exit_code == 2 and message in result.output


def test_missing_model_is_fatal_before_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    for key in demo.PRIVACY_ENV:
        monkeypatch.delenv(key, raising=False)
    result = runner.invoke(app, ["demo", "--weights", str(tmp_path / "missing.pt"), "--port", "7861"])
    assert result.exit_code == 1 and "model weights not found" in result.output


def test_busy_port_is_a_fatal_error_not_a_traceback(monkeypatch: pytest.MonkeyPatch, tiny_weights: Path) -> None:
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    for key in demo.PRIVACY_ENV:
        monkeypatch.delenv(key, raising=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["demo", "--weights", str(tiny_weights), "--port", str(port), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert f"cannot serve on 127.0.0.1:{port}" in result.output


def test_gradio_is_configured_to_stay_local(monkeypatch: pytest.MonkeyPatch, loaded) -> None:
    pytest.importorskip("gradio", reason="the demo extra (gradio) is not installed")
    for key in demo.PRIVACY_ENV:
        monkeypatch.setenv(key, "True")  # the demo must override a user's environment, and monkeypatch undoes it
    gr = demo.import_gradio()
    assert not gr.analytics.analytics_enabled()
    options = demo.launch_options(demo.DemoConfig())
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["mcp_server"] is False and options["enable_monitoring"] is False and not options["show_error"]
    page = demo.build_app(loaded, demo.example_items())
    config = page.get_config_file()
    assert config["analytics_enabled"] is False
    texts = json.dumps(config)
    assert demo.DISCLAIMER in texts and "busi-result" in texts


def test_pictures_are_staged_once_per_content_and_never_rewritten(tmp_path: Path) -> None:
    """Gradio rewrote array outputs in place while a browser could still be reading them; staged files are not."""
    import cv2

    pictures = demo.PictureFiles(tmp_path / "pics")
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    first = Path(pictures.path(rgb))
    inode = first.stat().st_ino
    again = Path(pictures.path(rgb.copy()))
    assert again == first and first.stat().st_ino == inode  # the same file, not a rewritten one
    shown = cv2.imread(str(first), cv2.IMREAD_UNCHANGED)
    assert shown[0, 0].tolist() == [0, 0, 200]  # stored as a normal (BGR on disk) PNG: red stays red
    mask = np.zeros((5, 5), np.uint8)
    mask[1:3, 1:3] = 255
    assert np.array_equal(cv2.imread(pictures.path(mask), cv2.IMREAD_UNCHANGED), mask)
    assert pictures.path(None) is None


def test_staged_pictures_older_than_the_keep_time_are_swept(tmp_path: Path) -> None:
    import os

    pictures = demo.PictureFiles(tmp_path, keep_s=60)
    old = Path(pictures.path(np.full((3, 3), 255, np.uint8)))
    os.utime(old, (time.time() - 120, time.time() - 120))
    fresh = Path(pictures.path(np.zeros((3, 3), np.uint8)))
    assert fresh.exists() and not old.exists()
    os.utime(fresh, (time.time() - 120, time.time() - 120))
    assert Path(pictures.path(np.zeros((3, 3), np.uint8))) == fresh and fresh.exists()  # shown again: kept
