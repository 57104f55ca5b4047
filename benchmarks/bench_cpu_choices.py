"""The measurements behind the CPU choices in the README's throughput section, on a synthetic study.

1. ``stages``: CPU milliseconds per image of the work around the network: read + decode, pre-processing, mask
   from the lesion probability (resize, rules, component count) and mask PNG encoding. Uses only functions that
   also existed before the optimisations, so the same script run on an older checkout gives the "before" column.
2. ``fold``: forward-pass images/s of the shipped network as loaded (BatchNorm folded) against the same network
   unfolded, in fp32 and bf16.
3. ``gate``: wall seconds of ``pipeline.run`` on the study with the decode gate (as shipped) and without it.
4. ``threads``: forward-pass images/s with one torch thread and with all of them, in fp32 and bf16: how well the
   network alone uses the cores, so whether giving decoding a core of its own could pay.

    python benchmarks/bench_cpu_choices.py [--images 300] [--parts stages fold gate threads]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from busi_batch import loader
from busi_batch.classes import CLASS_NAMES
from busi_batch.discover import discover
from busi_batch.imageio import decode_input, encode_mask_png, read_bytes
from busi_batch.inference import forward_probabilities
from busi_batch.model import load_model
from busi_batch.postprocess import lesion_count, lesion_mask
from busi_batch.preprocess import model_input
from busi_batch.runtime import tune_cpu_allocator
from busi_batch.synthetic import write_study


def stages(study: Path) -> None:
    loaded = load_model(None, torch.device("cpu"))
    card, rules = loaded.card, loaded.card.mask_rules()
    items = discover(study).items
    spent = dict.fromkeys(("read + decode", "pre-process", "mask from probability", "mask PNG encode"), 0.0)

    def timed(stage: str, work):  # noqa: ANN001, ANN202
        start = time.thread_time()  # this thread only: not torch's threads still spinning after a forward pass
        result = work()
        spent[stage] += time.thread_time() - start
        return result

    for item in items:
        image = timed("read + decode", lambda: decode_input(read_bytes(item.path), item.frame))
        x = timed("pre-process", lambda: model_input(image, card.input_size, card.normalisation["mean"],
                                                     card.normalisation["std"], card.input_geometry))
        probs, lesion = forward_probabilities(loaded, torch.from_numpy(x)[None, None])
        top = CLASS_NAMES[int(np.argmax(probs[0].numpy()))]
        mask = timed("mask from probability", lambda: lesion_mask(lesion[0].numpy(), *image.shape[:2], top, rules))
        timed("mask from probability", lambda: lesion_count(mask))
        timed("mask PNG encode", lambda: encode_mask_png(mask))
    for stage, seconds in spent.items():
        print(f"  {stage:24s} {seconds / len(items) * 1000:6.2f} ms CPU per image")
    print(f"  {'total':24s} {sum(spent.values()) / len(items) * 1000:6.2f} ms CPU per image")


def fold() -> None:
    from busi_batch.bench import forward_rate
    from busi_batch.model import MultiTaskUNet

    for precision in ("fp32", "bf16"):
        loaded = load_model(None, torch.device("cpu"), precision)
        plain = MultiTaskUNet(loaded.card.unet_config())
        state = torch.load(loaded.weights_path, weights_only=True)
        plain.load_state_dict({k: v.float() for k, v in state.items()})
        unfolded = type(loaded)(network=plain.eval().to(memory_format=torch.channels_last), card=loaded.card,
                                weights_path=loaded.weights_path, sha256=loaded.sha256, precision=precision)
        print(f"  {precision}: folded {forward_rate(loaded, 16):6.1f} images/s, "
              f"unfolded {forward_rate(unfolded, 16):6.1f} images/s (batch 16)")


def threads() -> None:
    from busi_batch.bench import forward_rate

    every = torch.get_num_threads()
    for precision in ("fp32", "bf16"):
        loaded = load_model(None, torch.device("cpu"), precision)
        rates = {}
        for count in (1, every):
            torch.set_num_threads(count)
            rates[count] = forward_rate(loaded, 16)
        torch.set_num_threads(every)
        print(f"  {precision}: 1 thread {rates[1]:6.1f} images/s, {every} threads {rates[every]:6.1f} images/s "
              f"({rates[every] / rates[1]:.2f}x; batch 16)")


class _OpenGate:
    """A gate that never closes: decoding runs alongside the forward pass, as before the gate."""

    def closed(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def wait(self) -> None:
        pass

    def close(self) -> None:
        pass


def gate(study: Path, out: Path) -> None:
    from busi_batch.pipeline import RunConfig, run

    shipped = loader.DecodeGate
    for label, factory in (("with the gate", shipped), ("without it", _OpenGate)):
        loader.DecodeGate = factory
        try:
            start = time.perf_counter()
            run(RunConfig(study=study, out=out / label.replace(" ", "-"), force=True))
            print(f"  {label:14s} {time.perf_counter() - start:5.2f} s for the run (workers 2, batch 16)")
        finally:
            loader.DecodeGate = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--parts", nargs="+", choices=("stages", "fold", "gate", "threads"),
                        default=["stages", "fold", "gate", "threads"])
    args = parser.parse_args()
    tune_cpu_allocator()
    with tempfile.TemporaryDirectory(prefix="busi-cpu-choices-") as tmp:
        study = Path(tmp) / "study"
        write_study(study, args.images)
        for part in args.parts:
            print(f"{part} ({args.images} synthetic images):")
            if part == "stages":
                stages(study)
            elif part == "fold":
                fold()
            elif part == "threads":
                threads()
            else:
                gate(study, Path(tmp))


if __name__ == "__main__":
    main()
