"""The allocator setting the fold runs under: large blocks from the heap and kept there, then glibc's defaults."""

import ctypes

import numpy as np
import pytest

from precompute_cli import native

BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MB): by default always a fresh mmap


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.fixture
def mallinfo():
    libc = native._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc 2.33+")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


def test_large_blocks_come_from_the_heap_and_stay_there_while_folding(mallinfo):
    with native.allocator_keeps_memory():
        mapped = mallinfo().hblkhd
        block = np.empty(BLOCK, dtype=np.uint8)
        block.fill(1)
        assert mallinfo().hblkhd == mapped  # not an mmap of its own
        del block
        assert mallinfo().fordblks >= BLOCK  # freed into the heap, ready for the next chunk
    assert mallinfo().fordblks < BLOCK  # trimmed on the way out


def test_defaults_are_back_after_the_block(mallinfo):
    with native.allocator_keeps_memory():
        pass
    mapped = mallinfo().hblkhd
    block = np.empty(BLOCK, dtype=np.uint8)
    assert mallinfo().hblkhd >= mapped + BLOCK
    del block
