"""Putting a finished staging folder in OUT's place as one atomic step, so that racing conversions lose nothing.

Without --overwrite the commit is a plain rename(2), which the kernel refuses when OUT has meanwhile appeared with
anything in it: the check and the commit are the same system call. With --overwrite, Linux swaps the two folders
in one call (renameat2 with RENAME_EXCHANGE), so a reader never finds OUT missing; where that call does not exist
(other systems, file systems without it) the old OUT is renamed aside and the new one renamed in. Every commit holds
an exclusive lock on OUT's parent folder, so two conversions never interleave their renames.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from precompute_cli.errors import InputError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)
_OCCUPIED = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def exists_error(out: Path) -> InputError:
    """The refusal of a non-empty OUT, before converting and when another run filled it meanwhile."""
    return InputError(f"{out}: already exists and is not empty (use --overwrite to replace it)")


def commit(tmp: Path, out: Path, overwrite: bool) -> Path | None:
    """Make the finished folder `tmp` OUT; returns where the replaced OUT now is (for the caller to delete), or None.

    Without `overwrite`, an OUT that is there with anything in it is refused (InputError) and `tmp` stays put."""
    with _locked(out.parent):
        if not overwrite:
            try:
                os.rename(tmp, out)
            except OSError as exc:
                if exc.errno in _OCCUPIED:
                    raise exists_error(out) from None
                raise
            return None
        while True:
            try:
                if _exchange(tmp, out):
                    return tmp  # the two names swapped: the old OUT is now where the staging folder was
                return _swap(tmp, out)
            except FileNotFoundError:  # no OUT to replace; it may appear before the rename, hence the loop
                try:
                    os.rename(tmp, out)
                    return None
                except OSError as exc:
                    if exc.errno not in _OCCUPIED:
                        raise


def _swap(tmp: Path, out: Path) -> Path:
    """Two renames, under the caller's lock: a reader can find OUT missing between them."""
    old = out.parent / f".{out.name}.precompute-old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where this system or file system cannot (FileNotFoundError if one is
    missing)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (2.28 and later); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (it leaves no file behind). A file system that has no locks (some
    network mounts), or a folder this user may write but not list, is committed to without one: the renames' own
    checks still hold there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
