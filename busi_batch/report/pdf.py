"""HTML pages to one PDF file: WeasyPrint in chunks across worker processes, merged with pypdf, numbered as one.

One WeasyPrint document holds every page's layout in memory and uses one core, so the per-image pages are
rendered in chunks of a few dozen (:func:`split_pages`), each an HTML document laid out in a worker process. A
chunk's first page number is set with CSS (``@page :first { counter-reset: page N }``), so the merged file is
numbered as one document. Each worker reports the page of its chunk that every anchor (``img-N``) landed on;
:func:`write_pdf` renders again whatever was numbered wrongly (a page that overflowed onto two sheets), so the
footers and the summary's page references are right.

Worker processes come from :func:`process_pool` (spawn-based); with one worker everything runs in this process.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..errors import BusiBatchError
from ..imageio import atomic_write_bytes
from .content import Entry, attach

logger = logging.getLogger(__name__)

#: Per-image pages per PDF chunk (each chunk is one WeasyPrint document in a worker process).
CHUNK_PAGES = 48
#: Renders one part of the report as HTML: (entries, first page number, total pages, part), where part is
#: ``summary`` (no entries) or ``pages``.
PageRenderer = Callable[[list[Entry], int, int, str], str]



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


# ------------------------------------------------------------------------------------------ worker processes


@contextmanager
def process_pool(workers: int) -> Iterator[Executor | None]:
    """A spawn-based process pool (safe after torch has started threads in the parent), or None for in-process."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def submit(pool: Executor | None, fn: Callable[[Any], Any], arg: Any) -> Future:
    """``pool.submit``, or run now and hand back a finished future when there is no pool."""
    if pool is not None:
        return pool.submit(fn, arg)
    future: Future = Future()
    future.set_result(fn(arg))
    return future


def map_jobs(pool: Executor | None, fn: Callable[[Any], Any], jobs: list[Any]) -> list[Any]:
    """``fn`` over ``jobs`` in order: across the pool, or here when there is no pool or only one job."""
    if pool is None or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    return list(pool.map(fn, jobs))


# ------------------------------------------------------------------------------------- chunks and numbering


def split_pages(entries: list[Entry], workers: int) -> list[list[Entry]]:
    """Split the per-image pages into chunks: small enough to balance the workers, large enough to amortise
    WeasyPrint's per-document start-up."""
    if not entries:
        return []
    size = max(8, min(CHUNK_PAGES, math.ceil(len(entries) / (2 * workers))))
    return [entries[i:i + size] for i in range(0, len(entries), size)]


class _Numbering:
    """Page numbers of a report rendered in parts: the summary, then each chunk of per-image pages.

    Starts from "one page per image" and learns each part's real page count (and where each image's page landed)
    as parts are rendered.
    """

    def __init__(self, chunks: list[list[Entry]]) -> None:
        self.chunks = chunks
        self.summary_pages = 1
        self.chunk_pages = [len(c) for c in chunks]
        self.local = {e.number: k for chunk in chunks for k, e in enumerate(chunk)}

    def apply(self) -> tuple[list[int], int]:
        """Set every entry's page number; return each chunk's first page number and the total."""
        starts, total = _numbering(self.summary_pages, self.chunk_pages)
        for start, chunk in zip(starts, self.chunks):
            for e in chunk:
                e.page = start + self.local[e.number]
        return starts, total

    def learn(self, result: ChunkResult) -> None:
        self.chunk_pages[result.index] = result.pages
        for e in self.chunks[result.index]:
            self.local[e.number] = result.anchor_pages.get(e.anchor, self.local[e.number])


def _numbering(summary_pages: int, chunk_pages: list[int]) -> tuple[list[int], int]:
    """First page number of every chunk, and the total page count."""
    starts = []
    page = summary_pages + 1
    for n in chunk_pages:
        starts.append(page)
        page += n
    return starts, page - 1


def write_pdf(pool: Executor | None, render_part: PageRenderer, chunks: list[list[Entry]], pictures: list[Future],
              base_url: str, work_dir: Path, target: Path, title: str) -> int:
    """Write the PDF to ``target`` and return its page count: the summary (here, while the workers draw
    pictures), then each chunk as soon as its pictures (``pictures[k]``) exist, then the merge.

    Page numbers assume one page per image; each chunk reports where its pages landed, and any part rendered with
    numbers that turned out wrong is rendered again, so the numbers in the footers and the summary are right.
    The chunk files live in a ``.report-*`` folder under ``work_dir`` until the merge.
    """
    numbering = _Numbering(chunks)
    rendered: dict[int, tuple[int, int]] = {}
    results: dict[int, ChunkResult] = {}
    summary_key: tuple[Any, ...] | None = None

    with tempfile.TemporaryDirectory(prefix=".report-", dir=work_dir) as tmp:
        tmp_dir = Path(tmp)

        def render_summary() -> None:
            nonlocal summary_key
            for _ in range(4):
                _, total = numbering.apply()
                key = (total, tuple(e.page for chunk in chunks for e in chunk))
                if key == summary_key:
                    return
                html = render_part([], 1, total, "summary")
                result = render_chunk(ChunkJob(-1, html, base_url, tmp_dir / "summary.pdf"))
                summary_key = key
                if result.pages == numbering.summary_pages:
                    return
                numbering.summary_pages = result.pages
            raise BusiBatchError("report: the summary's page count does not settle")

        def chunk_job(k: int, starts: list[int], total: int) -> ChunkJob:
            rendered[k] = (starts[k], total)
            html = render_part(chunks[k], starts[k], total, "pages")
            return ChunkJob(k, html, base_url, tmp_dir / f"chunk-{k:05d}.pdf")

        render_summary()
        starts, total = numbering.apply()
        futures = []
        for k, future in enumerate(pictures):
            attach(chunks[k], future.result())
            futures.append(submit(pool, render_chunk, chunk_job(k, starts, total)))
        for future in futures:
            result = future.result()
            results[result.index] = result
            numbering.learn(result)
        for _ in range(4):  # only when a page did not fit: re-render what was numbered wrongly
            render_summary()
            starts, total = numbering.apply()
            redo = [k for k in range(len(chunks)) if rendered[k] != (starts[k], total)]
            if not redo:
                break
            logger.warning("report: some per-image pages took more than one page; renumbering")
            for result in map_jobs(pool, render_chunk, [chunk_job(k, starts, total) for k in redo]):
                results[result.index] = result
                numbering.learn(result)
        else:
            raise BusiBatchError("report: page numbering does not settle")
        paths = [tmp_dir / "summary.pdf"] + [results[k].pdf_path for k in range(len(chunks))]
        atomic_write_bytes(target, merge_pdfs(paths, title=title))
    return total
