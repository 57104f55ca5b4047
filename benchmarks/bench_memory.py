"""Memory stays flat with study size: peak memory of ``busi-batch run`` on N1 vs N2 synthetic images.

Usage (the numbers in the README came from this command):

    nice -n 19 python benchmarks/bench_memory.py --images 500 5000

For each size a synthetic study is written to a temporary folder (ultrasound-like speckle frames of BUSI-like
mixed sizes, 380x450 to 650x900, portrait and landscape, from ``busi_batch.synthetic``; 64 distinct frames,
hard-linked under new names, so 5,000 images cost no extra disk while every file is still read, hashed, decoded,
pre-processed, run through the network and written as its own mask). Then ``busi_batch.pipeline.run`` processes it
in a fresh child process, with the CLI's defaults (``--batch-size 16 --workers 2``) unless told otherwise, and
the child reports:

* ``main peak``: ``getrusage(RUSAGE_SELF).ru_maxrss`` of the process that runs the pipeline;
* ``worker peak``: ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of that process, the largest of its children that
  ended (the DataLoader's decoding workers);
* ``tree peak``: a thread samples VmRSS of the process and all its descendants every 50 ms and keeps the largest
  sum (pages shared between parent and forked workers count twice, so this overstates a little).

The claim checked is the issue's: peak memory for the large study within 20% of the small one's (ratios of the
main and tree peaks). A pipeline that kept every image or mask would grow by roughly 0.3 MB per image.

The network is a random-weight U-Net of the shipped architecture (base width 16, depth 4) at 256x256 unless
``--weights`` names a checkpoint; weights do not change memory, only the architecture and input size do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LIMIT = 1.20


def write_study(root: Path, count: int, seed: int = 0, distinct: int = 64) -> None:
    """``count`` PNGs under ``root`` (100 per folder), hard links to ``distinct`` generated frames."""
    import numpy as np

    from busi_batch.imageio import encode_png
    from busi_batch.synthetic import SIZES, ultrasound_like

    rng = np.random.default_rng(seed)
    frames_dir = root.parent / f"{root.name}-frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(min(distinct, count)):
        h, w = SIZES[i % len(SIZES)]
        h, w = (w, h) if i % 5 == 4 else (h, w)  # some portrait frames
        frame = frames_dir / f"frame{i:03d}.png"
        frame.write_bytes(encode_png(ultrasound_like(h, w, rng)))
        frames.append(frame)
    for i in range(count):
        path = root / f"part{i // 100:03d}" / f"synthetic_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(frames[i % len(frames)], path)


def make_weights(folder: Path) -> Path:
    """A random-weight checkpoint of the shipped architecture (memory depends on shapes, not on values)."""
    import dataclasses

    import torch

    from busi_batch.model import ModelCard, MultiTaskUNet, UNetConfig, save_model

    torch.manual_seed(0)
    config = UNetConfig()
    card = ModelCard(name="bench-random", version="0", architecture=dataclasses.asdict(config), input_size=256,
                     test_model=True, training_data="none: random weights for the memory benchmark")
    path = folder / "bench.pt"
    save_model(MultiTaskUNet(config).eval(), card, path)
    return path


class TreeRss:
    """Largest sum of VmRSS over this process and its descendants, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(pid) for pid in _tree(os.getpid())))
            self._stop.wait(0.05)


def _tree(root: int) -> list[int]:
    pids, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            pids.append(child)
            frontier.append(child)
    return pids


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(study: Path, out: Path, weights: Path, batch_size: int, workers: int, allocator: str) -> None:
    """Run the pipeline once in this fresh process and print what it cost, as JSON on stdout."""
    from busi_batch import inference
    from busi_batch.pipeline import RunConfig, run

    if allocator == "glibc":  # glibc's defaults: skip runtime.tune_cpu_allocator's mallopt calls
        inference.tune_cpu_allocator = lambda: None  # the name predict calls it by

    sampler = TreeRss()
    sampler.start()
    t0 = time.perf_counter()
    summary = run(RunConfig(study=study, out=out, weights=weights, device="cpu", batch_size=batch_size,
                            workers=workers, force=True))
    seconds = time.perf_counter() - t0
    sampler.stop()
    print(json.dumps({
        "images": summary.found, "ok": summary.ok, "seconds": round(seconds, 1),
        "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "tree_peak_mb": sampler.peak_kb / 1024,
    }))


def measure(count: int, base: Path, weights: Path, batch_size: int, workers: int, allocator: str,
            repeat: int) -> dict:
    """Peaks of ``repeat`` fresh runs on one study of ``count`` images: the largest of each figure."""
    study, out = base / f"study-{count}", base / f"out-{count}"
    if not study.exists():
        write_study(study, count)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    runs = []
    for _ in range(repeat):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(study), str(out), str(weights), "--batch-size",
             str(batch_size), "--workers", str(workers), "--allocator", allocator],
            capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"child run on {count} images failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {key: max(r[key] for r in runs) for key in runs[0]}
    result["main_peak_each_mb"] = [round(r["main_peak_mb"]) for r in runs]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[500, 5000], help="study sizes (first = baseline)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--weights", type=Path, help="checkpoint (default: random weights, shipped architecture)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh runs per size; the largest peak counts")
    parser.add_argument("--allocator", choices=("tuned", "glibc"), default="tuned",
                        help="tuned: as shipped (runtime.tune_cpu_allocator); glibc: the C library's defaults")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("STUDY", "OUT", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*map(Path, args.child), args.batch_size, args.workers, args.allocator)
        return
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        base = Path(tmp)
        weights = args.weights or make_weights(base)
        results = []
        for count in args.images:
            result = measure(count, base, weights, args.batch_size, args.workers, args.allocator, args.repeat)
            results.append(result)
            each = f" (each run: {result['main_peak_each_mb']})" if args.repeat > 1 else ""
            print(f"{count:>6} images: main peak {result['main_peak_mb']:7.1f} MB{each}, worker peak "
                  f"{result['worker_peak_mb']:7.1f} MB, tree peak {result['tree_peak_mb']:7.1f} MB "
                  f"({result['ok']} ok, {result['seconds']:.0f} s)", flush=True)
    small, large = results[0], results[-1]
    ratios = {k: large[k] / small[k] for k in ("main_peak_mb", "worker_peak_mb", "tree_peak_mb")}
    verdict = all(ratios[k] <= LIMIT for k in ("main_peak_mb", "tree_peak_mb"))
    print(f"ratio {args.images[-1]} / {args.images[0]} images: main {ratios['main_peak_mb']:.3f}, "
          f"workers {ratios['worker_peak_mb']:.3f}, tree {ratios['tree_peak_mb']:.3f} "
          f"-> {'within' if verdict else 'NOT within'} {LIMIT - 1:.0%}")
    weights_text = args.weights or "random, base 16 depth 4, 256 px"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"batch size {args.batch_size}, workers {args.workers}, weights {weights_text}, "
          f"allocator {args.allocator}, {args.repeat} run(s) per size")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios, "within_limit": verdict,
                                         "limit": LIMIT, "cpu_count": os.cpu_count(), "allocator": args.allocator,
                                         "repeat": args.repeat}, indent=2) + "\n")
    if not verdict:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
