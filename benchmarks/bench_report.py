"""Benchmark of the report step (after inference): wall time, CPU time, peak memory and PDF size per page.

Usage (the full BUSI folder, 780 images with ground truth; the run itself is made first and not timed):

    nice -n 19 python benchmarks/bench_report.py --study /work/shared/data/busi --run-dir /tmp/busi-run \
        --tiny-weights            # or --weights busi_batch/weights/busi_unet_v1.pt

or on an existing run folder: ``python benchmarks/bench_report.py --run-dir /tmp/busi-run``.

Each configuration is measured in a fresh child process, so its peak RSS is its own:

* ``chunked``: the shipped path, ``render_report(..., processes=N)``: JPEG renditions and PDF chunks in a
  process pool, merged with pypdf.
* ``baseline`` (unless ``--no-baseline``): the same templates and renditions rendered the naive way, in one
  process as one WeasyPrint document. The ratio baseline / chunked is the speed-up that chunking buys.

Peak memory: a thread samples the resident memory (VmRSS) of the measuring process and all its descendants every
50 ms and keeps the largest sum (shared library pages count once per process, so this overstates a little).
``getrusage`` figures (RUSAGE_SELF and the largest child, RUSAGE_CHILDREN) are reported too; note that the
largest child can be a short-lived helper that a library spawns at import time, not a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from pypdf import PdfReader


def measure(run_dir: Path, target: Path, processes: int, baseline: bool, pages: str) -> dict:
    """Render once in this (fresh) process and report what it cost."""
    from busi_batch import report
    from busi_batch.report import pdf, render

    if baseline:
        render.MIN_PAGES_FOR_POOL = 10**9          # renditions in this process too
        pdf.CHUNK_PAGES = 10**9                    # one WeasyPrint document for every page
        pdf.split_pages = lambda entries, workers: [entries] if entries else []
        processes = 1
    sampler = TreeRss()
    sampler.start()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        result = report.render_report(run_dir, target, pages=pages, processes=processes)
    finally:
        sampler.stop()
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    pages_total = len(PdfReader(str(target)).pages) if result.format == "pdf" else None
    size = target.stat().st_size
    return {
        "config": "baseline" if baseline else "chunked",
        "processes": processes,
        "image_pages": result.image_pages,
        "total_pages": pages_total,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(sampler.peak_kb / 1024, 1),
        "rusage_self_mb": round(self_kb / 1024, 1),
        "rusage_largest_child_mb": round(child_kb / 1024, 1),
        "file_kb": round(size / 1024, 1),
        "kb_per_image_page": round(size / 1024 / max(1, result.image_pages), 1),
    }


class TreeRss(threading.Thread):
    """Samples the summed VmRSS of this process and its descendants (Linux /proc) and keeps the maximum."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(os.getpid()))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak_kb = max(self.peak_kb, tree_rss_kb(os.getpid()))


def tree_rss_kb(root: int) -> int:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child_pid, parent in parents.items():
            if parent == pid and child_pid not in tree:
                tree.add(child_pid)
                frontier.append(child_pid)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(args: argparse.Namespace, baseline: bool) -> dict:
    target = args.report.with_name(args.report.stem + ("-baseline" if baseline else "") + args.report.suffix)
    cmd = [sys.executable, __file__, "--measure", "--run-dir", str(args.run_dir), "--report", str(target),
           "--processes", str(args.processes), "--pages", args.pages] + (["--baseline-only"] if baseline else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="finished run folder (made first with --study)")
    parser.add_argument("--study", type=Path, help="make the run folder first with `busi-batch run STUDY` (not timed)")
    parser.add_argument("--weights", type=Path, help="checkpoint for --study (default: the shipped model)")
    parser.add_argument("--tiny-weights", action="store_true",
                        help="for --study, use the test suite's tiny random-weight checkpoint (tests/conftest.py)")
    parser.add_argument("--report", type=Path, default=Path("/tmp/bench-report.pdf"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--pages", default="all")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.run_dir, args.report, args.processes, args.baseline_only, args.pages)))
        return
    if args.study is not None:
        cmd = ["busi-batch", "run", str(args.study), "--out", str(args.run_dir), "--quiet"]
        if args.tiny_weights:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import make_tiny_checkpoint

            args.weights = make_tiny_checkpoint(args.run_dir.parent / f"{args.run_dir.name}-tiny.pt")
        if args.weights:
            cmd += ["--weights", str(args.weights)]
        subprocess.run(cmd, check=False)  # exit 3 (some files failed) still leaves a complete run folder
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start"
    results = [child(args, baseline=False)]
    if not args.no_baseline:
        results.append(child(args, baseline=True))
    summary = {"machine": machine, "run_dir": str(args.run_dir), "results": results}
    if len(results) == 2:
        summary["speedup_wall"] = round(results[1]["wall_s"] / results[0]["wall_s"], 2)
        summary["memory_ratio"] = round(results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 2)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
