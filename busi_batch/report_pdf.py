"""HTML to PDF with WeasyPrint, in chunks across processes, merged with pypdf.

Why chunks: one WeasyPrint document holds every page's layout in memory and uses one core; a report of
thousands of per-image pages would be slow and large in memory. Each chunk is an HTML document of a few dozen
per-image pages rendered in a worker process; its first page number is set with CSS
(``@page :first { counter-reset: page N }``), so the merged file is numbered as one document.

Each worker reports, for every page anchor (``img-N``), the page of its chunk it landed on, so the caller can
check that its page numbers were right (and re-render if a page ever overflowed onto two).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("busi_batch")


@dataclass(frozen=True)
class ChunkJob:
    """One HTML document to render into one PDF file (plain data: it crosses a process boundary)."""

    index: int
    html: str
    base_url: str
    pdf_path: Path


@dataclass
class ChunkResult:
    index: int
    pdf_path: Path
    pages: int
    anchor_pages: dict[str, int] = field(default_factory=dict)  # anchor id -> 0-based page within the chunk


def render_chunk(job: ChunkJob) -> ChunkResult:
    """Lay out and write one chunk; returns its page count and where each anchor landed."""
    import weasyprint

    document = weasyprint.HTML(string=job.html, base_url=job.base_url).render()
    anchors: dict[str, int] = {}
    for number, page in enumerate(document.pages):
        for anchor in page.anchors:
            anchors.setdefault(anchor, number)
    document.write_pdf(job.pdf_path)
    return ChunkResult(index=job.index, pdf_path=job.pdf_path, pages=len(document.pages), anchor_pages=anchors)


def merge_pdfs(paths: list[Path], title: str) -> bytes:
    """Concatenate PDF files in order into one PDF (bytes), with a document title."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    for path in paths:
        writer.append(str(path))
    writer.add_metadata({"/Title": title, "/Creator": "busi-batch"})
    buffer = io.BytesIO()
    writer.write(buffer)
    writer.close()
    return buffer.getvalue()
