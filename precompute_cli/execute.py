"""Carry out a Plan: fold the table on every core while the untouched bytes are copied, all into a temporary
folder that becomes OUT only once everything is written and flushed.

Memory stays flat: the embedding is read in row chunks as the GEMM workers consume them, kept tensors go from the
source files to the output through one buffer per writer, and finished chunks of the table are written as soon as
the rows before them are (transfer.py). Nothing here imports torch: the fold is numpy (OpenBLAS runs the float32
GEMM at this machine's peak, and torch's import alone would cost 1.5 s of every conversion).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from precompute_cli import native, portable, space
from precompute_cli.block import PrecomputeBlock
from precompute_cli.check import sha256, write_manifest
from precompute_cli.commit import commit, exists_error
from precompute_cli.errors import InputError, PrecomputeError
from precompute_cli.plan import Plan
from precompute_cli.progress import Progress
from precompute_cli.quant import output_config
from precompute_cli.recipes import ops
from precompute_cli.source import INDEX_NAME
from precompute_cli.st_io import DTYPES, TensorRef, encode_header, from_float, read_header, read_tensor, to_float
from precompute_cli.transfer import FileJob, Stopped, TableStream, write_file

# float32 working set per chunk of vocabulary rows and per GEMM worker: enough rows that a single-threaded GEMM
# runs at full speed, small next to the table + 1 GiB memory budget.
CHUNK_BYTES = 128 << 20
# Finished table rows may wait this long for their writer, which first writes the rest of the table's shard (all
# 2.5 GB of Llama-3.2-1B's single file): with only a few chunks of slack the GEMM workers stalled behind it.
PENDING_BYTES = 512 << 20


@dataclass(frozen=True)
class OutputFile:
    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Result:
    out: Path
    files: tuple[OutputFile, ...]
    seconds: float


def execute(plan: Plan, out: Path, overwrite: bool = False, progress: Progress | None = None,
            link: bool = False, device: str = "cpu") -> Result:
    """`link` hard-links unchanged shards instead of copying them; `device` runs the GEMM there ("cuda")."""
    started = time.perf_counter()
    out = Path(out)
    _check_device(device)
    source_root = plan.source.root.resolve()
    if out.resolve() == source_root or out.resolve() in source_root.parents:
        raise InputError(f"{out}: holds the source checkpoint; converting into it would replace the source")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise exists_error(out)  # early, to save the work; the commit checks again, atomically
    space.check(plan, out, link)
    try:
        with _staging(out, overwrite) as tmp:
            digests = _write_shards(plan, tmp, progress, link, device)
            _write_metadata(plan, tmp)
            _check_written(tmp)
            files = {p.name: _describe(p, digests.get(p.name)) for p in tmp.iterdir()}
            manifest = write_manifest(tmp, {name: f.sha256 for name, f in files.items()})
            files[manifest.name] = _describe(manifest)
            _fsync_all(tmp)
    except OSError as exc:  # the output side failed (full disk, permissions): the input is fine, so exit 1
        raise _write_error(out, exc) from None
    return Result(out, tuple(files[name] for name in sorted(files)), time.perf_counter() - started)


def _write_error(out: Path, exc: OSError) -> PrecomputeError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PrecomputeError(f"{out}: no space left on the device while writing the output; nothing was written")
    return PrecomputeError(f"{exc.filename or out}: {exc.strerror or exc} while writing the output; "
                           "nothing was written")


def _check_written(tmp: Path) -> None:
    """Every file we wrote must pass our own strict reader (layout, offsets, size) before it can become OUT."""
    for path in sorted(tmp.glob("*.safetensors")):
        try:
            read_header(path)
        except InputError as exc:
            raise PrecomputeError(f"wrote an invalid safetensors file (a bug; please report it): {exc}") from None


@contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside OUT, committed in its place on success (commit.py) and deleted on any failure,
    signal, or when another run's OUT got there first.

    The commit and the cleanup run with SIGINT/SIGTERM deferred, so a second Ctrl-C cannot strand a half-deleted
    folder; folders made for OUT's parent are removed again when nothing was committed."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    _reap_abandoned(out)
    tmp = out.parent / f".{out.name}.precompute-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = interrupt_on_sigterm()
    committed = False
    try:
        yield tmp
        with _signals_deferred():
            _remove(out.parent / f".{out.name}.precompute-old-{os.getpid()}")
            replaced = commit(tmp, out, overwrite)
            committed = True
            if replaced is not None:
                _remove(replaced)
            _fsync_dir(out.parent)
    finally:
        try:
            with _signals_deferred():
                _remove(tmp)
                for folder in [] if committed else created:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _reap_abandoned(out: Path) -> None:
    """Delete staging folders beside OUT left by runs that were killed outright (kill -9, power loss): their
    names carry the pid, and a folder whose process no longer exists is nobody's."""
    for stale in out.parent.glob(f".{out.name}.precompute-*-*"):
        kind, _, pid = stale.name.rpartition("-")
        if not kind.endswith((".precompute-tmp", ".precompute-old")) or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind.endswith(".precompute-old") and not out.exists():
            continue  # a swap cut short between its two renames: this is the only copy of the old OUT
        shutil.rmtree(stale, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a folder, or what an --overwrite replaced (a file or a link where OUT was); missing is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    return portable.process_alive(pid)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then raise KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt(signal.Signals(received[0]).name)


def interrupt_on_sigterm():
    """Turn SIGTERM (CI cancelling a job) into KeyboardInterrupt, so every cleanup runs; returns the previous
    handler (None off the main thread, where Python cannot install one)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def _check_device(name: str) -> None:
    """--device: cpu, or cuda[:N] where torch sees a GPU (checked before anything is written)."""
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise InputError(f"--device {name!r}: expected cpu or cuda (or cuda:N)")
    if kind == "cuda":
        import torch  # only here: converting on the CPU never imports torch

        if not torch.cuda.is_available():
            why = "no GPU is visible" if torch.backends.cuda.is_built() else "this torch build has no CUDA support"
            raise InputError(f"--device {name}: CUDA is not available here ({why}); use --device cpu")


def _file_jobs(plan: Plan, tmp: Path, link: bool) -> list[FileJob]:
    """One job per output file, the table's file first (its writer waits on the GEMM for its last bytes)."""
    jobs = []
    for shard in plan.shards:
        if shard.unchanged:
            size = shard.source.stat().st_size
            jobs.append(FileJob(tmp / shard.name, b"", ((shard.source, 0, size),), link=shard.source if link else None,
                                sha256=shard.published_sha256))
            continue
        refs = [TensorRef(i.name, i.dtype, i.shape) for i in shard.kept]
        if shard.has_table:
            refs.append(plan.table.ref)  # last: the kept bytes can be written while the table is computed
        runs: list[tuple[Path, int, int]] = []
        for path, info in shard.pieces():
            if runs and runs[-1][0] == path and runs[-1][1] + runs[-1][2] == info.start:
                runs[-1] = (path, runs[-1][1], runs[-1][2] + info.nbytes)
            else:
                runs.append((path, info.start, info.nbytes))
        jobs.append(FileJob(tmp / shard.name, encode_header(refs, {"format": "pt"}), tuple(runs), shard.has_table))
    if not any(job.table for job in jobs):
        raise InputError(f"{plan.source.ref}: no safetensors weights to convert")
    return sorted(jobs, key=lambda job: not job.table)


def _write_shards(plan: Plan, tmp: Path, progress: Progress | None, link: bool = False,
                  device: str = "cpu") -> dict[str, str]:
    """Every shard written; returns {file name: sha256}.

    Threads: one writer for the table's file, one for the others, and GEMM workers (this thread is one) that
    fold chunks of vocabulary rows and hand them to the table's writer."""
    jobs = _file_jobs(plan, tmp, link)
    workers = _cores() if device == "cpu" else 1
    chunk = _chunk_rows(plan)
    chunk_bytes = chunk * plan.table.width * DTYPES[plan.table.dtype].itemsize
    ranges = _row_ranges(plan.table.rows, chunk, workers)
    stream = TableStream(chunks=len(ranges), ahead=max(2 * workers, PENDING_BYTES // chunk_bytes))
    fold = _Fold(plan, ranges, progress)
    with _gemms_on(device), native.allocator_keeps_memory(), _watching(jobs, plan, progress), \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="write") as writers, \
            ThreadPoolExecutor(max_workers=max(workers - 1, 1), thread_name_prefix="fold") as folders:
        try:
            written = {job.path.name: writers.submit(write_file, job, stream) for job in jobs}
            helpers = [folders.submit(fold.run, stream, progress) for _ in range(workers - 1)]
            try:
                fold.run(stream, progress)
            except Stopped:
                pass  # another thread failed and stopped the rest: its own exception is raised below
            futures = [*helpers, *written.values()]
            errors = [f.exception() for f in futures]  # waits for every thread
            failure = next((e for e in errors if e is not None and not isinstance(e, Stopped)), None)
            if failure is not None:
                raise failure
            return {name: future.result() for name, future in written.items()}
        finally:
            # Before the pools are joined: whatever ended this block (done, an error, Ctrl-C arriving anywhere in
            # it), no thread may be left waiting for a chunk that will not come.
            stream.stop()


def _gemms_on(device: str):
    """The fold's GEMMs on the CPU (numpy) or, with --device cuda, on the GPU through torch."""
    if device == "cpu":
        return contextlib.nullcontext()
    from precompute_cli.device import TorchMatmul

    return ops.gemms_with(TorchMatmul(device))


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _chunk_rows(plan: Plan) -> int:
    """Vocabulary rows per chunk: a CHUNK_BYTES float32 working set (input rows, their norm, the columns, and for a
    parallel block the FFN's hidden rows)."""
    spec, table = plan.recipe.spec, plan.table
    hidden = spec.intermediate_size * max(spec.ffn_matrices - 1, 1) if spec.block == "parallel" else 0
    per_row = 4 * (2 * spec.hidden_size + table.width + hidden)
    return max(1, min(table.rows, CHUNK_BYTES // per_row))


def _row_ranges(rows: int, chunk: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk, in order: `chunk` rows each, but the last `workers` chunks' rows cut in four,
    so that the workers finish within a quarter chunk of each other rather than one idling for up to a whole
    chunk (about a second of single-core GEMM) at the end."""
    tail = min(rows, workers * chunk) if workers > 1 else 0
    starts = [*range(0, rows - tail, chunk), *range(rows - tail, rows, max(1, chunk // 4))]
    return list(zip(starts, [*starts[1:], rows], strict=True))


@contextmanager
def _watching(jobs: list[FileJob], plan: Plan, progress: Progress | None) -> Iterator[None]:
    """Report the bytes copied and the table's bytes written, from the output files' sizes (a thread polls them
    while the writers run, so the writers report nothing themselves)."""
    if progress is None:
        yield
        return
    table_bytes = plan.table.ref.nbytes
    copy_total = sum(n for job in jobs for _, _, n in job.runs)
    done = threading.Event()

    def report() -> None:
        copied = written = 0
        for job in jobs:
            try:
                size = max(job.path.stat().st_size - len(job.header), 0)
            except FileNotFoundError:
                continue
            runs = sum(n for _, _, n in job.runs)
            copied += min(size, runs)
            written += max(size - runs, 0) if job.table else 0
        progress("copying", copied, copy_total)
        progress("writing", min(written, table_bytes), table_bytes)

    def poll() -> None:
        while not done.wait(0.25):
            report()

    watcher = threading.Thread(target=poll, name="progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    report()


class _Fold:
    """Computes table rows chunk by chunk: read embedding rows, fold in float32, round to the table's dtype."""

    def __init__(self, plan: Plan, ranges: list[tuple[int, int]], progress: Progress | None = None):
        self.plan, self.ranges = plan, ranges
        recipe = plan.recipe
        self.weights = plan.weights(np.float32)
        streamed = set(recipe.streamed())
        layer0 = [(name, info.nbytes) for name, (_, info) in plan.inputs.items()
                  if name != recipe.embedding and name not in streamed]
        total, done = sum(n for _, n in layer0), 0
        for name, nbytes in layer0:  # read before the workers start: every worker uses them
            if progress:
                progress("reading", done, total)
            self.weights(name)
            done += nbytes
        if progress:
            progress("reading", done, total)
        self.embedding = plan.inputs[recipe.embedding]
        _prefetch(self.embedding[0], self.embedding[1].start, self.embedding[1].nbytes)
        self.spans = [(name, span) for name, span in plan.table.columns.items() if span]

    def run(self, stream: TableStream, progress: Progress | None = None) -> None:
        try:
            with native.single_threaded():
                self._run(stream, progress)
        except BaseException:
            stream.stop()
            raise

    def _run(self, stream: TableStream, progress: Progress | None) -> None:
        table = self.plan.table
        while (index := stream.claim()) is not None:
            start, stop = self.ranges[index]
            path, info = self.embedding
            stored = read_tensor(path, info, (start, stop))
            x = to_float(stored, info.dtype)
            columns = self.plan.recipe.fold_tokens(self.weights, x, np.arange(start, stop))
            rows = np.empty((stop - start, table.width), dtype=DTYPES[table.dtype])
            for name, (first, last) in self.spans:
                if columns[name] is x and info.dtype == table.dtype:
                    rows[:, first:last] = stored  # the input rows themselves (a residual): already in that dtype
                else:
                    from_float(columns[name], table.dtype, out=rows[:, first:last])
            del columns, x
            stream.put(index, rows)
            if progress:
                progress("folding", stream.rows_done, table.rows)


def _prefetch(path: Path, start: int, nbytes: int) -> None:
    """Ask the kernel to read the embedding ahead, so a cold page cache does not stall the GEMM."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def _write_metadata(plan: Plan, tmp: Path) -> None:
    config = PrecomputeBlock.of(plan).added_to(
        output_config(plan.recipe.cfg.data, [plan.inputs[n][1].name for n in plan.dequantized
                                             if n in plan.recipe.removed()]))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if len(plan.shards) > 1:
        weight_map = {i.name: s.name for s in plan.shards for i in s.kept}
        weight_map[plan.table.name] = next(s.name for s in plan.shards if s.has_table)
        total = sum(i.nbytes for s in plan.shards for i in s.kept) + plan.table.ref.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for path in plan.source.aux:
        shutil.copyfile(path, tmp / path.name)


def _describe(path: Path, digest: str | None = None) -> OutputFile:
    """`digest` when the writer already hashed the file on its way out."""
    return OutputFile(path.name, path.stat().st_size, digest or sha256(path))


def _fsync_all(folder: Path) -> None:
    """Flush every file's data and the folder's entries before the folder can be renamed into place."""
    for path in folder.iterdir():
        _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    portable.fsync_path(path)
