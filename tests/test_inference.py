"""Choosing the forward pass precision, and the gate that keeps decoding workers off the cores the network uses."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from busi_batch import inference
from busi_batch.discover import discover
from busi_batch.errors import UsageError
from busi_batch.inference import DecodeGate, StudyDataset, predict, select_precision
from busi_batch.model import load_model
from busi_batch.pipeline import settings_key

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,expected", [({"avx2"}, "fp32"), ({"avx2", "avx512_bf16"}, "bf16"),
                                            ({"amx_bf16", "amx_tile"}, "bf16"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_with_native_support(
    flags: set[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset(flags))
    assert select_precision("auto", CPU) == expected
    assert select_precision("fp32", CPU) == "fp32" and select_precision("bf16", CPU) == "bf16"


def test_unknown_precision_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="fp16"):
        select_precision("fp16", CPU)


def test_bf16_is_part_of_the_resume_settings_and_fp32_keeps_the_old_key(tiny_weights: Path) -> None:
    fp32, bf16 = load_model(tiny_weights, precision="fp32"), load_model(tiny_weights, precision="bf16")
    assert "precision" not in settings_key(fp32, False)  # folders written before the option still resume
    assert settings_key(bf16, False) == settings_key(fp32, False) + ";precision=bf16"


def test_bf16_forward_agrees_with_fp32_on_the_shipped_model(sample_study: Path) -> None:
    """The same classes and nearly the same lesion probabilities on the sample study. bf16 moves busi_unet_v2
    more than it moved v1 (its depthwise convolutions run in bf16): on the 156 test images the same class for
    155, largest class-probability gap 0.18, mean mask Dice 0.981 (``python benchmarks/precision_agreement.py
    --folds test``); on the sample study the largest gap is 0.024."""
    items = discover(sample_study).items
    runs = {}
    for precision in ("fp32", "bf16"):
        loaded = load_model(None, precision=precision)
        runs[precision] = list(predict(loaded, items, batch_size=4, workers=0, with_truth=False))
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert np.argmax(a.probabilities) == np.argmax(b.probabilities)
        assert np.abs(a.probabilities - b.probabilities).max() < 0.05
        assert np.mean((a.lesion_probability >= 0.5) != (b.lesion_probability >= 0.5)) < 0.01


class _ReportingGate(DecodeGate):
    """A gate whose ``wait`` first says, through a pipe, that a worker has arrived at it."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived_r, self.arrived_w = os.pipe()

    def wait(self) -> None:
        os.write(self.arrived_w, b"a")
        super().wait()


def test_closed_gate_holds_a_worker_until_it_opens(sample_study: Path) -> None:
    """The worker is proven to be at the gate (it said so) before the check that it has not passed it."""
    gate = _ReportingGate()
    items = discover(sample_study).items[:2]
    dataset = StudyDataset(items, 64, 0.3, 0.2, with_truth=False, gate=gate)
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda s: s)
    got: list[float] = []
    with gate.closed():
        iterator = iter(loader)  # the worker starts and asks for its first item while the gate is shut

        def first() -> None:
            next(iterator)
            got.append(time.monotonic())

        thread = threading.Thread(target=first)
        thread.start()
        ready, _, _ = select.select([gate.arrived_r], [], [], 60)
        assert ready, "the worker never reached the gate"
        time.sleep(0.3)  # a worker let through would decode two tiny images in far less
        assert not got, "a worker decoded while the gate was closed"
        opened = time.monotonic()
    thread.join(timeout=20)
    assert got and got[0] >= opened
    assert [s.index for s in next(iterator)] == [1]  # and the loader goes on normally


def test_gate_is_used_on_cpu_with_workers_only(tiny_weights: Path, sample_study: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[DecodeGate] = []
    original = inference.DecodeGate

    def recording() -> DecodeGate:
        made.append(original())
        return made[-1]

    monkeypatch.setattr(inference, "DecodeGate", recording)
    items = discover(sample_study).items[:3]
    loaded = load_model(tiny_weights)
    assert len(list(predict(loaded, items, batch_size=2, workers=0))) == 3 and not made
    assert len(list(predict(loaded, items, batch_size=2, workers=1))) == 3 and len(made) == 1


def test_a_worker_killed_while_it_waits_at_the_gate_cannot_stall_the_main_process() -> None:
    """The OOM killer may take a worker as it waits: opening the gate must still return (an Event never did)."""
    gate = DecodeGate()
    shut = gate.closed()
    shut.__enter__()
    gate_r, gate_w = os.pipe()

    def arrive_and_wait() -> None:
        os.write(gate_w, b"a")
        gate.wait()

    worker = multiprocessing.get_context("fork").Process(target=arrive_and_wait)
    worker.start()
    assert select.select([gate_r], [], [], 60)[0], "the worker never reached the gate"
    time.sleep(0.3)
    assert worker.is_alive(), "the worker did not wait at the closed gate"
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    opened = threading.Event()

    def open_gate() -> None:
        shut.__exit__(None, None, None)
        opened.set()

    threading.Thread(target=open_gate, daemon=True).start()
    assert opened.wait(timeout=10), "opening the gate hangs on the dead worker"
    survivor = multiprocessing.get_context("fork").Process(target=gate.wait)
    survivor.start()
    survivor.join(timeout=10)
    assert survivor.exitcode == 0  # the open gate lets the next worker through at once
    gate.close()


def test_gate_stays_shut_until_the_outermost_closed_ends() -> None:
    gate = DecodeGate()
    readable = lambda: bool(select.select([gate._read], [], [], 0)[0])  # noqa: E731  open = a byte waiting
    assert readable()
    with gate.closed():
        with gate.closed():
            assert not readable()
        assert not readable(), "an inner closed() re-opened the gate"
    assert readable()
    gate.close()


def _raised_in(filename: str, exc: BaseException) -> tuple:
    code = compile("raise exc", filename, "exec")
    try:
        exec(code, {"exc": exc})
    except BaseException:
        return sys.exc_info()
    raise AssertionError("not raised")


@pytest.mark.parametrize("filename,exc,reported", [
    (os.path.join("lib", "multiprocessing", "resource_sharer.py"), ConnectionResetError(104, "reset"), False),
    (os.path.join("lib", "multiprocessing", "resource_sharer.py"), EOFError(), False),
    (os.path.join("lib", "multiprocessing", "resource_sharer.py"), ValueError("a bug"), True),
    (os.path.join("lib", "busi_batch", "imageio.py"), ConnectionResetError(104, "reset"), True),
])
def test_worker_hook_silences_only_a_dropped_batch_hand_over(filename: str, exc: BaseException,
                                                             reported: bool) -> None:
    seen: list[type] = []
    inference._quiet_handover_errors(lambda t, e, tb: seen.append(t), *_raised_in(filename, exc))
    assert bool(seen) == reported
