"""Training-step speed of the multi-task U-Net in fp32 and bf16 autocast, per base width (CPU).

One step = forward, loss (BCE + cross-entropy, in float32), backward and an AdamW update, batch 16 at 256x256,
channels_last, on random input; each configuration runs for ``--seconds`` after two warm-up steps. This is the
measurement behind ``precision: bf16`` in the training configs.

    python benchmarks/bench_train_step.py [--widths 16 32] [--seconds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from busi_batch.model import MultiTaskUNet, UNetConfig


def steps_per_second(width: int, bf16: bool, seconds: float, batch: int = 16, size: int = 256) -> float:
    """Training images per second for one configuration."""
    torch.manual_seed(0)
    net = MultiTaskUNet(UNetConfig(base_width=width, depth=4, mask_pooling=True, dropout=0.2))
    net = net.to(memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    mask = (torch.rand(batch, 1, size, size) > 0.9).float()
    label = torch.randint(0, 3, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            seg, cls = net(x)
        loss = F.binary_cross_entropy_with_logits(seg.float(), mask) + F.cross_entropy(cls.float(), label)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step()
    step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    for width in args.widths:
        fp32 = steps_per_second(width, False, args.seconds)
        bf16 = steps_per_second(width, True, args.seconds)
        print(f"width {width:3d}: fp32 {fp32:5.1f} images/s, bf16 {bf16:5.1f} images/s ({bf16 / fp32:.1f}x)")


if __name__ == "__main__":
    main()
