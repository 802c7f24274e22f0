"""Settings of the native libraries under the fold: OpenBLAS's threads and glibc's allocator.

One OpenBLAS thread per GEMM worker: the executor already runs one GEMM worker per core, and OpenBLAS would by
default split each worker's matmul across every core again, its threads then waiting on each other whenever a
writer thread takes a core (measured on 2 cores: Mistral-7B's fold 12.9 s with OpenBLAS's own threads, 11.3 s
with one per worker). OpenBLAS 0.3.27+ has a per-thread setting; numpy does not expose it, so it is called through
ctypes on the OpenBLAS numpy loaded. Elsewhere (another BLAS, another platform) this does nothing.

An allocator that keeps what it frees, while the table is folded: every chunk allocates its arrays anew (tens of
MB each), which glibc serves with fresh mmaps that the kernel must zero, page by page, and unmaps again on free.
Kept in the heap instead, the next chunk reuses the same pages (measured on Pythia-1.4B: 55.0 to 53.3 CPU-seconds,
most of the difference the kernel's page zeroing). Elsewhere (not glibc) this does nothing.

Both are fast paths (portable.py): `portable.plain()` or PRECOMPUTE_PLAIN_IO=1 turns them off.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

from precompute_cli import portable


@contextmanager
def single_threaded() -> Iterator[None]:
    """Within the block, matmuls called from this thread run on this thread only."""
    setter = _local_setter() if portable.fast() else None
    previous = setter(1) if setter else None
    try:
        yield
    finally:
        if setter and previous is not None and previous > 0:
            setter(previous)


# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# What the block restores: mallopt(3)'s documented defaults, fixed values (glibc has no call that reads the
# current ones, and a value read at one conversion's start could be another's setting still in force).
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 << 10, 65536


@contextmanager
def allocator_keeps_memory() -> Iterator[None]:
    """Within the block, large allocations come from the heap and freed memory stays there; afterwards glibc's
    defaults are back and the heap is trimmed, so a long-lived process (the release job) does not keep it."""
    libc = _glibc() if portable.fast() else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


@cache
def _local_setter() -> Callable[[int], int] | None:
    import numpy  # noqa: F401  (loads its OpenBLAS, so that it shows in the process's mappings)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.split()[-1].lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            function = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function
    return None
