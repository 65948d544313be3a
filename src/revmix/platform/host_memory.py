"""Host memory that glibc's allocator keeps after a CPU step frees its tensors, and the switch that gives
it back (``runtime.release_host_memory``).

Most of what a long-row CPU step adds to a process's resident memory is not tensors. PyTorch's CPU
tensors come from ``malloc``; glibc serves a block from its heap when the block is under its *dynamic*
mmap threshold, which rises to the size of each mapped block freed (up to 32 MiB on 64-bit). After the
first few frees every activation under 32 MiB is on the heap, and a step's stream of blocks — MiBs to
tens of MiBs, freed in backward in another order than forward allocated them, small long-lived ones
(the kept layer inputs, the saved statistics) landing in the holes of big ones — fragments it: freed space
no later request fits stays resident, and the heap grows past the live tensors. Measured with
``mallinfo2`` in the step of ``benchmarks/memory_scaling.py`` (30M ``base`` model + LoRA, SFT, rows of
4,096 and 35 tokens, activation checkpointing + chunked log-probs): 0.32 GiB of live blocks at the peak,
1.83 GiB held by the heap.

Fixing the threshold at glibc's initial 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
dynamic rule off) gives every block of 128 KiB or more its own mapping, unmapped when freed: the peak
resident memory is then the live tensors' (0.34 GiB extra in that step instead of 1.84). The price is a
page fault on every 4 KiB page of every such block the next time one is allocated, paid as system time:
about 40% more CPU time per step there, 30-60% more at 16 rows of at most 512 tokens without checkpointing
(KVM EPYC). So ``auto`` releases only where the run has already traded compute for memory: activation
checkpointing on, training on CPU (on a GPU the activations are not in host memory).

The setting is process-wide: :func:`released_host_memory` applies it for one stage and, on exit, fixes
the threshold at 32 MiB, the ceiling of the dynamic rule (glibc cannot return to the rule itself).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
RELEASE_THRESHOLD = 128 * 1024  # glibc's initial mmap threshold (DEFAULT_MMAP_THRESHOLD_MIN)
HOLD_THRESHOLD = 32 * 1024 * 1024  # the dynamic threshold's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
CHOICES = ("auto", "on", "off")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


@functools.cache
def glibc() -> Any | None:
    """This process's C library when it is glibc (it has ``mallopt``), else None (macOS, musl)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _Mallinfo2
    return libc


def heap_bytes() -> dict[str, int] | None:
    """glibc's own count of its blocks (``mallinfo2``, all arenas): ``in_use`` (heap blocks in use plus
    mapped blocks), ``held`` (heap size plus mapped blocks), ``free`` (held by the heap, not in use) and
    ``mapped`` (blocks with their own mapping); None without glibc 2.33+."""
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    m = libc.mallinfo2()
    return {
        "in_use": m.uordblks + m.hblkhd,
        "held": m.arena + m.hblkhd,
        "free": m.fordblks,
        "mapped": m.hblkhd,
    }


def release_wanted(setting: str, device_type: str, checkpointing: bool) -> bool:
    """``runtime.release_host_memory`` resolved: ``on``, ``off``, or ``auto`` = on when training on CPU
    with activation checkpointing on (and the C library is glibc). ``on`` without glibc is an error."""
    if setting not in CHOICES:
        raise ValueError(f"unknown release_host_memory {setting!r}; valid: {', '.join(CHOICES)}")
    if setting == "auto":
        return device_type == "cpu" and checkpointing and glibc() is not None
    if setting == "on" and glibc() is None:
        raise RuntimeError(
            "runtime.release_host_memory=on sets glibc's malloc threshold, and this process's C library is not "
            "glibc; set it to auto or off"
        )
    return setting == "on"


@contextmanager
def released_host_memory(on: bool) -> Iterator[bool]:
    """Within: every freed block of 128 KiB or more goes back to the kernel at once (glibc's mmap threshold
    fixed at 128 KiB). On exit the threshold is fixed at 32 MiB, the dynamic rule's ceiling. Yields
    ``on``; does nothing when ``on`` is False."""
    if not on:
        yield False
        return
    libc = glibc()
    if libc is None:
        raise RuntimeError("released_host_memory needs glibc's malloc; this process's C library is not glibc")
    if libc.mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD) != 1:
        raise OSError(f"mallopt(M_MMAP_THRESHOLD, {RELEASE_THRESHOLD}) failed")
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, HOLD_THRESHOLD)
