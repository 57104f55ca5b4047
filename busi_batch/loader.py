"""Decoding a study in worker processes: the Dataset, collation, the decode gate, and the workers' whole life.

:class:`StudyLoader` yields :class:`DecodedBatch` records in the items' order. A file that cannot be decoded
travels through its batch as a :class:`DecodedImage` with ``error`` set; it never stops the batch.

The workers' life, however a run ends:

* they are forked with SIGTERM and SIGINT blocked (:func:`stop_signals_blocked`), so a signal sent to the whole
  process group reaches the main process only, which decides how to stop;
* each dies with the thread that forked it (:func:`die_with_parent`);
* on every way out of the iteration (exhausted, closed, any exception) they are stopped at once, and any still
  there at interpreter exit is killed (:func:`_stop_abandoned_workers`);
* a worker that dies mid-run is reported as :class:`DecodingWorkerDied`, whatever the error it first shows up as.

Every use of PyTorch's private DataLoader state sits in one section at the end of this module.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401  its exit handler is registered before ours, so ours runs first
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .discover import ImageItem
from .errors import DecodingWorkerDied, ImageDecodeError
from .imageio import decode_input, linux_libc, load_truth_mask, read_bytes
from .model import ModelCard
from .preprocess import model_input

logger = logging.getLogger(__name__)

#: What one decoding worker may take (its share of prefetched batches, decoded images, and its own heap).
WORKER_MEMORY_BYTES = 512 << 20
#: Workers per CPU beyond which more only queue up for the same cores.
WORKERS_PER_CPU = 4
#: After a communication error from the loader, how long to wait for a dying worker to be seen dead.
WORKER_DEATH_PATIENCE_S = 15.0


@dataclass(frozen=True)
class DecodedImage:
    """What a worker hands to the main process for one file: its pixels at model size (``tensor``, taken out
    again by :func:`collate_decoded`), its native size, and its ground-truth mask at that size when asked for."""

    index: int
    input_sha256: str
    height: int = 0
    width: int = 0
    tensor: np.ndarray | None = None
    truth_mask: np.ndarray | None = None
    truth_error: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class DecodedBatch:
    """One batch of consecutive items: every sample in order, and the model inputs of the decodable ones stacked
    (N, 1, S, S) in the same order, or None when none is."""

    samples: tuple[DecodedImage, ...]
    stacked: torch.Tensor | None

    def pin_memory(self) -> DecodedBatch:
        """The batch with its tensor in page-locked memory (the DataLoader calls this with ``pin_memory=True``)."""
        return self if self.stacked is None else dataclasses.replace(self, stacked=self.stacked.pin_memory())


class DecodeGate:
    """Holds the decoding workers back while the network runs on the CPU.

    On a CPU the forward pass already uses every core, and workers decoding meanwhile pre-empt its threads. With
    the gate, decoding fills the moments the network is not running (mask writing, waiting for a batch) and the
    two alternate, each with all the cores (``benchmarks/bench_cpu_choices.py --parts gate``). Unlike a lower
    priority for the workers it cannot starve them on a machine busy with other work. Not used on a GPU, where
    the forward pass leaves the CPU free.

    The gate is a pipe that holds one byte while it is open: workers wait until its read end is readable and
    never read, and only the main process writes and takes back the byte. Nothing is locked, so a worker killed
    anywhere cannot leave the main process waiting. The workers inherit the pipe, so it needs the ``fork`` start
    method (:class:`StudyLoader` checks).
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.write(self._write, b"o")
        self._open = True
        self._parent = os.getpid()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """Shut for the duration of a forward pass (re-opened however it ends, by whoever shut it)."""
        if not self._open:  # already shut by an enclosing ``closed()``: that one re-opens it
            yield
            return
        os.read(self._read, 1)  # the byte this process wrote: returns at once
        self._open = False
        try:
            yield
        finally:
            os.write(self._write, b"o")
            self._open = True

    def wait(self) -> None:
        """In a worker: return once the gate is open; leave if the main process is gone (never wait for ever)."""
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        while not poller.poll(1000):
            if os.getppid() != self._parent:
                raise SystemExit(1)

    def close(self) -> None:
        """Release the pipe (workers that still hold it keep their own copies)."""
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class StudyDataset(Dataset):
    """Decodes one item: its pixels at model size and, when present, its ground-truth mask at native size."""

    def __init__(
        self, items: Sequence[ImageItem], size: int, mean: float, std: float, with_truth: bool = True,
        gate: DecodeGate | None = None,
        geometry: str = "squash",
    ):
        self.items = list(items)
        self.size, self.mean, self.std, self.geometry = size, mean, std, geometry
        self.with_truth = with_truth
        self.gate = gate

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> DecodedImage:
        if self.gate is not None:
            self.gate.wait()
        item = self.items[index]
        try:
            data = read_bytes(item.path)
        except ImageDecodeError as err:
            return DecodedImage(index=index, input_sha256="", error=str(err))
        digest = hashlib.sha256(data).hexdigest()
        try:
            image = decode_input(data, item.frame)  # a DICOM file's own frame; any other image as it is
            tensor = model_input(image, self.size, self.mean, self.std, self.geometry)
        except ImageDecodeError as err:
            return DecodedImage(index=index, input_sha256=digest, error=str(err))
        except (ValueError, MemoryError, Exception) as err:  # cv2.error and friends: one bad file, not a crash
            return DecodedImage(index=index, input_sha256=digest, error=f"cannot decode image: {_one_line(err)}")
        truth_mask = truth_error = None
        if self.with_truth and item.truth_masks:
            try:
                truth_mask = load_truth_mask(item.truth_masks, image.shape[:2])
            except ImageDecodeError as err:
                truth_error = str(err)
        return DecodedImage(
            index=index, input_sha256=digest, height=image.shape[0], width=image.shape[1], tensor=tensor,
            truth_mask=truth_mask, truth_error=truth_error,
        )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def collate_decoded(samples: list[DecodedImage]) -> DecodedBatch:
    """Stack the decodable images of a batch in the worker, so the main process only runs the network."""
    tensors = [s.tensor for s in samples if s.tensor is not None]
    stacked = torch.from_numpy(np.stack(tensors)[:, None]) if tensors else None
    return DecodedBatch(tuple(dataclasses.replace(s, tensor=None) for s in samples), stacked)


