"""Render the pictures in docs/: the report pages (report-summary.png, report-page.png) from the bundled sample
study, and the model card's evidence (model-evidence.png: the default model's test ROC curves and reliability
diagram, drawn from its card with the report's own chart code).

Usage, from the repository root, after `pip install -e ".[docs]"` (pypdfium2 renders the PDF pages; no poppler):

    python docs/render_pictures.py                       # the shipped default model
    python docs/render_pictures.py --weights busi_batch/weights/busi_unet_v6.pt
    python docs/render_pictures.py --evidence-only       # only the model card's picture, from the card

It runs `busi-batch run` on tests/data/sample_study into a temporary folder, renders the first summary page and
the per-image page of ``--image`` (found by its file name in the page text, so it does not depend on how many pages
the summary takes), and prints the model and page numbers to quote under the pictures in docs/reports.md. The
evidence picture comes from the card's ``metrics.classification`` block (the test split, scored at export), so it
needs no data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def page_of(pdf: Path, image: str) -> int:
    """Index of the per-image page (its text starts "Image N of M") that names ``image``."""
    from pypdf import PdfReader

    for index, page in enumerate(PdfReader(str(pdf)).pages):
        text = page.extract_text() or ""
        if text.startswith("Image ") and image in text:
            return index
    raise SystemExit(f"{pdf}: no per-image page names {image!r}")


def render(pdf: Path, index: int, out: Path, dpi: int) -> None:
    """Page ``index`` (0-based) of ``pdf`` as a PNG at ``dpi``."""
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(str(pdf))
    try:
        document[index].render(scale=dpi / 72).to_pil().convert("RGB").save(out, optimize=True)
    finally:
        document.close()


EVIDENCE_TEMPLATE = """{% import "macros.html.j2" as m %}
<html><head><style>{{ css | safe }} @page { size: 180mm 112mm; margin: 4mm; } body { margin: 0; }
.two-col { display: flex; gap: 6mm; } .svg-chart { flex: 1; }</style></head><body>
<p class="chart-title"><strong>{{ title }}</strong></p>
<div class="two-col">
  <div class="svg-chart"><p class="chart-title">ROC curves <span class="note">one-vs-rest;
  {% for c in roc.curves %}<span style="color: {{ c.colour }}">&#9632;</span> {{ c.name }} AUC
  {{ c.auc | num }}{{ ", " if not loop.last }}{% endfor %}</span></p>
  {{ m.roc_svg(roc) }}</div>
  <div class="svg-chart"><p class="chart-title">Reliability diagram <span class="note">ECE {{ ece | num }}
  ({{ ece_ci | ci }}); red dot: a bin's mean confidence against its accuracy</span></p>
  {{ m.reliability_svg(reliability) }}</div>
</div></body></html>"""


def render_evidence(weights: Path | None, out: Path, dpi: int) -> str:
    """model-evidence.png from the card of ``weights`` (default: the shipped default model); returns its name."""
    import weasyprint

    from busi_batch.model import card_path_for, default_weights_path
    from busi_batch.report.content import reliability_chart, roc_chart
    from busi_batch.report.render import environment, stylesheets

    card = json.loads(card_path_for(weights or default_weights_path()).read_text(encoding="utf-8"))
    classification = card["metrics"]["classification"]
    roc, reliability = roc_chart(classification), reliability_chart(classification)
    if roc is None or reliability is None:
        raise SystemExit(f"{card['name']}: its card holds no ROC curves or reliability bins")
    title = (f"{card['name']}: test split ({classification['n_images']} images), scored at export, "
             "as in the model card")
    html = environment().from_string(EVIDENCE_TEMPLATE).render(
        css=stylesheets()[0], title=title, roc=roc, reliability=reliability, ece=classification["ece"],
        ece_ci=classification["ece_ci95"])
    with tempfile.TemporaryDirectory() as tmp:
        pdf = Path(tmp) / "evidence.pdf"
        document = weasyprint.HTML(string=html).render()
        if len(document.pages) != 1:  # the charts spilled onto a later page: page 1 alone would be blank
            raise SystemExit(f"model-evidence: the charts take {len(document.pages)} pages, not 1; enlarge @page")
        document.write_pdf(str(pdf))
        render(pdf, 0, out / "model-evidence.png", dpi)
    return str(card["name"])


def render_report_pictures(weights: Path | None, image: str, out: Path, dpi: int) -> None:
    """report-summary.png and report-page.png: ``busi-batch run`` on the sample study, two pages of its PDF."""
    with tempfile.TemporaryDirectory() as tmp:
        pdf = Path(tmp) / "sample.pdf"
        command = [sys.executable, "-m", "busi_batch", "run", str(ROOT / "tests" / "data" / "sample_study"),
                   "--out", str(Path(tmp) / "results"), "--report", str(pdf)]
        if weights:
            command += ["--weights", str(weights)]
        subprocess.run(command, check=True)
        image_page = page_of(pdf, image)
        render(pdf, 0, out / "report-summary.png", dpi)
        render(pdf, image_page, out / "report-page.png", dpi)
        print(f"summary page 1 and page {image_page + 1} ({image}) rendered into {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped default model)")
    parser.add_argument("--image", default="malignant (123).png", help="the image whose page is pictured")
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--evidence-only", action="store_true", help="only model-evidence.png (no run, ~2 s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    if not args.evidence_only:
        render_report_pictures(args.weights, args.image, args.out, args.dpi)
    name = render_evidence(args.weights, args.out, 2 * args.dpi)
    print(f"model-evidence.png: test ROC curves and reliability diagram of {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
