"""`busi-batch bench` runs both contenders on the same images and reports sane, self-consistent numbers.

Not a timed test: the numbers themselves are the benchmark's business, not CI's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from busi_batch.bench import benchmark
from busi_batch.cli import app
from busi_batch.synthetic import write_study


def test_synthetic_study_is_decodable_and_varied(tmp_path: Path) -> None:
    paths = write_study(tmp_path, 7, distinct=3)
    assert len(paths) == 7
    shapes = {cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape for p in paths}
    assert len(shapes) == 3


def test_benchmark_measures_both_contenders(tiny_weights: Path) -> None:
    started = time.perf_counter()
    result = benchmark(None, synthetic=6, weights=tiny_weights, device="cpu", batch_size=3, workers=0,
                       forward_seconds=0.2)
    wall = time.perf_counter() - started
    assert result.images == 6
    # an oracle outside the benchmark's own numbers: the contenders ran one after the other within this call,
    # so the times their rates imply cannot add up to more than the call took (inflated rates would)
    assert 6 / result.baseline_images_per_s + 6 / result.pipeline_images_per_s < wall
    assert result.baseline_images_per_s > 0 and result.pipeline_images_per_s > 0 and result.forward_images_per_s > 0
    assert result.speedup_vs_baseline == pytest.approx(result.pipeline_images_per_s / result.baseline_images_per_s)
    assert result.peak_rss_mb > 50 and "images/s" in result.table()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_benchmark_states_its_precision_and_baselines(tiny_weights: Path, precision: str) -> None:
    """The baseline is always the reference's fp32; a bf16 pipeline is also set against a bf16 baseline."""
    result = benchmark(None, synthetic=4, weights=tiny_weights, device="cpu", batch_size=2, workers=0,
                       forward_seconds=0.1, precision=precision)
    assert result.precision == precision and f"precision (pipeline, forward)  {precision}" in result.table()
    if precision == "fp32":
        assert result.baseline_same_precision_images_per_s is None
        assert result.speedup_vs_same_precision_baseline is None
    else:
        assert result.baseline_same_precision_images_per_s > 0
        assert result.speedup_vs_same_precision_baseline == pytest.approx(
            result.pipeline_images_per_s / result.baseline_same_precision_images_per_s)
        assert "pipeline / bf16 baseline" in result.table()


def test_bench_command_writes_json(tiny_weights: Path, sample_study: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(sample_study), "--weights", str(tiny_weights), "-b", "4",
                                      "-j", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["images"] == 8 and data["batch_size"] == 4 and "pipeline / baseline" in result.output
