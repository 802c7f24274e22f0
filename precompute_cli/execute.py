"""Carry out a Plan: stream the table into place while untouched bytes are copied, all into a temporary folder
that becomes OUT only once everything is written and flushed.

Memory stays flat: kept tensors move file to file inside the kernel (copy_file_range), the embedding is read in
row chunks as the GEMM consumes them, and each finished chunk of the table is written straight to its offset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import precompute_cli
from precompute_cli.errors import InputError
from precompute_cli.plan import Plan, ShardPlan
from precompute_cli.source import INDEX_NAME
from precompute_cli.st_io import DTYPES, OutTensor, ShardWriter, copy_range, read_tensor

CHUNK_BYTES = 64 << 20  # float32 working set per chunk of vocabulary rows
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


def execute(plan: Plan, out: Path, overwrite: bool = False, progress: Progress | None = None) -> Result:
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError(f"{out}: already exists and is not empty (use --overwrite to replace it)")
    with _staging(out) as tmp:
        _write_shards(plan, tmp, progress)
        _write_metadata(plan, tmp)
        files = tuple(_describe(p) for p in sorted(tmp.iterdir()))
        _fsync_dir(tmp)
    return Result(out, files, time.perf_counter() - started)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside OUT, renamed into place on success and deleted on any failure or signal."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.precompute-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = _raise_on_sigterm()
    try:
        yield tmp
        old = out.parent / f".{out.name}.precompute-old-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.exists():
                os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so the cleanup above runs (only possible on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def _write_shards(plan: Plan, tmp: Path, progress: Progress | None) -> None:
    writers: list[ShardWriter] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy") as pool:
            copies = []
            table_writer = None
            for shard in plan.shards:
                if shard.unchanged:
                    copies.append(pool.submit(_copy_file, shard.source, tmp / shard.name))
                    continue
                tensors = [OutTensor(i.name, i.dtype, i.shape) for i in shard.kept]
                if shard.has_table:
                    t = plan.table.ref
                    tensors.append(OutTensor(t.name, t.dtype, t.shape))
                writer = ShardWriter(tmp / shard.name, tensors)
                writers.append(writer)
                copies.append(pool.submit(_copy_kept, shard, writer))
                if shard.has_table:
                    table_writer = writer
            if table_writer is None:
                raise InputError(f"{plan.source.ref}: no safetensors weights to convert")
            _compute_table(plan, table_writer, progress)
            for job in copies:
                job.result()
    finally:
        for writer in writers:
            writer.close()


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        copy_range(s.fileno(), 0, d.fileno(), 0, os.fstat(s.fileno()).st_size)
        os.fsync(d.fileno())


def _copy_kept(shard: ShardPlan, writer: ShardWriter) -> None:
    """Copy kept tensors in runs: tensors adjacent in the source stay adjacent in the output."""
    with open(shard.source, "rb") as src:
        run_start = run_name = None
        run_end = 0
        for info in shard.kept:
            if run_name is not None and info.start == run_end and _adjacent(writer, run_name, run_start, info):
                run_end = info.end
                continue
            if run_name is not None:
                writer.copy_from(run_name, src.fileno(), run_start, run_end - run_start)
            run_name, run_start, run_end = info.name, info.start, info.end
        if run_name is not None:
            writer.copy_from(run_name, src.fileno(), run_start, run_end - run_start)


def _adjacent(writer: ShardWriter, run_name: str, run_start: int, info) -> bool:
    return writer.offsets[info.name] - writer.offsets[run_name] == info.start - run_start


def _compute_table(plan: Plan, writer: ShardWriter, progress: Progress | None) -> None:
    recipe, table = plan.recipe, plan.table
    cache: dict[str, torch.Tensor] = {}

    def weight(name: str) -> torch.Tensor:
        if name not in cache:
            path, info = plan.inputs[name]
            cache[name] = read_tensor(path, info).float()
        return cache[name]

    emb_path, emb_info = plan.inputs[recipe.embedding]
    spec = recipe.spec
    per_row = 4 * (spec.hidden_size * 2 + table.width + spec.intermediate_size * max(spec.ffn_matrices - 1, 1))
    chunk = max(1, min(table.rows, CHUNK_BYTES // per_row))
    out_dtype = DTYPES[table.dtype]
    row_bytes = table.width * out_dtype.itemsize
    spans = [(name, span) for name, span in table.columns.items() if span]
    with torch.inference_mode():
        for start in range(0, table.rows, chunk):
            stop = min(start + chunk, table.rows)
            cols = recipe.fold(weight, read_tensor(emb_path, emb_info, (start, stop)))
            rows = torch.cat([cols[name] for name, _ in spans], dim=-1).to(out_dtype)
            writer.write(table.name, rows, start * row_bytes)
            if progress:
                progress(stop, table.rows)


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


def _describe(path: Path) -> OutputFile:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return OutputFile(path.name, path.stat().st_size, digest.hexdigest())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
