"""The decoding side: the gate that keeps decoding workers off the cores the network uses, the workers' error
hook, and the private PyTorch state the loader relies on."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from multiprocessing import resource_sharer
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from busi_batch import loader
from busi_batch.discover import discover
from busi_batch.errors import DecodingWorkerDied
from busi_batch.loader import DecodeGate, StudyDataset


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
    data = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda s: s)
    got: list[float] = []
    with gate.closed():
        iterator = iter(data)  # the worker starts and asks for its first item while the gate is shut

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
    loader._quiet_handover_errors(lambda t, e, tb: seen.append(t), *_raised_in(filename, exc))
    assert bool(seen) == reported


def test_torch_internals_the_loader_relies_on() -> None:
    """Against the installed torch (the pyproject allows torch>=2.2,<2.15): everything the loader's internals
    section uses of PyTorch's private DataLoader state, and the file name of multiprocessing's resource sharer."""
    data = DataLoader(list(range(8)), batch_size=2, num_workers=2)
    running = loader._TorchIterator(iter(data))
    workers = running.workers
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    assert next(running.iterator).tolist() == [0, 1]

    loader._report_worker_deaths_as_errors()  # on top of PyTorch's SIGCHLD handler, which raises in this thread
    os.kill(workers[0].pid, signal.SIGKILL)
    with pytest.raises(DecodingWorkerDied, match=rf"DataLoader worker \(pid {workers[0].pid}\)"):
        for _ in range(600):
            time.sleep(0.05)
    running.unwatch()
    assert not running.iterator._worker_pids_set
    running.shut_down(orderly=False)
    assert running.iterator._shutdown and workers[1].is_alive()  # marked shut down, nothing waited for
    loader._stop_workers(running)
    assert not any(w.is_alive() for w in workers)

    orderly = loader._TorchIterator(iter(data))
    orderly.shut_down(orderly=True)
    assert not any(w.is_alive() for w in orderly.workers) and not orderly.iterator._worker_pids_set

    assert resource_sharer.__file__.endswith(os.path.join("multiprocessing", "resource_sharer.py"))
