"""Writing the output files: what each is made of, and the hand-over of the table's rows from the GEMM workers.

Every output file is written front to back by one writer thread (writer.FileWriter: aligned, O_DIRECT where
possible, hashed on the way out). A rewritten shard is its header, then its kept tensors copied as byte runs from
the source files, then, in the shard that holds it, the table, last, so that everything else in that file is on
disk before the GEMM has produced its first rows. The rows arrive through a `TableStream` in order; the GEMM
workers may run at most a few chunks ahead of the writer, which bounds the memory they hold.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from precompute_cli import portable
from precompute_cli.check import sha256
from precompute_cli.writer import FileWriter

STEP = 64 << 20  # bytes copied between two checks for cancellation
Run = tuple[Path, int, int]  # (source file, byte offset, byte count)


class Stopped(Exception):
    """Another thread failed or the user interrupted: this one stops at its next step."""


@dataclass(frozen=True)
class FileJob:
    path: Path  # the output file
    header: bytes  # the safetensors header (b"" when a source file is copied whole)
    runs: tuple[Run, ...]  # source bytes, in output order
    table: bool = False  # the table's rows follow the runs
    link: Path | None = None  # hard-link this source file instead of copying it (--link)
    sha256: str | None = None  # a whole-file copy's digest when the source's is already known (hub.published_sha256)


class TableStream:
    """Chunks of table rows, produced in any order by the GEMM workers and written in order by one writer."""

    POLL = 0.5  # seconds between checks of the stop flag while waiting, should a notification be lost to a signal

    def __init__(self, chunks: int, ahead: int):
        self.chunks, self.ahead = chunks, ahead
        self._ready: dict[int, np.ndarray] = {}
        self._claimed = self._taken = self.rows_done = 0
        self._stopped = False
        self._cond = threading.Condition()

    def claim(self) -> int | None:
        """The next chunk to compute (None when all are claimed); waits while the writer is `ahead` chunks behind."""
        with self._cond:
            while not self._stopped and self._claimed < self.chunks and self._claimed >= self._taken + self.ahead:
                self._cond.wait(self.POLL)
            self.check()
            if self._claimed == self.chunks:
                return None
            self._claimed += 1
            return self._claimed - 1

    def put(self, index: int, rows: np.ndarray) -> None:
        with self._cond:
            self._ready[index] = rows
            self.rows_done += len(rows)
            self._cond.notify_all()

    def take(self, index: int) -> np.ndarray:
        with self._cond:
            while index not in self._ready:
                self.check()
                self._cond.wait(self.POLL)
            self._taken = index + 1
            self._cond.notify_all()
            return self._ready.pop(index)

    def stop(self) -> None:
        self._stopped = True  # first, outside the lock: waiters also poll it
        with self._cond:
            self._cond.notify_all()

    def check(self) -> None:
        if self._stopped:
            raise Stopped


def write_file(job: FileJob, table: TableStream) -> str:
    """Write one output file; returns its sha256. Any failure stops the other threads too."""
    try:
        if job.link is not None and _hard_link(job.link, job.path):
            return job.sha256 or sha256(job.path, table.check)
        writer = FileWriter(job.path, hashed=job.sha256 is None)
        try:
            writer.write(job.header)
            files: dict[Path, int] = {}
            try:
                for path, start, nbytes in job.runs:
                    if path not in files:
                        files[path] = portable.open_read(path)
                    for off in range(start, start + nbytes, STEP):
                        table.check()
                        writer.copy_from(files[path], off, min(STEP, start + nbytes - off))
            finally:
                for fd in files.values():
                    os.close(fd)
            for index in range(table.chunks if job.table else 0):
                writer.write(table.take(index))
            return writer.finish() or job.sha256
        finally:
            writer.close()
    except BaseException:
        table.stop()
        raise


def _hard_link(src: Path, dst: Path) -> bool:
    """True when linked; False where links cannot be made (another file system), so the file is copied."""
    try:
        os.link(src, dst)
        return True
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
