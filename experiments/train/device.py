"""The device a run trains on, and the CPU allocator setting the recipes run with.

:func:`resolve_device` turns ``--device`` into a ``torch.device`` or a one-line error.

:func:`retain_freed_memory` keeps freed memory in the process on glibc, so tensors allocated
every step are not page-faulted in.

A training step on the CPU frees and allocates the same large blocks (activations, gradients, new
parameters) every iteration. glibc serves blocks above its mmap threshold (dynamic, at most
32 MiB) with a fresh ``mmap`` and gives them back with ``munmap`` on free, and it trims the top of
the heap past 128 KiB: every step then page-faults its memory in again, which costs as much as a
fifth of a Model C step on the 2-core machine (docs/performance.md). :func:`retain_freed_memory`
tells glibc to serve every block from the heap and never trim it, so a step reuses the pages of
the step before. The price is that the process keeps its peak heap until it exits.

It changes nothing but where memory comes from: results are bit-identical with and without it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

__all__ = ["resolve_device", "retain_freed_memory"]

#: Device types a run may ask for (besides "auto").
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"`` as ``torch.device`` when that device exists.

    Raises ValueError (one line, naming what was expected) for an unknown device or one this
    machine does not have.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ValueError(f"resolve_device: expected auto or one of {', '.join(DEVICE_TYPES)} "
                         f"(with an optional :index), got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"resolve_device: expected an available device, got {device!r} but "
                             "CUDA is not available (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"resolve_device: expected a CUDA index below "
                             f"{torch.cuda.device_count()}, got {device!r}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"resolve_device: expected an available device, got {device!r} but MPS "
                         "is not available (use --device cpu or auto)")
    return dev

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None   # not glibc (musl has no mallopt tuning of this kind)
    return libc


def retain_freed_memory(top_pad_mib: int = 64) -> bool:
    """Ask glibc to keep freed memory: no ``mmap`` per block, no heap trimming.

    ``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` and
    ``mallopt(M_TOP_PAD, top_pad_mib MiB)``. Affects allocations made afterwards in this process.

    Returns True where applied (Linux with glibc), False elsewhere (macOS, Windows, musl), where
    it does nothing.
    """
    if top_pad_mib < 0:
        raise ValueError(f"retain_freed_memory: expected top_pad_mib >= 0, got {top_pad_mib}")
    libc = _libc()
    if libc is None:
        return False
    return (libc.mallopt(M_MMAP_MAX, 0) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
            and libc.mallopt(M_TOP_PAD, top_pad_mib << 20) == 1)
