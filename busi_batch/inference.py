"""Batched inference: decoding in DataLoader workers, the forward pass on the chosen device, results in order.

Every entry point (``run``, training's evaluation, the benchmark) feeds :func:`predict`, so they all see the same
decode -> preprocess -> forward path. A file that cannot be decoded travels through the batch as an error and
comes out as a :class:`Prediction` with ``error`` set; it never stops the batch.
"""

from __future__ import annotations

import atexit
import ctypes
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
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.signal_handling import _remove_worker_pids

from .discover import ImageItem
from .errors import ImageDecodeError, UsageError
from .imageio import decode_input, linux_libc, load_truth_mask, read_bytes
from .model import FORWARD_PRECISIONS, LoadedModel
from .preprocess import model_input

log = logging.getLogger("busi_batch")


@dataclass
class DecodedImage:
    """What a worker hands to the main process for one file."""

    index: int
    input_sha256: str
    height: int = 0
    width: int = 0
    tensor: np.ndarray | None = None
    truth_mask: np.ndarray | None = None
    truth_error: str | None = None
    error: str | None = None


@dataclass
class Prediction:
    """The network's raw answer for one image: class probabilities and a low-resolution lesion probability."""

    index: int
    input_sha256: str
    height: int
    width: int
    probabilities: np.ndarray | None = None
    lesion_probability: np.ndarray | None = None
    truth_mask: np.ndarray | None = None
    truth_error: str | None = None
    error: str | None = None


class DecodeGate:
    """Holds the decoding workers back while the network runs on the CPU.

    On a CPU the forward pass already uses every core; workers decoding at the same time pre-empt its threads,
    and the other threads then wait at the next synchronisation point. Measured on 2 cores (bf16, batch 16, 300
    images, ``benchmarks/bench_cpu_choices.py --parts gate``): a run took 5.05 s without the gate, 4.25 s with
    it. With the gate, decoding fills the moments the network is not running (mask writing, waiting for a
    batch) and the two alternate, each with all the cores. Unlike a lower priority for the workers it cannot
    starve them on a machine busy with other work. Not used on a GPU, where the forward pass leaves the CPU free.

    The gate is a pipe that holds one byte while it is open: workers wait until its read end is readable and
    never read, and only the main process writes and takes back the byte. Nothing is locked, so a worker killed
    anywhere (the OOM killer) cannot leave the main process waiting. A ``multiprocessing.Event`` can: its
    ``set()`` waits for every sleeper to wake, and a dead one never does (a run hung for ever that way). The
    workers inherit the pipe, so it needs the ``fork`` start method: :func:`predict` checks.
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
        decoded = DecodedImage(
            index=index, input_sha256=digest, height=image.shape[0], width=image.shape[1], tensor=tensor
        )
        if self.with_truth and item.truth_masks:
            try:
                decoded.truth_mask = load_truth_mask(item.truth_masks, image.shape[:2])
            except ImageDecodeError as err:
                decoded.truth_error = str(err)
        return decoded


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def _collate(samples: list[DecodedImage]) -> tuple[list[DecodedImage], torch.Tensor | None]:
    """Stack the decodable images of a batch in the worker, so the main process only runs the network."""
    tensors = [s.tensor for s in samples if s.tensor is not None]
    stacked = torch.from_numpy(np.stack(tensors)[:, None]) if tensors else None
    for s in samples:
        s.tensor = None
    return samples, stacked


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  AttributeError elsewhere (musl)
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator() -> None:
    """Stop glibc from unmapping and remapping the large activation buffers on every forward pass.

    Measured here: up to 1.3x on the CPU forward pass. Process-wide and idempotent; called when inference
    starts (never on import). A no-op where glibc is not the C library.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve big blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap instead of returning it


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``); a no-op elsewhere.

    With :func:`tune_cpu_allocator`'s settings nothing is ever unmapped, and small long-lived objects (rows,
    strings) allocated between the big activation buffers fragment the heap: its resident size crept up by tens
    of KB per image. Trimming every few seconds keeps memory flat over any study size, at the price of
    re-faulting the buffers once per trim instead of on every forward pass.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


