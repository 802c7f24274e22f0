"""The operating system's fast paths where it has them, and the plain path everywhere else.

Linux has positional vectored reads (os.preadv: straight into a numpy buffer, any thread, no seek), O_DIRECT
writes, page-cache hints and glibc's allocator settings; macOS has preadv but not O_DIRECT; Windows has none of
them, and opens files as text unless told otherwise. The plain path (seek and read into the buffer, buffered
writes, no allocator tuning) works on every platform and gives the same bytes; it is what Windows always runs.

`PRECOMPUTE_PLAIN_IO=1` in the environment, or `plain()` in a test, turns every fast path off on any platform, so
the plain path is tested on Linux too (tests/test_portable.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: without it os.open reads and writes text (\r\n, ^Z)
WINDOWS = os.name == "nt"

_fast = os.environ.get("PRECOMPUTE_PLAIN_IO", "") in ("", "0")


def fast() -> bool:
    """Whether fast paths may be used at all (the platform must still have each one)."""
    return _fast


@contextmanager
def plain() -> Iterator[None]:
    """Within the block, every fast path is off, as on a platform that has none of them."""
    global _fast
    previous, _fast = _fast, False
    try:
        yield
    finally:
        _fast = previous


def o_direct() -> int:
    """The O_DIRECT flag where it exists and fast paths are on, else 0."""
    return getattr(os, "O_DIRECT", 0) if _fast else 0


def open_read(path: Path) -> int:
    """A file descriptor for reading bytes (binary on Windows too)."""
    return os.open(path, os.O_RDONLY | O_BINARY)


def read_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Read up to len(buffer) bytes of `fd` from `offset` into `buffer`; returns how many (fewer only at the end
    of the file). preadv reads straight into the buffer without moving the file position; the plain path seeks
    and reads, so a descriptor must then not be shared between threads (each caller opens its own)."""
    if _fast and hasattr(os, "preadv"):
        done = 0
        while done < len(buffer):
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got <= 0:
                break
            done += got
        return done
    os.lseek(fd, offset, os.SEEK_SET)
    done = 0
    while done < len(buffer):
        chunk = os.read(fd, min(len(buffer) - done, 16 << 20))
        if not chunk:
            break
        buffer[done:done + len(chunk)] = chunk
        done += len(chunk)
    return done


def fsync_path(path: Path) -> None:
    """Make a file's data, or a folder's entries, durable. Windows cannot open a folder to flush it (NTFS journals
    its entries itself) and flushes a file only through a handle that may write."""
    if WINDOWS:
        if Path(path).is_dir():
            return
        fd = os.open(path, os.O_RDWR | O_BINARY)
    else:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists. Not os.kill(pid, 0) on Windows: there signal 0 is CTRL_C_EVENT."""
    if WINDOWS:
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists, it is someone else's
        try:
            code = ctypes.c_ulong()
            ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return not ok or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock(fd: int, wait: bool = True) -> bool:
    """An exclusive lock on an open file or folder, released when `fd` is closed; False if another process holds
    it and `wait` is false. flock where the platform has it (a process killed outright holds it no more); on Windows,
    msvcrt locks a regular file's first byte, and a folder goes unlocked (the callers' renames check for themselves)."""
    try:
        import fcntl
    except ImportError:
        return _lock_msvcrt(fd, wait)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _lock_msvcrt(fd: int, wait: bool) -> bool:
    try:
        import msvcrt
    except ImportError:  # neither flock nor msvcrt: nothing to lock with
        return True
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
    except PermissionError:  # a folder, or a file system without locks
        return True
    except OSError:
        return False
    return True
