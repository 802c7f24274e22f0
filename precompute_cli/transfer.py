"""The executor's second thread: every byte that does not pass through the GEMM, and the sha256 of every shard.

While the main thread builds the table, this thread copies (or hard-links) whole unchanged shards, copies the
kept tensors of the other shards as byte ranges inside the kernel, and then hashes each output file. The table's
bytes are hashed by reading them back just behind the main thread, which reports how far it has written
(`TableProgress`), so hashing costs neither a second pass after the GEMM nor memory for the table.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from precompute_cli.plan import ShardPlan
from precompute_cli.st_io import ShardWriter, TensorInfo, copy_range

BLOCK = 16 << 20  # bytes per copy and hash step: the cancellation granularity and the read buffer
FLUSH_EVERY = 256 << 20  # the table's file is flushed as it is hashed, so the final fsync has little left


class Stopped(Exception):
    """The main thread gave up (an error or a signal): the copy thread stops at its next step."""


class TableProgress:
    """How many leading bytes of the table are on disk; the hashing thread waits on it and reads behind it."""

    def __init__(self) -> None:
        self._done = 0
        self._stopped = False
        self._cond = threading.Condition()
        self.failed = False  # set by the copy thread when it raises, so the GEMM loop can stop early

    def advance(self, nbytes: int) -> None:
        with self._cond:
            self._done = nbytes
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def check(self) -> None:
        if self._stopped:
            raise Stopped

    def wait_for(self, nbytes: int) -> None:
        with self._cond:
            while self._done < nbytes:
                if self._stopped:
                    raise Stopped
                self._cond.wait()


@dataclass(frozen=True)
class ShardJob:
    shard: ShardPlan
    path: Path  # the output file
    writer: ShardWriter | None  # None: the source file is copied (or linked) whole
    table: tuple[int, int] | None = None  # [start, stop) bytes of the table in the output file


def move_and_hash(jobs: list[ShardJob], link: bool, table: TableProgress) -> dict[str, str]:
    """Write every shard's non-table bytes, then return {file name: sha256} (the table's file last)."""
    try:
        for job in jobs:
            if job.writer is None:
                place_whole(job.shard.source, job.path, link, table)
            else:
                copy_kept(job.shard, job.writer, table)
                if job.table is None:
                    os.fsync(job.writer.fd)  # here, beside the GEMM, rather than at close
        return {job.path.name: hash_file(job.path, job.table, table)
                for job in sorted(jobs, key=lambda j: j.table is not None)}
    except BaseException:
        table.failed = True
        raise


def place_whole(src: Path, dst: Path, link: bool, table: TableProgress) -> None:
    """Hard-link when asked and possible (same file system), else copy inside the kernel and flush."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    with open(src, "rb") as s, open(dst, "wb") as d:
        size = os.fstat(s.fileno()).st_size
        for off in range(0, size, BLOCK * 8):
            table.check()
            copy_range(s.fileno(), off, d.fileno(), off, min(BLOCK * 8, size - off))
        os.fsync(d.fileno())


def copy_kept(shard: ShardPlan, writer: ShardWriter, table: TableProgress) -> None:
    """Copy kept tensors in runs: tensors adjacent in one source file stay adjacent in the output."""
    runs: list[tuple[Path, int, int, str]] = []  # (source file, start, end, first tensor's name)
    for path, info in shard.pieces():
        if runs and _extends(runs[-1], path, info, writer):
            runs[-1] = (path, runs[-1][1], info.end, runs[-1][3])
        else:
            runs.append((path, info.start, info.end, info.name))
    files: dict[Path, int] = {}
    try:
        for path, start, end, name in runs:
            table.check()
            if path not in files:
                files[path] = os.open(path, os.O_RDONLY)
            writer.copy_from(name, files[path], start, end - start)
    finally:
        for fd in files.values():
            os.close(fd)


def _extends(run: tuple[Path, int, int, str], path: Path, info: TensorInfo, writer: ShardWriter) -> bool:
    run_path, run_start, run_end, run_name = run
    return (run_path == path and info.start == run_end
            and writer.offsets[info.name] - writer.offsets[run_name] == info.start - run_start)


def hash_file(path: Path, table_range: tuple[int, int] | None, table: TableProgress) -> str:
    """sha256 of the file; bytes inside the table are read only once the main thread has written them.

    For the table's file, what is hashed is also flushed to disk every FLUSH_EVERY bytes, here beside the GEMM."""
    digest = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        pos = flushed = 0
        while pos < size:
            if table_range and pos - flushed >= FLUSH_EVERY:
                getattr(os, "fdatasync", os.fsync)(f.fileno())  # macOS has only fsync
                flushed = pos
            table.check()
            stop = min(pos + BLOCK, size)
            if table_range and table_range[0] < stop and pos < table_range[1]:
                stop = min(stop, table_range[1]) if pos >= table_range[0] else table_range[0]
                if pos >= table_range[0]:
                    table.wait_for(stop - table_range[0])
            f.seek(pos)
            n = f.readinto(view[: stop - pos])
            if n != stop - pos:
                raise OSError(errno.EIO, "short read while hashing", str(path))
            digest.update(view[:n])
            pos = stop
    return digest.hexdigest()
