"""Carry out a Plan: stream the table into place while untouched bytes are copied, all into a temporary folder
that becomes OUT only once everything is written and flushed.

Memory stays flat: kept tensors move file to file inside the kernel (copy_file_range), the embedding is read in
row chunks as the GEMM consumes them, and each finished chunk of the table is written straight to its offset.
The copies and the sha256 of every shard run in a second thread (transfer.py) while the GEMM runs here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import precompute_cli
from precompute_cli.check import sha256, write_manifest
from precompute_cli.errors import InputError, PrecomputeError
from precompute_cli.plan import Plan
from precompute_cli.source import INDEX_NAME
from precompute_cli.st_io import DTYPES, ShardWriter, TensorRef, read_header, read_tensor
from precompute_cli.transfer import ShardJob, TableProgress, move_and_hash

# float32 working set per chunk of vocabulary rows: large enough that the GEMM runs at full speed (a few
# hundred rows of a 4096-wide model lose a third of it), small next to the table + 1 GiB memory budget.
CHUNK_BYTES = 256 << 20
Progress = Callable[[int, int], None]  # (rows done, rows total)


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


def precompute_block(plan: Plan) -> dict:
    """The config.json entry that marks a converted checkpoint; the runtime and inspect read only this."""
    src = plan.source
    return {
        "format": 1,
        "layer": 0,
        "block": plan.recipe.spec.block,
        "table": plan.table.name,
        "dtype": plan.table.dtype,
        "columns": {k: list(v) if v else None for k, v in plan.table.columns.items()},
        "removed": [r.name for r in plan.removed],
        "source": {"id": src.ref, "revision": src.revision},
        "tool": {"name": "precompute-cli", "version": precompute_cli.__version__},
    }


def execute(plan: Plan, out: Path, overwrite: bool = False, progress: Progress | None = None,
            link: bool = False, device: str = "cpu") -> Result:
    """`link` hard-links unchanged shards instead of copying them; `device` runs the GEMM there ("cuda")."""
    started = time.perf_counter()
    out = Path(out)
    compute_on = _device(device)
    source_root = plan.source.root.resolve()
    if out.resolve() == source_root or out.resolve() in source_root.parents:
        raise InputError(f"{out}: holds the source checkpoint; converting into it would replace the source")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: already exists and is not empty (use --overwrite to replace it)")
    try:
        with _staging(out) as tmp:
            digests = _write_shards(plan, tmp, progress, link, compute_on)
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
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside OUT, renamed into place on success and deleted on any failure or signal.

    The swap and the cleanup run with SIGINT/SIGTERM deferred, so a second Ctrl-C cannot strand a half-deleted
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
            old = out.parent / f".{out.name}.precompute-old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            if out.exists():
                os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                if old.exists():
                    os.rename(old, out)
                raise
            committed = True
            shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(out.parent)
    finally:
        try:
            with _signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _device(name: str) -> torch.device:
    """--device: cpu, or cuda[:N] where torch sees a GPU (checked before anything is written)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected cpu or cuda (or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "no GPU is visible" if torch.backends.cuda.is_built() else "this torch build has no CUDA support"
        raise InputError(f"--device {name}: CUDA is not available here ({why}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: expected cpu or cuda (or cuda:N)")
    return device


def _write_shards(plan: Plan, tmp: Path, progress: Progress | None, link: bool = False,
                  device: torch.device | None = None) -> dict[str, str]:
    """Every shard written; returns the sha256 of each, computed by the copy thread behind the writes."""
    writers: list[ShardWriter] = []
    finished = False
    try:
        jobs = []
        for shard in plan.shards:
            if shard.unchanged:
                jobs.append(ShardJob(shard, tmp / shard.name, None))
                continue
            tensors = [TensorRef(i.name, i.dtype, i.shape) for i in shard.kept]
            if shard.has_table:
                t = plan.table.ref
                tensors.append(TensorRef(t.name, t.dtype, t.shape))
            writer = ShardWriter(tmp / shard.name, tensors)
            writers.append(writer)
            span = (writer.offsets[t.name], writer.offsets[t.name] + t.nbytes) if shard.has_table else None
            jobs.append(ShardJob(shard, tmp / shard.name, writer, span))
        table_writer = next((j.writer for j in jobs if j.table), None)
        if table_writer is None:
            raise InputError(f"{plan.source.ref}: no safetensors weights to convert")
        written = TableProgress()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy") as pool:
            mover = pool.submit(move_and_hash, jobs, link, written)
            try:
                _compute_table(plan, table_writer, progress, written, device)
            except BaseException:
                written.stop()
                raise
            digests = mover.result()
        finished = True
        return digests
    finally:
        for writer in writers:
            writer.close(sync=finished)  # a failed run's files are deleted next: flushing them only delays exit


def _compute_table(plan: Plan, writer: ShardWriter, progress: Progress | None,
                   written: TableProgress | None = None, device: torch.device | None = None) -> None:
    """float32 chunks of vocabulary rows, each written to its offset; nothing accumulates between chunks."""
    recipe, table = plan.recipe, plan.table
    device = device or torch.device("cpu")
    weight = plan.weights(torch.float32, device)

    emb_path, emb_info = plan.inputs[recipe.embedding]
    _prefetch(emb_path, emb_info.start, emb_info.nbytes)
    spec = recipe.spec
    per_row = 4 * (spec.hidden_size * 2 + table.width + spec.intermediate_size * max(spec.ffn_matrices - 1, 1))
    chunk = max(1, min(table.rows, CHUNK_BYTES // per_row))
    out_dtype = DTYPES[table.dtype]
    row_bytes = table.width * out_dtype.itemsize
    spans = [(name, span) for name, span in table.columns.items() if span]
    # Two buffers, used in turn: each column block is cast straight into place (no concatenation, no fresh
    # allocation per chunk), and a chunk is written by a writer thread while the GEMM computes the next one.
    buffers = [torch.empty(chunk, table.width, dtype=out_dtype, device=device) for _ in range(2)]
    pending: list[Future | None] = [None, None]

    def put(rows: torch.Tensor, start: int, stop: int) -> None:
        writer.write(table.name, rows, start * row_bytes)
        if written is not None:
            written.advance(stop * row_bytes)  # one writer thread: chunks land in order

    with torch.inference_mode(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="table") as writes:
        for i, start in enumerate(range(0, table.rows, chunk)):
            if written is not None and written.failed:
                break  # the copy thread failed: its exception is what the caller reports
            stop = min(start + chunk, table.rows)
            cols = recipe.fold(weight, read_tensor(emb_path, emb_info, (start, stop)).to(device))
            if pending[i % 2] is not None:
                pending[i % 2].result()  # that buffer's previous chunk is on disk
            rows = buffers[i % 2][: stop - start]
            for name, (first, last) in spans:
                rows[:, first:last].copy_(cols[name])
            del cols
            pending[i % 2] = writes.submit(put, rows.cpu(), start, stop)
            if progress:
                progress(stop, table.rows)
        for job in pending:
            if job is not None:
                job.result()


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
    config = dict(plan.recipe.cfg.data)
    config["precompute"] = precompute_block(plan)
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
    """`digest` when the copy thread already hashed the file behind its writes."""
    return OutputFile(path.name, path.stat().st_size, digest or sha256(path))


def _fsync_all(folder: Path) -> None:
    """Flush every file's data and the folder's entries before the folder can be renamed into place."""
    for path in folder.iterdir():
        _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
