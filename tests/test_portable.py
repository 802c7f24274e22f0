"""The plain path every platform has, tested here by taking the fast ones away: Windows has no fcntl, no preadv or
pread, no O_DIRECT, no posix_fadvise, no sched_getaffinity and no glibc; the CLI must still start, convert and
inspect, and give the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from precompute_cli import native, portable
from precompute_cli.st_io import read_header

ROOT = Path(__file__).resolve().parent.parent

# Takes away what Windows lacks, in a fresh interpreter, before precompute_cli is imported; then runs the CLI.
WITHOUT_FAST_PATHS = """
import ctypes, os, sys

class NoFcntl:
    def find_spec(self, name, path=None, target=None):
        if name == "fcntl":
            raise ImportError("no fcntl on this platform")

sys.meta_path.insert(0, NoFcntl())
sys.modules.pop("fcntl", None)
for name in ("preadv", "pread", "O_DIRECT", "posix_fadvise", "POSIX_FADV_WILLNEED", "sched_getaffinity"):
    if hasattr(os, name):
        delattr(os, name)

class NoLibrary:
    def __init__(self, *args, **kwargs):
        raise OSError("no such library")

ctypes.CDLL = NoLibrary
from precompute_cli.cli import main
main(sys.argv[1:])
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_FAST_PATHS, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_works_without_any_fast_path():
    run = _run("--help")
    assert run.returncode == 0, run.stderr
    assert "convert" in run.stdout and "inspect" in run.stdout


def test_convert_and_inspect_without_any_fast_path_give_the_same_bytes(tmp_path):
    demo = tmp_path / "demo"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_checkpoint.py"), str(demo)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    run = _run("convert", str(demo), str(plain))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "precompute.table" in read_header(plain / "model.safetensors").tensors
    reference = subprocess.run([sys.executable, "-m", "precompute_cli", "convert", str(demo), str(fast)],
                               capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert reference.returncode == 0, reference.stderr[-3000:]
    for path in sorted(fast.iterdir()):
        assert (plain / path.name).read_bytes() == path.read_bytes(), path.name
    inspected = _run("inspect", "--check", str(plain))
    assert inspected.returncode == 0, inspected.stderr


@pytest.mark.parametrize("offset,size", [(0, 0), (0, 10), (5, 4096), (100_000, 50_000), (190_000, 20_000)])
def test_plain_reads_give_the_bytes_preadv_gives(tmp_path, offset, size):
    data = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = data[offset:offset + size]
    for mode in ("fast", "plain"):
        buffer = bytearray(size)
        fd = portable.open_read(path)
        try:
            if mode == "plain":
                with portable.plain():
                    got = portable.read_into(fd, memoryview(buffer), offset)
            else:
                got = portable.read_into(fd, memoryview(buffer), offset)
        finally:
            os.close(fd)
        assert got == len(expected), mode  # fewer only past the end of the file
        assert bytes(buffer[:got]) == expected, mode


def test_the_switch_turns_every_fast_path_off_and_back_on():
    assert portable.fast()
    with portable.plain():
        assert not portable.fast() and portable.o_direct() == 0
    assert portable.fast()
    code = "from precompute_cli import portable; assert not portable.fast() and not portable.o_direct()"
    env = {**os.environ, "PRECOMPUTE_PLAIN_IO": "1"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_the_allocator_is_left_alone_on_the_plain_path():
    """Under plain(), a large block is its own mmap as glibc does by default: no mallopt was called."""
    libc = native._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc 2.33+")
    from test_native import BLOCK, MallInfo2

    libc.mallinfo2.restype = MallInfo2
    with portable.plain(), native.allocator_keeps_memory():
        mapped = libc.mallinfo2().hblkhd
        block = np.empty(BLOCK, dtype=np.uint8)
        assert libc.mallinfo2().hblkhd >= mapped + BLOCK
        del block


def test_process_alive():
    assert portable.process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not portable.process_alive(child.pid)


def test_fsync_path_takes_files_and_folders(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    portable.fsync_path(tmp_path / "f")
    portable.fsync_path(tmp_path)
