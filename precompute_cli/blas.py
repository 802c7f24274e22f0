"""One OpenBLAS thread per GEMM worker.

The executor already runs one GEMM worker per core; OpenBLAS would by default split each worker's matmul across
every core again, and its threads then wait on each other whenever a writer thread takes a core (measured on 2
cores: Mistral-7B's fold 12.9 s with OpenBLAS's own threads, 11.3 s with one per worker). OpenBLAS 0.3.27+ has a
per-thread setting; numpy does not expose it, so it is called through ctypes on the OpenBLAS numpy loaded.
Elsewhere (another BLAS, another platform) this does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache


@contextmanager
def single_threaded() -> Iterator[None]:
    """Within the block, matmuls called from this thread run on this thread only."""
    setter = _local_setter()
    previous = setter(1) if setter else None
    try:
        yield
    finally:
        if setter and previous is not None and previous > 0:
            setter(previous)


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
