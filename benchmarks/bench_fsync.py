"""What durable commits cost per mask file: the measurement behind the batch-level ``syncfs`` of ``runfolder``.

Writes the same BUSI-sized mask PNGs (500x400, about 20% lesion) into a fresh output folder, batch by batch, three
ways, alternated over ``--rounds`` rounds so that a busy machine weighs on each alike:

* ``none``: atomic rename, no fsync at all (busi-batch before issue 14);
* ``per-file``: each mask fsynced before its rename and its folder after it (``durable=True`` for every file);
* ``per-batch``: as a run commits since issue 14 (``RunFolder.write_mask`` then ``RunFolder.commit_rows``: one
  ``syncfs`` per batch, then the batch's journal lines).

Prints the median milliseconds of wall time per mask for each.

    python benchmarks/bench_fsync.py [--masks 160] [--batch-size 16] [--rounds 3] [--dir /path/on/the/disk]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from busi_batch.imageio import atomic_write_bytes, encode_mask_png, fsync_dir
from busi_batch.records import ImageResult
from busi_batch.runfolder import RunFolder


def write(arm: str, folder: Path, data: bytes, masks: int, batch_size: int) -> float:
    """Seconds per mask for one arm."""
    target = RunFolder(folder)
    target.prepare()
    start = time.perf_counter()
    for first in range(0, masks, batch_size):
        rows = []
        for i in range(first, min(first + batch_size, masks)):
            rel = f"masks/m{i:05d}_mask.png"
            if arm == "per-batch":
                target.write_mask(rel, data)
            else:
                atomic_write_bytes(folder / rel, data, temp_dir=target.temp_dir, durable=arm == "per-file")
            rows.append(ImageResult(image=f"m{i:05d}.png", status="ok", mask=rel))
        if arm == "per-batch":
            target.commit_rows(rows)
    if arm != "none":
        fsync_dir(folder / "masks")
    return (time.perf_counter() - start) / masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: the system's temp folder)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    mask = np.zeros((400, 500), bool)
    mask[100:300, 120:320] = rng.random((200, 200)) > 0.02
    data = encode_mask_png(mask)
    times: dict[str, list[float]] = {"none": [], "per-file": [], "per-batch": []}
    for _ in range(args.rounds):
        for arm in times:
            with tempfile.TemporaryDirectory(dir=args.dir, prefix="busi-fsync-") as tmp:
                times[arm].append(write(arm, Path(tmp), data, args.masks, args.batch_size))
    print(f"{args.masks} masks of {len(data)} bytes, batches of {args.batch_size}, {args.rounds} rounds (median):")
    for arm, values in times.items():
        print(f"  {arm:<10} {1000 * statistics.median(values):7.2f} ms per mask")


if __name__ == "__main__":
    main()
