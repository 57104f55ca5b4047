"""The run report: pure pieces (flags, bins, selections), then PDF and HTML rendered from real run folders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
from pypdf import PdfReader
from typer.testing import CliRunner

from busi_batch import report
from busi_batch.cli import app
from busi_batch.errors import UsageError
from busi_batch.records import ImageResult, read_results_csv
from busi_batch.report import content, render
from busi_batch.report import pdf as report_pdf
from busi_batch.report.assets import downscale, encode_jpeg, input_location
from conftest import tree_digest

runner = CliRunner()


def ok_row(**kw) -> ImageResult:
    base = dict(image="a.png", status="ok", pred_class="benign", confidence=0.9, p_normal=0.05, p_benign=0.9,
                p_malignant=0.05, lesion_area_px=100, lesion_count=1, mask="masks/a_mask.png", width=10, height=10)
    base.update(kw)
    return ImageResult(**base)


# ------------------------------------------------------------------------------------------------ pure parts


def kinds(row: ImageResult) -> list[str]:
    return [f.kind for f in content.review_flags(row)]


def test_flags_for_each_reason() -> None:
    assert kinds(ok_row()) == []
    assert kinds(ImageResult(image="x.png", status="error", error="corrupt")) == ["error"]
    assert kinds(ok_row(pred_class="normal", confidence=0.9)) == ["disagreement"]      # mask on a normal image
    assert kinds(ok_row(pred_class="malignant", lesion_area_px=0)) == ["disagreement"]  # no mask on malignant
    assert kinds(ok_row(pred_class="normal", lesion_area_px=0)) == []
    assert kinds(ok_row(confidence=0.59)) == ["low-confidence"]
    assert kinds(ok_row(confidence=0.6)) == []
    assert kinds(ok_row(true_class="malignant")) == ["misclassified"]
    assert kinds(ok_row(true_class="benign", dice=0.3, truth_area_px=50)) == ["low-dice"]
    # A low Dice on an image without a ground-truth lesion is the false-positive case, already a disagreement
    # or misclassification; it is not a segmentation-quality flag.
    assert kinds(ok_row(true_class="benign", dice=0.0, truth_area_px=0)) == []
    assert kinds(ok_row(truth_error="mask size differs")) == ["truth"]


def test_review_order_puts_errors_first_then_least_confident() -> None:
    rows = [ok_row(confidence=0.5), ImageResult(image="e.png", status="error", error="x"), ok_row(confidence=0.4),
            ok_row(), ok_row(pred_class="normal", confidence=0.95)]
    entries = [content.Entry(i, r, content.review_flags(r)) for i, r in enumerate(rows, start=1)]
    assert [e.number for e in content.review_order(entries)] == [2, 5, 3, 1]


def test_log_edges_cover_every_value_in_1_3_10_steps() -> None:
    assert content.log_edges([]) == []
    assert content.log_edges([0, -1]) == []
    assert content.log_edges([5, 2000]) == [1, 3, 10, 30, 100, 300, 1000, 3000]
    assert content.log_edges([0.25, 0.5]) == [0.1, 0.3, 1.0]
    edges = content.log_edges([1000])
    assert edges[0] <= 1000 < edges[-1]


def test_area_histogram_counts_no_lesion_separately() -> None:
    rows = [ok_row(lesion_area_px=0), ok_row(lesion_area_px=5), ok_row(lesion_area_px=2000),
            ImageResult(image="e.png", status="error")]
    bars = content.area_histogram(rows, use_mm2=False)
    assert bars[0].label == "no lesion" and bars[0].count == 1
    assert sum(b.count for b in bars) == 3
    mm = content.area_histogram([ok_row(lesion_area_px=100, lesion_area_mm2=1.0)], use_mm2=True)
    assert [b.count for b in mm if b.count] == [1] and mm[0].count == 0


def test_histogram_and_bars() -> None:
    bars = content.score_histogram([0.0, 0.05, 0.95, 1.0, 1.0])
    assert len(bars) == 10 and bars[0].count == 2 and bars[-1].count == 3  # the last bin includes 1.0
    assert bars[-1].width == 100.0 and bars[0].width == pytest.approx(200 / 3)
    assert sum(b.share for b in bars) == pytest.approx(1.0)
    conf = content.confidence_histogram([ok_row(confidence=1 / 3), ok_row(confidence=0.55)])
    assert [b.count for b in conf] == [1, 0, 1, 0, 0, 0, 0]
    assert [b.count for b in content.class_counts([ok_row(), ok_row(pred_class="normal")])] == [1, 1, 0]


def test_select_pages_and_galleries() -> None:
    rows = [ok_row(true_class="benign", dice=0.9, truth_area_px=90),
            ok_row(true_class="normal", confidence=0.99, dice=0.2, truth_area_px=10),
            ok_row(true_class="normal", confidence=0.7, dice=0.1, truth_area_px=10)]
    entries = [content.Entry(i, r, content.review_flags(r)) for i, r in enumerate(rows, start=1)]
    assert [e.number for e in content.select_pages(entries, "all")] == [1, 2, 3]
    assert [e.number for e in content.select_pages(entries, "flagged")] == [2, 3]
    assert content.select_pages(entries, "none") == []
    with pytest.raises(UsageError):
        content.select_pages(entries, "some")
    assert [e.number for e in content.worst_segmented(entries)] == [3, 2, 1]
    assert [e.number for e in content.misclassified(entries)] == [2, 3]  # most confidently wrong first


def test_shorten_middle_and_numbering() -> None:
    assert content.shorten_middle("short", 10) == "short"
    long = "a" * 50 + "b" * 50
    short = content.shorten_middle(long, 21)
    assert len(short) == 21 and short.startswith("a" * 10) and short.endswith("b" * 10) and "…" in short
    assert report_pdf._numbering(3, [4, 5, 1]) == ([4, 8, 13], 13)
    assert report_pdf._numbering(2, []) == ([], 2)


def test_confusion_rows_mark_the_diagonal() -> None:
    rows = content.confusion_rows({"class_order": ["normal", "benign", "malignant"],
                                  "confusion_matrix": [[2, 0, 0], [1, 3, 0], [0, 0, 0]]})
    assert [r["total"] for r in rows] == [2, 4, 0]
    assert rows[1]["cells"][1]["diagonal"] and not rows[1]["cells"][0]["diagonal"]
    assert rows[1]["cells"][0]["share"] == pytest.approx(0.25) and rows[2]["cells"][2]["alpha"] == 0.0
    assert content.confusion_rows({}) == []



# ------------------------------------------------------------------------------------- evidence chart geometry


def test_frame_maps_unit_square_with_y_upwards() -> None:
    f = content.Frame(left=10, top=5, size=100, width=120, height=130)
    assert (f.x(0), f.y(0)) == (10, 105)        # data origin: bottom left
    assert (f.x(1), f.y(1)) == (110, 5)         # (1, 1): top right
    assert (f.x(0.25), f.y(0.75)) == (35, 30)
    assert (f.x(-0.2), f.y(1.5)) == (10, 5)     # clipped to the frame
    assert f.view_box == "0 0 120 130"


def test_perfect_classifier_roc_goes_through_the_top_left_corner() -> None:
    f = content.Frame(left=0, top=0, size=100)
    points = content.roc_points([0.0, 0.0, 1.0], [0.0, 1.0, 1.0], f)
    assert points == [(0, 100), (0, 0), (100, 0)]  # (fpr 0, tpr 1) is the top left corner
    assert content.svg_path(points) == "M0,100 L0,0 L100,0"
    # A chance-level curve lies on the diagonal; repeated points collapse.
    assert content.roc_points([0, 0.5, 0.5, 1], [0, 0.5, 0.5, 1], f) == [(0, 100), (50, 50), (100, 0)]
    with pytest.raises(ValueError):
        content.roc_points([0, 1], [0, 0.5, 1], f)
    assert content.svg_path([]) == ""


def test_roc_chart_leaves_out_a_class_without_a_curve() -> None:
    cls = {"class_order": ["normal", "benign", "malignant"],
           "roc_auc": {"normal": 1.0, "benign": 0.75, "malignant": None},
           "roc_curves": {"normal": {"fpr": [0, 0, 1], "tpr": [0, 1, 1]},
                          "benign": {"fpr": [0, 0.5, 1], "tpr": [0, 1, 1]}, "malignant": None}}
    chart = content.roc_chart(cls)
    assert [c.name for c in chart.curves] == ["normal", "benign"] and chart.missing == ["malignant"]
    assert [c.auc for c in chart.curves] == [1.0, 0.75]
    f = chart.frame
    assert f"L{f.x(0):g},{f.y(1):g}" in chart.curves[0].path           # through (0, 1)
    assert chart.diagonal == f"M{f.x(0):g},{f.y(0):g} L{f.x(1):g},{f.y(1):g}"
    assert chart.curves[0].colour != chart.curves[1].colour
    assert content.roc_chart({"roc_auc": {"normal": 0.5}}) is None    # an older metrics.json: no chart


def test_reliability_bar_heights_follow_accuracy() -> None:
    f = content.Frame(left=0, top=0, size=100)
    bins = [{"lo": 0.0, "hi": 0.5, "count": 0, "confidence": None, "accuracy": None},
            {"lo": 0.5, "hi": 1.0, "count": 4, "confidence": 0.75, "accuracy": 0.5},
            {"lo": 0.5, "hi": 1.0, "count": 2, "confidence": 0.9, "accuracy": 1.0}]
    empty, half, full = content.reliability_bars(bins, f, gap=1)
    assert half.height == 50 and half.y == 50                        # accuracy 0.5: half the plot's height
    assert full.height == 100 and full.y == 0
    assert half.x == 51 and half.width == 48                         # the bin's span less the gap each side
    assert (half.marker_x, half.marker_y) == (75, 50)                # (mean confidence, accuracy)
    assert empty.height == 0 and empty.marker_x is None and empty.count_label == "0"
    assert half.opacity == 1.0 and 0.3 < full.opacity < half.opacity and empty.opacity == 0.0  # more images, darker
    chart = content.reliability_chart({"reliability": bins})
    assert chart.total == 6 and chart.count_y > chart.frame.bottom
    assert content.reliability_chart({"accuracy": 0.5}) is None


def test_compact_count_fits_a_bin() -> None:
    assert [content.compact_count(n) for n in (0, 999, 1000, 1250, 12_400, 2_500_000)] == [
        "0", "999", "1.0k", "1.2k", "12k", "2.5M"]


def test_renditions_are_small_jpegs_never_enlarged() -> None:
    image = np.random.default_rng(0).integers(0, 255, (1000, 600), dtype=np.uint8)
    small = downscale(image, 512)
    assert small.shape == (512, 307)
    assert downscale(image[:100, :80], 512).shape == (100, 80)
    data = encode_jpeg(small)
    assert data[:2] == b"\xff\xd8"


def test_report_format_and_options() -> None:
    assert report.report_format(Path("x.PDF")) == "pdf" and report.report_format(Path("x.htm")) == "html"
    with pytest.raises(UsageError, match=r"\.pdf or \.html"):
        report.report_format(Path("x.docx"))
    with pytest.raises(UsageError, match="report-pages"):
        report.validate_report_options(Path("x.pdf"), "most")


def test_report_module_never_imports_torch() -> None:
    """The report reads a run folder; it must not pull in the model stack (torch) at all."""
    code = ("import sys, busi_batch.report, busi_batch.report.assets, busi_batch.report.content, "
            "busi_batch.report.pdf, busi_batch.report.render; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------- rendered reports


@pytest.fixture(scope="module")
def study(sample_study_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample study plus an undecodable file and a portrait image, so errors and orientation show up."""
    root = tmp_path_factory.mktemp("study") / "study"
    shutil.copytree(sample_study_module, root)
    (root / "benign" / "broken.png").write_bytes(b"not an image")
    portrait = cv2.rotate(cv2.imread(str(root / "benign" / "benign (271).png")), cv2.ROTATE_90_CLOCKWISE)
    cv2.imwrite(str(root / "portrait.png"), portrait)
    return root