#: ``--precision`` choices: ``auto`` is bf16 where the hardware computes it natively, fp32 elsewhere.
PRECISIONS = ("auto", *FORWARD_PRECISIONS)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions in hardware: a CUDA GPU that supports it, or an x86 CPU with
    AMX or AVX512-BF16 (read from ``/proc/cpuinfo``; elsewhere, False).

    Why not ask oneDNN: PyTorch's own check also says yes on CPUs that only emulate bf16, where it is slower
    than fp32. Measured on this project's Xeon (AMX): the U-Net's forward pass runs about 2.5x faster
    (``busi-batch bench`` with ``--precision fp32`` and with ``auto``).
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def select_precision(name: str, device: torch.device) -> str:
    """Resolve ``--precision``: ``auto`` -> bf16 where :func:`native_bf16`, else fp32; an explicit choice stands."""
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision {name!r}; expected {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


@torch.inference_mode()
def forward_probabilities(
    loaded: LoadedModel, batch: torch.Tensor, tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (B, K) and lesion probabilities (B, S, S) for a normalised batch (B, 1, S, S).

    The class logits are divided by the card's temperature before the softmax. With ``tta`` the horizontally
    flipped image is also run and the probabilities averaged.
    """
    network = loaded.network
    device = next(network.parameters()).device
    use_amp = loaded.precision == "bf16"
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    views = [batch, torch.flip(batch, dims=[3])] if tta else [batch]
    class_probs, lesion_probs = [], []
    for k, view in enumerate(views):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            seg_logits, class_logits = network(view)
        seg = torch.sigmoid(seg_logits.float())[:, 0]
        lesion_probs.append(torch.flip(seg, dims=[2]) if k else seg)
        class_probs.append(torch.softmax(class_logits.float() / loaded.card.temperature, dim=1))
    return torch.stack(class_probs).mean(0), torch.stack(lesion_probs).mean(0)


def _is_handover_error(exc_type: type[BaseException], tb: TracebackType | None) -> bool:
    """A connection error raised in multiprocessing's resource sharer: the thread that hands a batch over."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    return issubclass(exc_type, (OSError, EOFError)) and any(
        f.filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")) for f in frames
    )


def _quiet_handover_errors(
    default: Any, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """A worker's ``sys.excepthook``: silent when the main process dropped a batch hand-over, loud otherwise.

    A worker hands each batch's shared memory over from a thread that reports any error through
    ``sys.excepthook``. When the main process stops mid-hand-over (another worker died, and the run ends with
    its own one-line error), that thread would print a traceback into the run's stderr, which cron mails.
    """
    if not _is_handover_error(exc_type, tb):
        default(exc_type, exc, tb)


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process the moment its parent dies (Linux ``PR_SET_PDEATHSIG``).

    A decoding worker must not outlive its run, however the run ended: without this, the workers of a main process
    killed by SIGKILL or the OOM killer lived on until PyTorch's watchdog noticed, seconds later. If the parent is
    already gone (it died between the fork and this call), the process leaves at once. Elsewhere than on Linux,
    nothing happens (the watchdog stays the only guard). Linux sends the signal when the *thread* that forked the
    worker ends, so :func:`predict` with workers must be iterated by a thread that lives as long as the run (the
    pipeline's main thread; the demo uses no workers).
    """
    libc = linux_libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(worker_id: int, parent: int | None = None) -> None:
    if parent is not None:
        die_with_parent(parent)
    sys.excepthook = functools.partial(_quiet_handover_errors, sys.excepthook)


#: What one decoding worker may take (its share of prefetched batches, decoded images, and its own heap).
WORKER_MEMORY_BYTES = 512 << 20
#: Workers per CPU beyond which more only queue up for the same cores.
WORKERS_PER_CPU = 4


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
    """``--workers`` clamped to :func:`max_workers`, with a warning that says why; a large value would fork until
    the out-of-memory killer ended the run."""
    limit = max_workers()
    if requested > limit:
        log.warning("--workers %d is more than this machine can hold (at most %d here: %d per CPU, %d MiB of "
                    "available memory each); using %d", requested, limit, WORKERS_PER_CPU,
                    WORKER_MEMORY_BYTES >> 20, limit)
        return limit
    return requested


class DecodingWorkerDied(RuntimeError):
    """A decoding worker process ended mid-run (the OOM killer, ``kill -9``): its batches will never come.

    A RuntimeError whose message starts like PyTorch's own report ("DataLoader worker ..."), so that whoever
    recognises that one recognises this one too.
    """


WORKER_DEATH_PATIENCE_S = 15.0
"""After a communication error from the loader, how long to wait for a dying worker to be seen dead."""

_running: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # not yet stopped iterator -> its pid


def _decoded_batches(loader: DataLoader) -> Iterator[tuple[list[DecodedImage], torch.Tensor | None]]:
    """Iterate ``loader``; on every way out (exhausted, closed, any exception) its workers are stopped at once.

    A dead worker becomes :class:`DecodingWorkerDied`, whatever error it first showed up as. Both matter when the
    OOM killer takes a worker:

    * the main process often learns of it by fetching a batch that worker sent: the batch tensor's shared-memory
      file descriptor is handed over by the worker itself, so the fetch fails with ``ConnectionResetError`` (or
      ``ConnectionRefusedError``, ``EOFError``). PyTorch then asks ``is_alive()``, but a killed process closes
      its sockets a moment before it can be reaped, a moment that a loaded machine stretches: PyTorch passes
      the socket error on as it is, and only later its SIGCHLD handler raises its own, wherever the main
      thread happens to be;
    * PyTorch stops the workers when its iterator is garbage collected, and an exception's traceback keeps the
      iterator alive: for an uncaught one (``sys.last_traceback``) until exit, where multiprocessing SIGTERMs
      the workers, which block SIGTERM (``pipeline._stop_signals_blocked``), and joins them without a timeout.
      The process hung for ever.
    """
    iterator = iter(loader)
    workers = list(getattr(iterator, "_workers", ()))
    if workers:
        _running[iterator] = os.getpid()
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as err:
                if not workers:
                    raise
                _unwatch(iterator)  # from here on no worker's end raises asynchronously: we look ourselves
                dying_peer = isinstance(err, (OSError, EOFError, RuntimeError, pickle.UnpicklingError))
                dead = _dead_workers(workers, WORKER_DEATH_PATIENCE_S if dying_peer else 0.0)
                if dead:
                    raise DecodingWorkerDied(_describe_dead(dead)) from err
                raise
            yield batch
    finally:
        _stop_workers(iterator, workers)


def _dead_workers(workers: list[Any], patience: float) -> list[Any]:
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


def _describe_dead(dead: list[Any]) -> str:
    def how(code: int | None) -> str:
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    return "; ".join(f"DataLoader worker pid {w.pid} {how(w.exitcode)}" for w in dead)


def _unwatch(iterator: Any) -> None:
    """Take the workers off PyTorch's SIGCHLD watch, whose handler raises in whatever code the main thread runs."""
    if getattr(iterator, "_worker_pids_set", False):
        iterator._worker_pids_set = False
        _remove_worker_pids(id(iterator))


def _stop_workers(iterator: Any, workers: list[Any], orderly: bool = True) -> None:
    """Stop ``iterator``'s worker processes now, for certain.

    PyTorch's orderly shutdown when every worker is still alive; otherwise none, for it sets an event under a
    lock that the dead worker may have held, and would wait for ever. Any worker still there after that gets
    SIGKILL: SIGTERM, which PyTorch and multiprocessing send, is blocked in these workers.
    """
    if not workers:
        return
    _running.pop(iterator, None)
    try:
        _unwatch(iterator)
        if not getattr(iterator, "_shutdown", True):
            if orderly and all(w.is_alive() for w in workers):
                iterator._shutdown_workers()
            else:
                iterator._shutdown = True  # its __del__ does nothing now
                pin_done = getattr(iterator, "_pin_memory_thread_done_event", None)
                if pin_done is not None:
                    pin_done.set()
                for q in getattr(iterator, "_index_queues", ()):
                    q.cancel_join_thread()
                    q.close()
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
    for iterator, pid in list(_running.items()):
        if pid == os.getpid():  # not in a forked child that exits normally: the workers are not its own
            _stop_workers(iterator, list(getattr(iterator, "_workers", ())), orderly=False)


def predict(
    loaded: LoadedModel,
    items: Sequence[ImageItem],
    batch_size: int = 16,
    workers: int = 0,
    tta: bool = False,
    with_truth: bool = True,
) -> Iterator[Prediction]:
    """Yield one Prediction per item, in the items' order, running the network batch by batch."""
    card = loaded.card
    device = next(loaded.network.parameters()).device
    forking = multiprocessing.get_context().get_start_method() == "fork"  # the context DataLoader's workers use
    gate = DecodeGate() if workers and device.type == "cpu" and forking else None
    dataset = StudyDataset(
        items, card.input_size, card.normalisation["mean"], card.normalisation["std"], with_truth=with_truth,
        gate=gate, geometry=card.input_geometry,
    )
    if device.type == "cpu":
        tune_cpu_allocator()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(_init_worker, parent=os.getpid()) if workers else None,
    )
    batches = _decoded_batches(loader)
    with closing(gate) if gate is not None else nullcontext(), closing(batches):
        # the workers stop when ``batches`` does, however it does; then the gate's pipe is released
        for samples, stacked in batches:
            probs = masks = None
            if stacked is not None:
                with gate.closed() if gate is not None else nullcontext():
                    class_probs, lesion_probs = forward_probabilities(loaded, stacked, tta=tta)
                    probs, masks = class_probs.cpu().numpy(), lesion_probs.cpu().numpy()
            k = 0
            for s in samples:
                pred = Prediction(
                    index=s.index, input_sha256=s.input_sha256, height=s.height, width=s.width,
                    truth_mask=s.truth_mask, truth_error=s.truth_error, error=s.error,
                )
                if s.error is None:
                    pred.probabilities, pred.lesion_probability = probs[k], masks[k]
                    k += 1
                yield pred
