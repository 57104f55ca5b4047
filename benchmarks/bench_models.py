"""Forward-pass rate of two checkpoints in the same run, at each precision: is the new default at least as fast?

The network alone (random input at the card's size, batch 16, BatchNorm folded as ``run`` loads it), measured in
alternating rounds so that a machine busy with other work slows both alike; the ratio is candidate / baseline.

    python benchmarks/bench_models.py --baseline busi_batch/weights/busi_unet_v1.pt \
        --candidate busi_batch/weights/busi_unet_v4.pt [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from busi_batch.bench import cpu_name, forward_rate
from busi_batch.runtime import native_bf16
from busi_batch.model import FORWARD_PRECISIONS, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--candidate", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    results = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "batch_size": args.batch_size}
    for precision in FORWARD_PRECISIONS:
        if precision == "bf16" and not native_bf16(torch.device("cpu")):
            continue  # no native bf16 on this CPU
        models = {name: load_model(path, precision=precision)
                  for name, path in (("baseline", args.baseline), ("candidate", args.candidate))}
        rates: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, loaded in models.items():
                rates[name].append(forward_rate(loaded, args.batch_size, args.seconds))
        best = {name: max(values) for name, values in rates.items()}
        results[precision] = {
            "baseline_images_per_s": round(best["baseline"], 1),
            "candidate_images_per_s": round(best["candidate"], 1),
            "ratio": round(best["candidate"] / best["baseline"], 3),
            "rounds": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