@pytest.fixture(scope="module")
def sample_study_module() -> Path:
    from conftest import SAMPLE_STUDY

    return SAMPLE_STUDY


@pytest.fixture(scope="module")
def run_pdf(study: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`busi-batch run --report out.pdf`: the run folder and the PDF, made once for the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    out, pdf = tmp / "out", tmp / "report.pdf"
    before = tree_digest(study)
    result = runner.invoke(app, ["run", str(study), "--out", str(out), "--weights", str(tiny_weights),
                                 "--workers", "0", "--pixel-size", "0.1", "--report", str(pdf)])
    assert result.exit_code == 3, result.output  # the broken file is an error row; the report is still made
    assert tree_digest(study) == before
    return out, pdf


def pdf_pages(pdf: Path) -> list[str]:
    return [page.extract_text() or "" for page in PdfReader(str(pdf)).pages]


def first_image_page(texts: list[str]) -> int:
    return next(i for i, t in enumerate(texts) if re.search(r"Image 1 of \d+", t))


def test_pdf_has_summary_then_one_page_per_image(run_pdf: tuple[Path, Path]) -> None:
    out, pdf = run_pdf
    rows = read_results_csv(out / "predictions.csv")
    texts = pdf_pages(pdf)
    start = first_image_page(texts)
    assert start >= 2 and len(texts) == start + len(rows)
    for k, row in enumerate(rows):
        page = texts[start + k]
        assert f"Image {k + 1} of {len(rows)}" in page
        assert Path(row.image).name in page.replace("\n", "")
        if not row.ok:
            assert "Not processed" in page and row.error[:30] in page.replace("\n", " ")
    # Page numbers: consecutive, with the right total, on every page.
    for number, text in enumerate(texts, start=1):
        assert f"Page {number} of {len(texts)}" in text


def test_pdf_summary_has_disclaimer_and_the_metrics(run_pdf: tuple[Path, Path]) -> None:
    out, pdf = run_pdf
    texts = pdf_pages(pdf)
    summary = " ".join(texts[: first_image_page(texts)]).replace("\n", " ")
    metrics = json.loads((out / "metrics.json").read_text())
    cls, seg = metrics["classification"], metrics["segmentation"]
    assert "not a diagnostic device" in summary
    assert "TEST MODEL" in summary  # the tiny checkpoint is a test model; the report says so
    assert f"Accuracy {cls['accuracy']:.3f} 95% CI {cls['accuracy_ci95'][0]:.3f}–{cls['accuracy_ci95'][1]:.3f}" in summary
    assert f"{cls['mcc']:.3f} 95% CI {cls['mcc_ci95'][0]:.3f}–{cls['mcc_ci95'][1]:.3f}" in summary
    assert f"{seg['dice_mean']:.3f} / {seg['dice_median']:.3f}" in summary
    for name in ("normal", "benign", "malignant"):
        pc = cls["per_class"][name]
        assert f"{name} {pc['sensitivity']:.3f} {pc['specificity']:.3f}" in summary
    assert "broken.png" in summary and "not a readable image" in summary  # errors with their reasons
    assert "mm²" in summary  # pixel size given: areas in mm²
    assert f"Expected calibration error (ECE) {cls['ece']:.3f} 95% CI {cls['ece_ci95'][0]:.3f}" in summary
    assert "ROC curves" in summary and "Reliability diagram" in summary
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["sha256"] in summary.replace(" ", "")


def test_pdf_review_table_page_references_are_right(run_pdf: tuple[Path, Path]) -> None:
    out, pdf = run_pdf
    texts = pdf_pages(pdf)
    start = first_image_page(texts)
    summary = " ".join(texts[:start])
    refs = re.findall(r"p\. (\d+)", summary)
    assert refs
    for ref in refs:
        assert re.search(r"Image \d+ of \d+", texts[int(ref) - 1])


def test_pdf_pages_stay_small(run_pdf: tuple[Path, Path]) -> None:
    out, pdf = run_pdf
    texts = pdf_pages(pdf)
    per_page = pdf.stat().st_size / (len(texts) - first_image_page(texts))
    assert per_page < 120_000, per_page
    assets = list((out / "report_assets").iterdir())
    assert assets and all(p.suffix == ".jpg" for p in assets)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img" and a.get("src"):
            self.srcs.append(a["src"])


def test_html_report_links_and_pictures_resolve(run_pdf: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = run_pdf
    html = tmp_path / "elsewhere" / "report.html"
    html.parent.mkdir()
    result = runner.invoke(app, ["report", str(out), "--report", str(html)])
    assert result.exit_code == 0, result.output
    parser = _Links()
    parser.feed(html.read_text(encoding="utf-8"))
    rows = read_results_csv(out / "predictions.csv")
    assert {f"img-{i}" for i in range(1, len(rows) + 1)} <= parser.ids  # every image has its section
    internal = [h for h in parser.hrefs if h.startswith("#")]
    assert any(h.startswith("#img-") for h in internal)
    for href in internal:
        assert href[1:] in parser.ids, href
    assert len(parser.srcs) >= len([r for r in rows if r.ok])
    for src in parser.srcs:
        assert (html.parent / unquote(src)).is_file(), src
    assert "not a diagnostic device" in html.read_text(encoding="utf-8")


def test_report_pages_option(run_pdf: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = run_pdf
    rows = read_results_csv(out / "predictions.csv")
    flagged = [r for r in rows if content.review_flags(r)]
    assert 0 < len(flagged)
    none_pdf = tmp_path / "none.pdf"
    assert runner.invoke(app, ["report", str(out), "--report", str(none_pdf), "--report-pages", "none"]).exit_code == 0
    texts = pdf_pages(none_pdf)
    assert not any(re.search(r"Image \d+ of", t) for t in texts)
    html = tmp_path / "flagged.html"
    assert runner.invoke(app, ["report", str(out), "--report", str(html), "--report-pages", "flagged"]).exit_code == 0
    parser = _Links()
    parser.feed(html.read_text(encoding="utf-8"))
    assert len({i for i in parser.ids if i.startswith("img-")}) == len(flagged)


def test_chunked_rendering_across_processes_numbers_pages_as_one(run_pdf: tuple[Path, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Force several chunks and a process pool on the small study: same pages, numbered 1..N after the merge."""
    out, single = run_pdf
    monkeypatch.setattr(report_pdf, "CHUNK_PAGES", 3)
    monkeypatch.setattr(render, "MIN_PAGES_FOR_POOL", 0)
    monkeypatch.setattr(report_pdf, "split_pages",
                        lambda entries, workers: [entries[i:i + 3] for i in range(0, len(entries), 3)])
    pdf = tmp_path / "chunked.pdf"
    result = report.render_report(out, pdf, processes=2)
    texts = pdf_pages(pdf)
    assert result.total_pages == len(texts) == len(pdf_pages(single))
    for number, text in enumerate(texts, start=1):
        assert f"Page {number} of {len(texts)}" in text
    start = first_image_page(texts)
    rows = read_results_csv(out / "predictions.csv")
    for k in range(len(rows)):
        assert f"Image {k + 1} of {len(rows)}" in texts[start + k]


def test_report_rerenders_without_the_model_and_survives_a_vanished_image(
    run_pdf: tuple[Path, Path], study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = run_pdf
    moved = tmp_path / "study"
    shutil.copytree(study, moved)
    (moved / "portrait.png").unlink()
    for mask in moved.rglob("*_mask*.png"):  # the ground truth comes from the paths the run recorded
        mask.unlink()
    run_json = json.loads((out / "run.json").read_text())
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run_json["input"] = str(moved)
    (copy / "run.json").write_text(json.dumps(run_json))

    import busi_batch.model

    def no_model(*args, **kwargs):
        raise AssertionError("the report must not load the model")

    monkeypatch.setattr(busi_batch.model, "load_model", no_model)
    pdf = tmp_path / "again.pdf"
    result = runner.invoke(app, ["report", str(copy), "--report", str(pdf)])
    assert result.exit_code == 0, result.output
    texts = [t.replace("\n", " ") for t in pdf_pages(pdf)]
    page = next(t for t in texts if "portrait.png" in t and re.search(r"Image \d+ of", t))
    assert "no picture of the input image" in page and "moved or deleted since the run" in page
    assert any("ground-truth outline" in t for t in texts)


def test_report_errors_are_one_line_with_exit_codes(run_pdf: tuple[Path, Path], study: Path, tmp_path: Path) -> None:
    out, _ = run_pdf
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    result = runner.invoke(app, ["report", str(not_a_run), "--report", str(tmp_path / "r.pdf")])
    assert result.exit_code == 1 and "run.json" in result.output
    result = runner.invoke(app, ["report", str(out), "--report", str(tmp_path / "r.docx")])
    assert result.exit_code == 2 and ".pdf or .html" in result.output
    result = runner.invoke(app, ["report", str(out), "--report", str(study / "r.pdf")])
    assert result.exit_code == 2 and "inside the input folder" in result.output
    assert not (study / "r.pdf").exists()


def test_run_refuses_a_bad_report_name_before_running(study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(study), "--out", str(tmp_path / "o"), "--weights", str(tiny_weights),
                                 "--report", str(tmp_path / "r.txt")])
    assert result.exit_code == 2 and ".pdf or .html" in result.output
    assert not (tmp_path / "o").exists()


def test_a_page_that_overflows_is_renumbered(run_pdf: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """If an image's page ever spills onto a second sheet, later chunks and the summary's references follow."""
    out, _ = run_pdf
    css = render.stylesheets()
    monkeypatch.setattr(render, "stylesheets", lambda: (css[0] + "\n#img-2 .kicker { margin-bottom: 240mm; }", css[1]))
    monkeypatch.setattr(report_pdf, "split_pages",
                        lambda entries, workers: [entries[i:i + 3] for i in range(0, len(entries), 3)])
    pdf = tmp_path / "overflow.pdf"
    result = report.render_report(out, pdf, processes=1)
    texts = pdf_pages(pdf)
    rows = read_results_csv(out / "predictions.csv")
    assert result.total_pages == len(texts) == first_image_page(texts) + len(rows) + 1
    for number, text in enumerate(texts, start=1):
        assert f"Page {number} of {len(texts)}" in text
    starts = {int(m.group(1)): i + 1 for i, t in enumerate(texts) if (m := re.search(r"Image (\d+) of", t))}
    assert sorted(starts) == list(range(1, len(rows) + 1))
    assert starts[3] == starts[2] + 2  # image 2 took two sheets
    summary = " ".join(texts[: first_image_page(texts)])
    refs = {int(r) for r in re.findall(r"p\. (\d+)", summary)}
    flagged = [i for i, r in enumerate(rows, start=1) if content.review_flags(r)]
    assert len(flagged) <= content.REVIEW_TABLE_MAX and refs == {starts[i] for i in flagged}


def test_dicom_frames_are_drawn_from_their_own_frame(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from test_dicom import make_dicom

    from busi_batch.imageio import encode_mask_png
    from busi_batch.report.assets import RenditionJob, make_rendition

    frames = np.zeros((2, 40, 60), dtype=np.uint8)
    frames[1, 10:30, 20:40] = 200  # only frame 2 has a bright square
    study = tmp_path / "study"
    make_dicom(study / "cine" / "IM1", frames)
    path, frame = input_location(study, "cine/IM1#2")
    assert (path, frame) == (study / "cine" / "IM1", 2)
    assert input_location(study, "cine/IM1") == (study / "cine" / "IM1", None)
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:30, 20:40] = True
    (tmp_path / "m.png").write_bytes(encode_mask_png(mask))
    job = RenditionJob(key="00001", image_path=path, frame=frame, mask_path=tmp_path / "m.png", truth_paths=(),
                       input_sha256="", assets_dir=tmp_path / "assets")
    picture = make_rendition(job)
    assert picture.notices == () and (picture.width, picture.height) == (60, 40)
    overlay = cv2.imread(str(tmp_path / "assets" / picture.overlay), cv2.IMREAD_GRAYSCALE)
    assert overlay[20, 30] > 150 and overlay[5, 5] < 50  # frame 2's pixels, not frame 1's


def test_anonymised_run_shows_no_input_pictures(run_pdf: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = run_pdf
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "report_assets")
    run_json = json.loads((copy / "run.json").read_text())
    run_json["options"]["anonymize"] = True
    (copy / "run.json").write_text(json.dumps(run_json))
    html = tmp_path / "anon.html"
    assert runner.invoke(app, ["report", str(copy), "--report", str(html)]).exit_code == 0
    text = html.read_text(encoding="utf-8")
    assert "Anonymised run" in text and "-overlay.jpg" not in text and "-mask.jpg" in text
    assert not list((copy / "report_assets").glob("*-overlay.jpg"))


def test_remove_stale_keeps_this_reports_files_and_fresh_chunk_folders(tmp_path: Path) -> None:
    import os

    from busi_batch.report.assets import remove_stale

    for name in ("00001-overlay.jpg", "00002-overlay.jpg"):
        (tmp_path / name).write_bytes(b"x")
    old, fresh = tmp_path / ".report-old", tmp_path / ".report-new"
    old.mkdir()
    fresh.mkdir()
    (old / "chunk-00000.pdf").write_bytes(b"%PDF")
    os.utime(old, (0, 0))
    remove_stale(tmp_path, keep={"00001-overlay.jpg"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report-new", "00001-overlay.jpg"]


# ------------------------------------------------------------------- evidence charts in a hand-made run folder


def hand_run(tmp_path: Path, classification: dict) -> Path:
    """A finished run folder written by hand (no model): three rows with ground truth, and the given metrics."""
    from busi_batch.records import write_json, write_results_csv

    out = tmp_path / "out"
    out.mkdir()
    write_json(out / "run.json", {"input": str(tmp_path / "gone"), "status": "complete",
                                  "counts": {"found": 3, "ok": 3, "error": 0}, "model": {"name": "m", "version": "1"}})
    write_results_csv(out / "predictions.csv", [
        ok_row(image="a.png", true_class="benign", dice=0.8, iou=0.7, truth_area_px=90),
        ok_row(image="b.png", pred_class="normal", lesion_area_px=0, true_class="normal", dice=1.0, iou=1.0,
               truth_area_px=0),
        ok_row(image="c.png", true_class="malignant", confidence=0.7, dice=0.2, iou=0.1, truth_area_px=50)])
    old = {"n_images": 3, "class_order": ["normal", "benign", "malignant"], "accuracy": 2 / 3,
           "accuracy_ci95": [0.0, 1.0], "mcc": 0.5, "mcc_ci95": [0.0, 1.0], "f1_weighted": 0.5, "f1_macro": 0.5,
           "precision_weighted": 0.5, "recall_weighted": 0.5, "confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 1, 0]],
           "per_class": {n: {"sensitivity": 1.0, "specificity": 1.0, "precision": 1.0, "f1": 1.0, "support": 1}
                         for n in ("normal", "benign", "malignant")},
           "roc_auc": {"normal": 1.0, "benign": 0.5, "malignant": None}}
    write_json(out / "metrics.json", {"classification": {**old, **classification}, "segmentation": {}})
    return out


EVIDENCE = {
    "ece": 0.1234, "ece_ci95": [0.0456, 0.3012],
    "reliability": [{"lo": k / 10, "hi": (k + 1) / 10, "count": 0 if k < 6 else 1,
                     "confidence": None if k < 6 else k / 10 + 0.05, "accuracy": None if k < 6 else 0.5}
                    for k in range(10)],
    "roc_curves": {"normal": {"fpr": [0, 0, 1], "tpr": [0, 1, 1]}, "benign": {"fpr": [0, 0.5, 1], "tpr": [0, 0.5, 1]},
                   "malignant": None},
}


def test_summary_html_draws_roc_and_reliability_with_ece(tmp_path: Path) -> None:
    out = hand_run(tmp_path, EVIDENCE)
    html_path = tmp_path / "r.html"
    report.render_report(out, html_path, pages="none", processes=1)
    html = html_path.read_text(encoding="utf-8")
    assert html.count('<svg class="plot roc"') == 1 and html.count('<svg class="plot reliability"') == 1
    assert len(re.findall(r'class="roc-curve" data-class="(\w+)"', html)) == 2  # malignant has no curve
    assert "malignant: no ROC curve" in html
    assert "normal: AUC 1.000" in html and "benign: AUC 0.500" in html
    assert len(re.findall(r'<rect class="bin"', html)) == 4                   # one bar per non-empty bin
    assert "Expected calibration error (ECE)</th><td>0.123" in html
    assert "ECE 0.123</strong>" in html and "95% CI 0.046–0.301" in html
    assert "1 − specificity" in html and "sensitivity" in html
    assert "not a diagnostic device" in html


def test_summary_renders_an_older_metrics_json_without_the_charts(tmp_path: Path) -> None:
    out = hand_run(tmp_path, {})
    html_path = tmp_path / "r.html"
    report.render_report(out, html_path, pages="none", processes=1)
    html = html_path.read_text(encoding="utf-8")
    assert "Confusion matrix" in html and "Accuracy" in html                # the rest of the section is there
    assert "<svg" not in html and "ECE" not in html and "Discrimination and calibration" not in html