# ------------------------------------------------------------------------------------------------ worker count


def max_workers() -> int:
    """The most decoding workers this machine can hold: by CPUs and by the memory available now."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = WORKERS_PER_CPU * cpus
    available = _available_memory()
    if available is not None:
        limit = min(limit, available // WORKER_MEMORY_BYTES)
    return max(1, int(limit))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_count(requested: int) -> int:
    """``--workers`` clamped to :func:`max_workers`, with a warning that says why (each worker takes memory, and
    too many end in the out-of-memory killer)."""
    limit = max_workers()
    if requested > limit:
        logger.warning("--workers %d is more than this machine can hold (at most %d here: %d per CPU, %d MiB of "
                       "available memory each); using %d", requested, limit, WORKERS_PER_CPU,
                       WORKER_MEMORY_BYTES >> 20, limit)
        return limit
    return requested


# ------------------------------------------------------------------------------------------------ worker side


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process the moment its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A decoding worker never outlives its run, however the run ended. If the parent is already gone (it died between
    the fork and this call), the process leaves at once. Elsewhere than on Linux nothing happens (PyTorch's
    watchdog stays the only guard). Linux sends the signal when the *thread* that forked the worker ends, so a
    :class:`StudyLoader` with workers must be iterated by a thread that lives as long as the run.
    """
    libc = linux_libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _quiet_handover_errors(
    default: Any, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """A worker's ``sys.excepthook``: silent when the main process dropped a batch hand-over, loud otherwise.

    A worker hands each batch's shared memory over from a thread that reports any error through
    ``sys.excepthook``. When the main process stops mid-hand-over (it ends the run with its own one-line error),
    that report would only be a traceback in the run's stderr.
    """
    if not _is_handover_error(exc_type, tb):
        default(exc_type, exc, tb)


def _init_worker(worker_id: int, parent: int | None = None) -> None:
    if parent is not None:
        die_with_parent(parent)
    sys.excepthook = functools.partial(_quiet_handover_errors, sys.excepthook)


# ------------------------------------------------------------------------------------------------ main side


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM / SIGINT in this thread meanwhile: workers forked now inherit the mask.

    A signal sent to the process group then reaches the main process only, and does not kill a worker mid-batch.
    A signal that arrives meanwhile is only deferred: it is delivered to the main process when the mask is
    restored. (Fork start method only; under another one a worker the signal reaches dies, and the run sees
    :class:`DecodingWorkerDied`.) Outside the main thread, nothing is blocked.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StudyLoader:
    """The decoded batches of ``items``, ``batch_size`` consecutive items each, in order.

    With ``workers`` the items are decoded in that many processes, started when iteration starts, by the thread
    that iterates (it must live as long as the iteration, see :func:`die_with_parent`). Iterate once; close it
    (``contextlib.closing``) however the iteration ends: the workers stop at once, then the gate is released.
    Hold :meth:`network_running` during each forward pass: on a CPU it keeps the workers from decoding meanwhile
    (:class:`DecodeGate`).
    """

    def __init__(
        self, items: Sequence[ImageItem], card: ModelCard, *, batch_size: int, workers: int, device: torch.device,
        with_truth: bool = True,
    ) -> None:
        forking = multiprocessing.get_context().get_start_method() == "fork"  # the context DataLoader's workers use
        self._gate = DecodeGate() if workers and device.type == "cpu" and forking else None
        dataset = StudyDataset(
            items, card.input_size, card.normalisation["mean"], card.normalisation["std"], with_truth=with_truth,
            gate=self._gate, geometry=card.input_geometry,
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_decoded,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            worker_init_fn=functools.partial(_init_worker, parent=os.getpid()) if workers else None,
        )
        self._batches = _decoded_batches(loader)

    def __iter__(self) -> Iterator[DecodedBatch]:
        return self._batches

    def network_running(self) -> AbstractContextManager[None]:
        """Around a forward pass: the gate shut, or nothing where there is no gate."""
        return self._gate.closed() if self._gate is not None else nullcontext()

    def close(self) -> None:
        """Stop the workers now (a no-op once they have stopped), then release the gate's pipe."""
        try:
            self._batches.close()
        finally:
            if self._gate is not None:
                self._gate.close()


_running: weakref.WeakKeyDictionary[_TorchIterator, int] = weakref.WeakKeyDictionary()  # not yet stopped -> pid


def _decoded_batches(loader: DataLoader) -> Iterator[DecodedBatch]:
    """Iterate ``loader``; on every way out (exhausted, closed, any exception) its workers are stopped at once.

    A dead worker becomes :class:`DecodingWorkerDied`, whatever error it first showed up as: the main process
    often learns of it by fetching a batch that worker sent, whose shared memory the worker itself hands over, so
    the fetch fails with a connection error (``ConnectionResetError``, ``EOFError``, ...) a moment before the
    worker can be seen dead. Stopping the workers here, not when PyTorch's iterator is garbage collected, matters
    because an exception's traceback keeps that iterator alive, up to interpreter exit for an uncaught one.
    """
    with stop_signals_blocked() if loader.num_workers else nullcontext():
        running = _TorchIterator(iter(loader))  # the workers are forked here
    workers = running.workers
    if workers:
        _running[running] = os.getpid()
        _report_worker_deaths_as_errors()
    try:
        while True:
            try:
                batch = next(running.iterator)
            except StopIteration:
                return
            except Exception as err:
                if not workers:
                    raise
                running.unwatch()  # from here on no worker's end raises asynchronously: we look ourselves
                dying_peer = isinstance(err, (OSError, EOFError, RuntimeError, pickle.UnpicklingError))
                dead = _dead_workers(workers, WORKER_DEATH_PATIENCE_S if dying_peer else 0.0)
                if dead:
                    raise DecodingWorkerDied(_describe_dead(dead)) from err
                raise
            yield batch
    finally:
        _stop_workers(running)


def _dead_workers(workers: list[BaseProcess], patience: float) -> list[BaseProcess]:
    """The workers that have ended, waiting up to ``patience`` seconds for one to (it may be dying still)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            dead = [w for w in workers if not w.is_alive()]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.02)
        except RuntimeError:  # PyTorch's SIGCHLD handler reporting this very death here: look again
            if time.monotonic() >= deadline:
                raise


def _describe_dead(dead: list[BaseProcess]) -> str:
    def how(code: int | None) -> str:
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    return "; ".join(f"DataLoader worker pid {w.pid} {how(w.exitcode)}" for w in dead)


def _stop_workers(running: _TorchIterator, orderly: bool = True) -> None:
    """Stop ``running``'s worker processes now, for certain.

    PyTorch's orderly shutdown when every worker is still alive; otherwise none (it sets an event under a lock that
    a dead worker may have held). Any worker still there after that gets SIGKILL: SIGTERM, which PyTorch and
    multiprocessing send, is blocked in these workers.
    """
    workers = running.workers
    if not workers:
        return
    _running.pop(running, None)
    try:
        running.unwatch()
        running.shut_down(orderly=orderly and all(w.is_alive() for w in workers))
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(timeout=10)


@atexit.register
def _stop_abandoned_workers() -> None:
    """At exit, stop the workers of an iteration that nobody finished or closed (kept alive by a traceback, say).

    Registered after multiprocessing's exit handler, so it runs before it: that one would SIGTERM them, which
    they block, and then wait for them without a timeout.
    """
    for running, pid in list(_running.items()):
        if pid == os.getpid():  # not in a forked child that exits normally: the workers are not its own
            _stop_workers(running, orderly=False)


# ------------------------------------------------------------------------------------------------ internals
# The only code that reaches into private state: PyTorch's multiprocessing DataLoader iterator
# (``torch.utils.data.dataloader._MultiProcessingDataLoaderIter``), the SIGCHLD watch PyTorch installs for it
# (``torch.utils.data._utils.signal_handling``), and the file name of multiprocessing's resource sharer. The
# pyproject allows torch>=2.2,<2.15; ``tests/test_loader.py::test_torch_internals_the_loader_relies_on`` checks
# all of it against the installed torch.


class _TorchIterator:
    """PyTorch's iterator over a DataLoader, and what the loader needs of its private state."""

    def __init__(self, iterator: Any) -> None:
        self.iterator = iterator
        #: The worker processes; empty for a loader without workers.
        self.workers: list[BaseProcess] = list(getattr(iterator, "_workers", ()))

    def unwatch(self) -> None:
        """Take the workers off PyTorch's SIGCHLD watch, whose handler raises in whatever code the main thread
        runs."""
        from torch.utils.data._utils.signal_handling import _remove_worker_pids

        if getattr(self.iterator, "_worker_pids_set", False):
            self.iterator._worker_pids_set = False
            _remove_worker_pids(id(self.iterator))

    def shut_down(self, orderly: bool) -> None:
        """PyTorch's orderly shutdown of the workers; or, not ``orderly``, none: the iterator is only marked shut
        down (its ``__del__`` does nothing then) and its queues closed without waiting for any process."""
        iterator = self.iterator
        if getattr(iterator, "_shutdown", True):
            return
        if orderly:
            iterator._shutdown_workers()
            return
        iterator._shutdown = True
        pin_done = getattr(iterator, "_pin_memory_thread_done_event", None)
        if pin_done is not None:
            pin_done.set()
        for q in getattr(iterator, "_index_queues", ()):
            q.cancel_join_thread()
            q.close()


def _report_worker_deaths_as_errors() -> None:
    """Have PyTorch's SIGCHLD handler report a dead worker as :class:`DecodingWorkerDied` (its own text kept).

    PyTorch installs that handler, once per process, in the main thread when a DataLoader starts workers; it raises
    a RuntimeError wherever the main thread then is. Ours goes on top of it, once (idempotent).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if callable(current) and getattr(current, "func", None) is not _worker_death_as_error:
        signal.signal(signal.SIGCHLD, functools.partial(_worker_death_as_error, current))


def _worker_death_as_error(torch_handler: Any, signum: int, frame: Any) -> None:
    try:
        torch_handler(signum, frame)
    except DecodingWorkerDied:
        raise
    except RuntimeError as err:
        raise DecodingWorkerDied(str(err)) from err


def _is_handover_error(exc_type: type[BaseException], tb: TracebackType | None) -> bool:
    """A connection error raised in multiprocessing's resource sharer: the thread that hands a batch over."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    return issubclass(exc_type, (OSError, EOFError)) and any(
        f.filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")) for f in frames
    )
