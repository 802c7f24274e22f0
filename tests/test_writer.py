"""The output path below the executor: the aligned, hashing FileWriter, the GEMM-to-writer TableStream and the
GEMM workers' row chunks."""

from __future__ import annotations

import errno
import hashlib
import os
import threading

import numpy as np
import pytest

from precompute_cli import check, portable, writer
from precompute_cli.execute import _row_ranges
from precompute_cli.transfer import FileJob, Stopped, TableStream, write_file


@pytest.fixture(params=["direct", "buffered"])
def small_buffer(request, monkeypatch):
    """A 2-block buffer, so that a few kilobytes cross every boundary the writer has."""
    monkeypatch.setattr(writer, "BUFFER", 2 * writer.ALIGN)
    return request.param == "direct"


def test_file_writer_writes_and_hashes_what_it_was_given(tmp_path, small_buffer):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(50_000))
    expected = bytearray()
    out = writer.FileWriter(tmp_path / "out.bin", direct=small_buffer)
    fd = os.open(source, os.O_RDONLY)
    try:
        for piece in (b"header", os.urandom(9000), np.arange(3001, dtype=np.uint16)):
            out.write(piece)
            expected += bytes(memoryview(piece).cast("B"))
        for offset, count in ((7, 20_000), (30_000, 1), (30_001, 19_999)):
            out.copy_from(fd, offset, count)
            expected += source.read_bytes()[offset:offset + count]
    finally:
        os.close(fd)
    digest = out.finish()
    assert (tmp_path / "out.bin").read_bytes() == bytes(expected)  # the padding of the last block is cut off
    assert digest == hashlib.sha256(expected).hexdigest()


def test_file_writer_uses_o_direct_where_the_file_system_has_it(tmp_path):
    if not portable.o_direct():
        pytest.skip("no O_DIRECT on this platform")
    out = writer.FileWriter(tmp_path / "f.bin")
    out.write(b"x" * 10)
    assert out.direct  # the tests' file system is a disk here; on tmpfs this would fall back
    assert out.finish() == hashlib.sha256(b"x" * 10).hexdigest()


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_file_writer_falls_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch, refused_at):
    """Some file systems refuse O_DIRECT when the file is opened, others only on the first write (EINVAL)."""
    if not portable.o_direct():
        pytest.skip("no O_DIRECT on this platform")
    import fcntl

    real_open, real_write = os.open, os.write

    def fussy_open(path, flags, *args):
        if refused_at == "open" and flags & portable.o_direct():
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def fussy_write(fd, data):
        if refused_at == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & portable.o_direct():
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fussy_open)
    monkeypatch.setattr(os, "write", fussy_write)
    out = writer.FileWriter(tmp_path / "f.bin")
    out.write(b"abc" * 5000)
    digest = out.finish()
    assert not out.direct
    assert (tmp_path / "f.bin").read_bytes() == b"abc" * 5000
    assert digest == hashlib.sha256(b"abc" * 5000).hexdigest()


def test_table_rows_computed_out_of_order_are_written_in_order(tmp_path):
    stream = TableStream(chunks=6, ahead=2)
    chunks = [np.full((3, 4), i, dtype=np.uint16) for i in range(6)]

    def worker():
        while (i := stream.claim()) is not None:
            stream.put(i, chunks[i])

    # Claims are bounded by what the writer has taken: never more than `ahead` chunks in flight.
    assert [stream.claim(), stream.claim()] == [0, 1]
    stream.put(1, chunks[1])
    stream.put(0, chunks[0])
    workers = [threading.Thread(target=worker) for _ in range(2)]
    for t in workers:
        t.start()
    digest = write_file(FileJob(tmp_path / "t.bin", b"HEAD", (), table=True), stream)
    for t in workers:
        t.join()
    expected = b"HEAD" + b"".join(c.tobytes() for c in chunks)
    assert (tmp_path / "t.bin").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert stream.rows_done == 18


def test_a_stopped_stream_releases_the_writer_and_the_workers(tmp_path):
    stream = TableStream(chunks=4, ahead=1)
    assert stream.claim() == 0
    errors = []

    def blocked_worker():
        try:
            stream.claim()  # waits: one chunk is already in flight and the writer has taken none
        except Stopped as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked_worker)
    t.start()
    threading.Timer(0.05, stream.stop).start()
    with pytest.raises(Stopped):
        write_file(FileJob(tmp_path / "t.bin", b"HEAD", (), table=True), stream)  # waits for chunk 0
    t.join(5)
    assert not t.is_alive() and len(errors) == 1


def test_a_failing_writer_stops_the_workers(tmp_path):
    stream = TableStream(chunks=4, ahead=8)
    missing = tmp_path / "gone.bin"
    with pytest.raises(FileNotFoundError):
        write_file(FileJob(tmp_path / "out.bin", b"", ((missing, 0, 10),)), stream)
    with pytest.raises(Stopped):
        stream.claim()


def test_hash_file_matches_hashlib(tmp_path):
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    assert check.sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("rows,chunk,workers", [(32000, 1820, 2), (10, 20, 2), (7, 4, 3), (5, 1, 1), (1, 1, 2)])
def test_row_ranges_cover_the_vocabulary_once_in_order_with_a_finer_tail(rows, chunk, workers):
    """The GEMM workers' chunks: every row once, in order; the last `workers` chunks' worth in quarter chunks."""
    ranges = _row_ranges(rows, chunk, workers)
    assert [r for a, b in ranges for r in range(a, b)] == list(range(rows))
    assert max(b - a for a, b in ranges) <= chunk
    if workers > 1 and rows > workers * chunk:
        tail = [b - a for a, b in ranges if a >= rows - workers * chunk]
        assert sum(tail) == workers * chunk and max(tail) == max(1, chunk // 4)
