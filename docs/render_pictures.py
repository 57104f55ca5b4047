"""Render the report pictures in docs/ (report-summary.png, report-page.png) from the bundled sample study.

Usage, from the repository root, after `pip install -e ".[docs]"` (pypdfium2 renders the PDF pages; no poppler):

    python docs/render_pictures.py                       # the shipped default model
    python docs/render_pictures.py --weights busi_batch/weights/busi_unet_v6.pt

It runs `busi-batch run` on tests/data/sample_study into a temporary folder, renders the first summary page and
the per-image page of ``--image`` (found by its file name in the page text, so it does not depend on how many pages
the summary takes), and prints the model and page numbers to quote under the pictures in docs/reports.md.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, help="checkpoint (default: the shipped default model)")
    parser.add_argument("--image", default="malignant (123).png", help="the image whose page is pictured")
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pdf = Path(tmp) / "sample.pdf"
        command = [sys.executable, "-m", "busi_batch", "run", str(ROOT / "tests" / "data" / "sample_study"),
                   "--out", str(Path(tmp) / "results"), "--report", str(pdf)]
        if args.weights:
            command += ["--weights", str(args.weights)]
        subprocess.run(command, check=True)
        image_page = page_of(pdf, args.image)
        render(pdf, 0, args.out / "report-summary.png", args.dpi)
        render(pdf, image_page, args.out / "report-page.png", args.dpi)
        print(f"summary page 1 and page {image_page + 1} ({args.image}) rendered into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
