"""``busi-batch bench``: the batched pipeline against the one-image-at-a-time baseline, in one process.

Numbers on the same images and the same model:

* **baseline**: what the reference implementation did: for each image read, decode, preprocess, forward pass at
  batch 1 in fp32, post-process, encode and save the mask (atomically, without fsync, as it did); the CSV at the
  end.
* **baseline at the pipeline's precision**: the same loop with the forward pass in bf16, measured too when the
  pipeline runs in bf16, so that the gain of batching and overlap can be told apart from that of precision.
* **pipeline**: ``busi_batch.pipeline.run`` exactly as ``busi-batch run`` uses it (decoding workers, batching,
  masks back at input size, mask files, CSV, run.json), with ``--force`` so nothing is skipped.
* **forward**: the network alone on random tensors at the chosen batch size and precision: the ceiling the
  pipeline can reach.

Rates are images per second of wall time; peak memory is the maximum resident set of this process plus that of
its largest child (decoding workers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .discover import ImageItem, discover
from .errors import ImageDecodeError, UsageError
from .imageio import atomic_write_bytes, decode_input, encode_mask_png, read_bytes
from .inference import Prediction, forward_probabilities
from .model import LoadedModel, load_model
from .pipeline import RunConfig, run
from .preprocess import model_input
from .records import STATUS_ERROR, ImageResult, write_results_csv
from .rows import result_from_prediction, settings_key
from .runfolder import mask_relpaths
from .runtime import select_device, select_precision, tune_cpu_allocator
from .synthetic import write_study


@dataclass
class BenchResult:
    """One benchmark's measurements and the conditions they were taken under."""

    images: int
    baseline_images_per_s: float
    baseline_same_precision_images_per_s: float | None
    pipeline_images_per_s: float
    forward_images_per_s: float
    speedup_vs_baseline: float
    speedup_vs_same_precision_baseline: float | None
    pipeline_vs_forward: float
    precision: str
    batch_size: int
    workers: int
    device: str
    model: str
    input_size: int
    peak_rss_mb: float
    study: str
    cpu_count: int | None
    torch_threads: int
    torch_version: str
    machine: str
    tool_version: str

    def table(self) -> str:
        rows = [
            ("images", f"{self.images}"),
            ("device", self.device),
            ("model", f"{self.model} at {self.input_size}x{self.input_size}"),
            ("batch size / workers", f"{self.batch_size} / {self.workers}"),
            ("precision (pipeline, forward)", self.precision),
            ("baseline (1 at a time, fp32)", f"{self.baseline_images_per_s:.1f} images/s"),
        ]
        if self.baseline_same_precision_images_per_s is not None:
            rows.append((f"baseline (1 at a time, {self.precision})",
                         f"{self.baseline_same_precision_images_per_s:.1f} images/s"))
        rows += [
            ("pipeline (busi-batch run)", f"{self.pipeline_images_per_s:.1f} images/s"),
            ("forward pass alone", f"{self.forward_images_per_s:.1f} images/s"),
            ("pipeline / baseline", f"{self.speedup_vs_baseline:.2f}x"),
        ]
        if self.speedup_vs_same_precision_baseline is not None:
            rows.append((f"pipeline / {self.precision} baseline", f"{self.speedup_vs_same_precision_baseline:.2f}x"))
        rows += [
            ("pipeline / forward pass", f"{self.pipeline_vs_forward:.0%}"),
            ("peak memory", f"{self.peak_rss_mb:.0f} MB"),
            ("machine", f"{self.machine}, {self.cpu_count} CPUs, torch {self.torch_version}, "
                        f"{self.torch_threads} threads"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def baseline(loaded: LoadedModel, items: list[ImageItem], out: Path) -> float:
    """The reference loop, one image at a time through the same library functions; returns seconds."""
    masks = mask_relpaths(items)
    settings = settings_key(loaded, False)
    card = loaded.card
    rows: list[ImageResult] = []
    start = time.perf_counter()
    for index, item in enumerate(items):
        try:
            image = decode_input(read_bytes(item.path), item.frame)
        except ImageDecodeError as err:
            rows.append(ImageResult(image=item.name, status=STATUS_ERROR, error=str(err)))
            continue
        x = torch.from_numpy(model_input(image, card.input_size, card.normalisation["mean"],
                                         card.normalisation["std"], card.input_geometry))[None, None]
        probs, lesion = forward_probabilities(loaded, x)
        pred = Prediction(index=index, input_sha256="", height=image.shape[0], width=image.shape[1],
                          probabilities=probs[0].cpu().numpy(), lesion_probability=lesion[0].cpu().numpy())
        row, mask = result_from_prediction(item, pred, loaded, masks[item.name], settings, None)
        atomic_write_bytes(out / row.mask, encode_mask_png(mask), durable=False)  # as the reference wrote it
        rows.append(row)
    write_results_csv(out / "predictions.csv", rows)
    return time.perf_counter() - start


def forward_rate(loaded: LoadedModel, batch_size: int, seconds: float = 5.0) -> float:
    """Images/s of the network alone on random input at ``batch_size`` (after two warm-up passes)."""
    size = loaded.card.input_size
    batch = torch.randn(batch_size, 1, size, size)
    for _ in range(2):
        forward_probabilities(loaded, batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        class_probs, _ = forward_probabilities(loaded, batch)
        class_probs.cpu()
        done += batch_size
    return done / (time.perf_counter() - start)


def cpu_name() -> str:
    """The CPU model as the kernel reports it (Linux), else whatever the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_rss_mb() -> float:
    """Peak resident memory of this process plus its largest finished child, in MB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0


def benchmark(
    study: Path | None = None,
    synthetic: int = 200,
    weights: Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    workers: int = 2,
    baseline_limit: int | None = None,
    forward_seconds: float = 5.0,
    precision: str = "auto",
) -> BenchResult:
    """Measure baseline, pipeline and forward rates on ``study`` (or a synthetic study of ``synthetic`` images)."""
    label = str(study) if study is not None else f"synthetic ({synthetic} images)"
    torch_device = select_device(device)
    loaded = load_model(weights, torch_device, select_precision(precision, torch_device))
    reference = dataclasses.replace(loaded, precision="fp32")  # the same network, run as the reference ran it
    if torch_device.type == "cpu":
        tune_cpu_allocator()
    with tempfile.TemporaryDirectory(prefix="busi-bench-") as tmp:
        tmp_path = Path(tmp)
        if study is None:
            if synthetic < 1:
                raise UsageError("--synthetic needs at least 1 image")
            study = tmp_path / "study"
            write_study(study, synthetic)
        items = discover(study).items
        if not items:
            raise UsageError(f"{study}: no images found")
        for item in items:  # warm the page cache so neither contender pays the first read
            try:
                read_bytes(item.path)
            except ImageDecodeError:
                pass
        base_items = items[:baseline_limit] if baseline_limit else items
        base_seconds = baseline(reference, base_items, tmp_path / "baseline")
        same_seconds = None
        if loaded.precision != reference.precision:
            same_seconds = baseline(loaded, base_items, tmp_path / "baseline-same-precision")
        start = time.perf_counter()
        run(RunConfig(study=Path(study), out=tmp_path / "pipeline", weights=loaded.weights_path, device=device,
                      precision=loaded.precision, batch_size=batch_size, workers=workers, force=True))
        pipe_seconds = time.perf_counter() - start
        forward = forward_rate(loaded, batch_size, forward_seconds)
    base_rate = len(base_items) / base_seconds
    same_rate = len(base_items) / same_seconds if same_seconds is not None else None
    pipe_rate = len(items) / pipe_seconds
    return BenchResult(
        images=len(items),
        baseline_images_per_s=base_rate,
        baseline_same_precision_images_per_s=same_rate,
        pipeline_images_per_s=pipe_rate,
        forward_images_per_s=forward,
        speedup_vs_baseline=pipe_rate / base_rate,
        speedup_vs_same_precision_baseline=pipe_rate / same_rate if same_rate else None,
        pipeline_vs_forward=pipe_rate / forward,
        precision=loaded.precision,
        batch_size=batch_size,
        workers=workers,
        device=str(torch_device) + (f" ({torch.cuda.get_device_name(torch_device)})"
                                    if torch_device.type == "cuda" else f" ({cpu_name()})"),
        model=f"{loaded.card.name} {loaded.card.version}" + (" [test model]" if loaded.card.test_model else ""),
        input_size=loaded.card.input_size,
        peak_rss_mb=peak_rss_mb(),
        study=label,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        machine=f"{platform.system()} {platform.machine()}",
        tool_version=__version__,
    )


def write_json(result: BenchResult, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(asdict(result), indent=2) + "\n").encode())


if __name__ == "__main__":  # pragma: no cover - convenience: python -m busi_batch.bench
    print(benchmark().table(), file=sys.stderr)
