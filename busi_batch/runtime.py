"""Where and how a run computes: the device, the forward pass's precision, and the C allocator's settings.

Nothing here acts on import. Whoever starts a run calls :func:`select_device` and :func:`select_precision` to
resolve the options, and inference calls :func:`tune_cpu_allocator` when it starts on a CPU.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .errors import UsageError
from .model import FORWARD_PRECISIONS

#: ``--precision`` choices: ``auto`` is bf16 where the hardware computes it natively, fp32 elsewhere.
PRECISIONS = ("auto", *FORWARD_PRECISIONS)


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


def select_precision(name: str, device: torch.device) -> str:
    """Resolve ``--precision``: ``auto`` -> bf16 where :func:`native_bf16`, else fp32; an explicit choice stands."""
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision {name!r}; expected {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions in hardware: a CUDA GPU that supports it, or an x86 CPU with
    AMX or AVX512-BF16 (read from ``/proc/cpuinfo``; elsewhere, False).

    PyTorch's own check (oneDNN's) also says yes on CPUs that only emulate bf16, where it is slower than fp32.
    Where it is native the U-Net's forward pass runs about 2.5x faster (``busi-batch bench`` with ``--precision
    fp32`` and with ``auto``).
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
    """Keep the forward pass's large activation buffers in the heap instead of unmapping and remapping them on
    every pass (up to 1.3x on the CPU forward pass).

    Process-wide and idempotent; called when inference starts, never on import. A no-op where glibc is not the C
    library.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve big blocks from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap instead of returning it


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``); a no-op elsewhere.

    Under :func:`tune_cpu_allocator`'s settings nothing is unmapped, and small long-lived objects allocated between
    the big buffers fragment the heap; a run calls this every few seconds so that its memory stays flat over any
    study size, at the price of re-faulting the buffers once per call.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
