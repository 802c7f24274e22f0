"""Benchmark `precompute convert` against its two physical floors: moving the bytes and the float32 GEMM.

For each model: a synthetic checkpoint of the real model's shapes (random values, the real config, the real
tensor names as transformers writes them) is written once, then measured in one run:
  - conversion: `python -m precompute_cli convert SRC OUT` as a child process (imports included), wall time
    and peak RSS from the operating system (wait4's ru_maxrss of that child alone);
  - `cp -r SRC DST`, and `cp -r` followed by `sync` (the conversion fsyncs its output; cp does not);
  - the bare float32 GEMMs the fold needs (every 2-D layer-0 weight the table replaces, times the vocabulary),
    in this process, with numpy (OpenBLAS, what the converter uses) and with torch, on every core; the faster
    of the two is the floor;
  - the conversion again with every GEMM replaced by a free product of the right shape: the CPU time of
    everything else it does (imports, reading, norms, rounding, copying, hashing, writing), which the GEMM's
    cores must also do; (GEMM CPU + that) / cores is a floor no schedule on this machine beats;
and prints a markdown table: the ratio conversion / max(cp -r, GEMM) (target <= 1.15), the floor's own ratio, and
whether the peak RSS stays under the table's bytes + 1 GiB.

Page cache: by default the source is read once before every timed step, so each starts from a warm cache
(dropping caches needs /proc/sys/vm/drop_caches, which is not writable here). --cold evicts the source's pages
instead (posix_fadvise DONTNEED after sync, which needs no privileges) before every timed step.

    python scripts/bench_convert.py            # Llama-3.2-1B, Mistral-7B (2 and 14 layers), Pythia-1.4B
    python scripts/bench_convert.py --quick    # same widths, 2 layers, 4096-token vocabularies
    python scripts/bench_convert.py --models cohere2-moe-1L-8k   # a parallel MoE (9.5 GB of source, not default)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.recipes import REGISTRY
from precompute_cli.source import INDEX_NAME, resolve
from precompute_cli.st_io import NAME_TO_ST, TensorRef, encode_header
from precompute_cli.writer import FileWriter

GIB = 1 << 30
TIME = shutil.which("time", path="/usr/bin:/bin")  # GNU time: peak RSS of the command alone
LLAMA_32_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                   tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                   hidden_act="silu")
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_position_embeddings=32768,
                  hidden_act="silu")
PYTHIA_14B = dict(model_type="gpt_neox", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                  num_attention_heads=16, vocab_size=50304, rotary_pct=0.25, rotary_emb_base=10000,
                  use_parallel_residual=True, tie_word_embeddings=False, layer_norm_eps=1e-5, hidden_act="gelu",
                  max_position_embeddings=2048)
# transformers' Cohere2MoeConfig defaults (the shape of the checkpoint its source names, command-a-plus-05-2026) with
# 8 KV heads; the vocabulary is cut from 256,000 to 8,192 so that the GEMM takes minutes, not an hour: a smaller
# table makes the table + 1 GiB memory bound stricter, not looser. One layer: layer 0 is what the fold reads.
COHERE2_MOE = dict(model_type="cohere2_moe", hidden_size=8192, intermediate_size=22528, num_hidden_layers=1,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=8192, num_experts=8,
                   num_experts_per_tok=2, tie_word_embeddings=True, layer_norm_eps=1e-5, hidden_act="silu",
                   max_position_embeddings=8192)


@dataclass(frozen=True)
class Model:
    name: str
    config: dict
    dtype: str  # torch dtype name the checkpoint is stored in
    layers: int
    max_shard_size: str | None  # None: one model.safetensors, as the Hub ships these sizes
    quick_layers: int = 2
    default: bool = True  # measured when --models is not given


MODELS = [
    Model("llama-3.2-1b", LLAMA_32_1B, "bfloat16", 16, None),
    Model("mistral-7b-2L", MISTRAL_7B, "bfloat16", 2, None, quick_layers=1),
    Model("mistral-7b-14L", MISTRAL_7B, "bfloat16", 14, "2GB", quick_layers=5),
    Model("pythia-1.4b", PYTHIA_14B, "float16", 24, None),
    Model("cohere2-moe-1L-8k", COHERE2_MOE, "bfloat16", 1, None, quick_layers=1, default=False),
]


def quick(model: Model) -> Model:
    """Same widths, fewer layers and a 4096-token vocabulary: seconds instead of minutes (not real shapes)."""
    config = {**model.config, "vocab_size": 4096}
    shard = "500MB" if model.max_shard_size else None
    return Model(model.name + "-quick", config, model.dtype, model.quick_layers, shard)


# -- synthetic checkpoints ---------------------------------------------------------------------------------------

def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """On-disk tensor names and shapes, from transformers itself: the model on the meta device (no memory),
    tied weights dropped and transformers' renamings reverted exactly as save_pretrained does."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {name: tuple(t.shape) for name, t in dict(revert_weight_conversion(model, state)).items()}


def write_checkpoint(model: Model, folder: Path) -> bool:
    """config.json and safetensors shards (with an index when sharded), filled from a pool of random values.
    False when an earlier run already wrote this very checkpoint there."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from transformers import AutoConfig

    marker = folder / "bench-source.json"
    spec = {"config": model.config, "dtype": model.dtype, "layers": model.layers, "shard": model.max_shard_size}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = AutoConfig.for_model(**{**model.config, "num_hidden_layers": model.layers})
    config.dtype = model.dtype
    config.save_pretrained(folder)
    dtype = getattr(torch, model.dtype)
    st_dtype = NAME_TO_ST[model.dtype]
    shapes = tensor_shapes(config)
    split = split_state_dict_into_shards_factory(
        shapes, get_storage_size=lambda s: math.prod(s) * dtype.itemsize,
        filename_pattern="model{suffix}.safetensors", max_shard_size=model.max_shard_size or 1 << 62)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(32 << 20, generator=gen) * 0.02).to(dtype)  # 32M values, reused at random offsets
    pool_bytes = pool.view(torch.uint8).numpy()  # the pool's bytes: value i is bytes [i * size, (i + 1) * size)
    size = dtype.itemsize
    for filename, names in split.filename_to_tensors.items():
        writer = FileWriter(folder / filename)
        try:
            writer.write(encode_header([TensorRef(n, st_dtype, shapes[n]) for n in names], {"format": "pt"}))
            for n in names:
                numel, done = math.prod(shapes[n]), 0
                while done < numel:
                    take = min(numel - done, pool.numel() // 2)
                    at = int(torch.randint(0, pool.numel() - take + 1, (1,), generator=gen))
                    writer.write(pool_bytes[at * size:(at + take) * size])
                    done += take
            writer.finish()
        finally:
            writer.close()
    if len(split.filename_to_tensors) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * dtype.itemsize for s in shapes.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    marker.write_text(json.dumps(spec))
    return True


# -- measurements ------------------------------------------------------------------------------------------------

def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def prepare_cache(folder: Path, cold: bool) -> None:
    """Warm: read every source byte once. Cold: write back dirty pages, then drop the source's cached pages."""
    os.sync()
    for path in files_of(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 64 << 20):
                    pass
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Run:
    seconds: float  # wall
    cpu: float  # user + system seconds, all threads
    rss: int  # peak resident bytes


def run(cmd: list[str]) -> Run:
    """Wall time, CPU time and peak RSS of one command, the last two as GNU time reports them.

    Not this process's wait4: a child forked from it starts its high-water mark at this process's size
    (torch and the GEMM buffers), which exec does not reset."""
    with tempfile.NamedTemporaryFile("r") as report:
        timed = [TIME, "-f", "%M %U %S", "-o", report.name, *cmd]
        started = time.perf_counter()
        proc = subprocess.run(timed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-3000:]}")
        kib, user, system = report.read().strip().splitlines()[-1].split()
    return Run(seconds, float(user) + float(system), int(kib) * 1024)


def time_step(cmd: list[str], out: Path, src: Path, cold: bool, then_sync: bool = False) -> Run:
    """One timed command that writes `out` from `src`: the cache prepared first, `out` deleted after (and synced,
    so the next step does not pay for this one's writeback). `then_sync` counts a sync in the time, for commands
    that leave their output in the page cache (the conversion fsyncs its own)."""
    shutil.rmtree(out, ignore_errors=True)
    prepare_cache(src, cold)
    started = time.perf_counter()
    measured = run(cmd)
    if then_sync:
        os.sync()
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    os.sync()
    return Run(seconds, measured.cpu, measured.rss)


def time_copy(src: Path, work: Path, cold: bool, then_sync: bool) -> Run:
    return time_step(["cp", "-r", str(src), str(work / "copy")], work / "copy", src, cold, then_sync)


def time_convert(src: Path, work: Path, cold: bool, *flags: str) -> Run:
    out = work / "converted"
    return time_step([sys.executable, "-m", "precompute_cli", "convert", str(src), str(out), *flags], out, src, cold)


# The conversion as the CLI runs it, with every GEMM replaced by a product of the right shape that costs nothing:
# its CPU time is everything the conversion does besides the GEMM (start-up and imports, reading, norms,
# activations, rounding, copying, hashing, writing), which the GEMM's cores must also do.
WITHOUT_GEMM = """
import sys, threading
import numpy as np
from precompute_cli.cli import main
from precompute_cli.recipes import ops
products = {}
def no_gemm(x, w):  # one zero-filled product per thread and shape, reused: no compute, no allocation
    key = (threading.get_ident(), x.shape[0], w.shape[0], x.dtype)
    if key not in products:
        products[key] = np.zeros((x.shape[0], w.shape[0]), dtype=x.dtype)
    return products[key]
with ops.gemms_with(no_gemm):
    main(sys.argv[1:])
"""


def time_without_gemm(src: Path, work: Path, cold: bool) -> Run:
    out = work / "converted"
    return time_step([sys.executable, "-c", WITHOUT_GEMM, "convert", str(src), str(out)], out, src, cold)


# The naive converter the issue names as the baseline to beat: load every tensor, run each GEMM over the whole
# vocabulary at once, save every tensor (safetensors' save_file, through the page cache; no checksums). The fold's
# norms and exact columns are skipped: only its cost matters here. argv: the source's shard files, the output
# folder, then a JSON of what the plan knows (embedding, folded weights, removed tensors, table name and shape).
NAIVE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
shards, out, plan = [Path(p) for p in sys.argv[1:-2]], Path(sys.argv[-2]), json.loads(sys.argv[-1])
files = {path.name: load_file(path) for path in shards}
tensors = {name: t for f in files.values() for name, t in f.items()}
emb = tensors[plan["embedding"]].float()
outputs, by_width = [emb], {emb.shape[1]: emb}
for name in sorted(plan["folded"], key=lambda n: tensors[n].shape[1] != emb.shape[1]):  # FFN down after up
    y = by_width[tensors[name].shape[1]] @ tensors[name].float().T
    outputs.append(y)
    by_width.setdefault(y.shape[1], torch.nn.functional.gelu(y))
table = torch.cat(outputs, dim=1)[:, :plan["table_shape"][1]].to(emb.dtype if plan["dtype"] == "F32" else
                                                                   tensors[plan["embedding"]].dtype).contiguous()
out.mkdir()
for i, (file, contents) in enumerate(files.items()):
    kept = {n: t for n, t in contents.items() if n not in plan["removed"]}
    if i == 0:
        kept[plan["table"]] = table
    save_file(kept, out / file)
"""


def time_naive(plan, src: Path, work: Path, cold: bool) -> Run:
    out = work / "naive"
    known = {"embedding": plan.recipe.embedding, "folded": list(gemm_weights(plan)),
             "removed": [r.name for r in plan.removed], "table": plan.table.name,
             "table_shape": list(plan.table.ref.shape), "dtype": plan.table.ref.dtype}
    return time_step([sys.executable, "-c", NAIVE, *map(str, plan.source.shards), str(out), json.dumps(known)],
                     out, src, cold, then_sync=True)  # save_file leaves its bytes in the page cache


def gemm_weights(plan) -> dict[str, tuple[int, ...]]:
    """The matrices the fold multiplies the vocabulary's rows by: layer 0's 2-D folded weights, [out, in]."""
    return {name: shape for name, shape in plan.recipe.folded().items() if len(shape) == 2}


def gemm_shapes(plan) -> list[tuple[int, int]]:
    """(in, out) of each GEMM the fold runs."""
    return [(shape[1], shape[0]) for shape in gemm_weights(plan).values()]


def time_gemm(rows: int, shapes: list[tuple[int, int]], library: str, chunk: int = 4096) -> Run:
    """The bare float32 GEMMs over all `rows` vocabulary rows, in chunks into preallocated outputs, with numpy
    (OpenBLAS) or torch, each on all cores."""
    seconds = cpu = 0.0
    rng = np.random.default_rng(0)
    for d_in, d_out in shapes:
        w = rng.standard_normal((d_out, d_in), dtype=np.float32)
        x = rng.standard_normal((min(chunk, rows), d_in), dtype=np.float32)
        y = np.empty((x.shape[0], d_out), dtype=np.float32)
        if library == "torch":
            w, x, y = torch.from_numpy(w), torch.from_numpy(x), torch.from_numpy(y)
        mm = (lambda a, b, out: torch.mm(a, b, out=out)) if library == "torch" else np.matmul
        mm(x, w.T, out=y)  # warm-up (allocations, kernel choice)
        cpu_started, started = _cpu_self(), time.perf_counter()
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            mm(x[:n], w.T, out=y[:n])
        seconds += time.perf_counter() - started
        cpu += _cpu_self() - cpu_started
    return Run(seconds, cpu, 0)


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fastest(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds)


def measure(model: Model, work: Path, cold: bool, repeat: int, with_link: bool, with_naive: bool) -> dict:
    """Every step `repeat` times, the steps interleaved (so that a host whose speed drifts, as a shared VM's does,
    slows the floors and the conversion alike), the fastest of each kept."""
    src = work / model.name
    started = time.perf_counter()
    write_checkpoint(model, src)
    print(f"  {model.name}: checkpoint ready ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    plan = make_plan(resolve(str(src)), load_recipe(resolve(str(src))))
    shapes = gemm_shapes(plan)
    runs: dict[str, list[Run]] = {}
    for _ in range(repeat):
        steps = {
            "numpy": lambda: time_gemm(plan.table.rows, shapes, "numpy"),
            "torch": lambda: time_gemm(plan.table.rows, shapes, "torch"),
            "convert": lambda: time_convert(src, work, cold),
            "rest": lambda: time_without_gemm(src, work, cold),
            **({"naive": lambda: time_naive(plan, src, work, cold)} if with_naive else {}),
            **({"link": lambda: time_convert(src, work, cold, "--link")} if with_link else {}),
            "cp": lambda: time_copy(src, work, cold, then_sync=False),
            "cp_sync": lambda: time_copy(src, work, cold, then_sync=True),
        }
        for name, step in steps.items():
            runs.setdefault(name, []).append(step())
    best = {name: fastest(measured) for name, measured in runs.items()}
    gemm, convert, linked = fastest([best["numpy"], best["torch"]]), best["convert"], best.get("link")
    copy, copy_sync = best["cp"], best["cp_sync"]
    table = plan.table.ref.nbytes
    cores = os.cpu_count() or 1
    return {
        "model": model.name, "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
        "shards": len(plan.source.shards), "table_bytes": table, "convert_s": convert.seconds,
        "convert_link_s": linked.seconds if linked else None, "cp_s": copy.seconds, "cp_sync_s": copy_sync.seconds,
        "gemm_s": gemm.seconds, "gemm_numpy_s": best["numpy"].seconds, "gemm_torch_s": best["torch"].seconds,
        "gflop": 2 * plan.table.rows * sum(i * o for i, o in shapes) / 1e9,
        "ratio": convert.seconds / max(copy.seconds, gemm.seconds),
        "ratio_sum": convert.seconds / (copy.seconds + gemm.seconds),
        "cpu_convert": convert.cpu, "cpu_cp": copy.cpu, "cpu_gemm": gemm.cpu,
        "cpu_rest": best["rest"].cpu,
        # What no schedule on these cores beats: the GEMM's CPU plus all the conversion's other CPU, shared by the
        # cores (start-up counted as if it too ran on every core: a bound, not an estimate).
        "floor_s": max(gemm.seconds, (gemm.cpu + best["rest"].cpu) / cores),
        "naive_s": best["naive"].seconds if with_naive else None,
        "naive_rss": best["naive"].rss if with_naive else None,
        "peak_rss": convert.rss, "rss_bound": table + GIB, "rss_ok": convert.rss < table + GIB,
    }


# -- report ------------------------------------------------------------------------------------------------------

def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, numpy {np.__version__}, torch {torch.__version__} on "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}, {platform.system()} "
            f"{platform.release()}")


def markdown(rows: list[dict], cold: bool) -> str:
    link = any(r["convert_link_s"] is not None for r in rows)
    naive = any(r["naive_s"] is not None for r in rows)
    head = ("| model | source GB | shards | table MB | convert s |" + (" convert --link s |" if link else "") +
            (" naive s (peak RSS MB) |" if naive else "") +
            " cp -r s | cp -r + sync s | GEMM s: numpy / torch (GFLOP) | **convert / max(cp, GEMM)** "
            "| convert / (cp + GEMM) | CPU s: convert / cp / GEMM / rest | floor s | floor / max(cp, GEMM) "
            "| peak RSS MB | table + 1 GiB MB "
            "| RSS under bound |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['source_bytes'] / 1e9:.2f} | {r['shards']} | {r['table_bytes'] / 1e6:,.0f} "
            f"| {r['convert_s']:.1f} |" + (f" {r['convert_link_s']:.1f} |" if link else "") +
            (f" {r['naive_s']:.1f} ({r['naive_rss'] / 1e6:,.0f}) |" if naive else "") +
            f" {r['cp_s']:.1f} | {r['cp_sync_s']:.1f} | {r['gemm_numpy_s']:.1f} / {r['gemm_torch_s']:.1f} "
            f"({r['gflop']:,.0f}) "
            f"| **{r['ratio']:.2f}** | {r['ratio_sum']:.2f} "
            f"| {r['cpu_convert']:.1f} / {r['cpu_cp']:.1f} / {r['cpu_gemm']:.1f} / {r['cpu_rest']:.1f} "
            f"| {r['floor_s']:.1f} | {r['floor_s'] / max(r['cp_s'], r['gemm_s']):.2f} "
            f"| {r['peak_rss'] / 1e6:,.0f} | {r['rss_bound'] / 1e6:,.0f} | {'yes' if r['rss_ok'] else '**no**'} |")
    cache = "cold (source evicted before each step)" if cold else "warm (source read once before each step)"
    return "\n".join([f"Machine: {machine()}. Page cache: {cache}.", "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 4096-token vocabularies (a smoke run)")
    parser.add_argument("--models", default=",".join(m.name for m in MODELS if m.default),
                        help="comma-separated subset of: " + ", ".join(m.name for m in MODELS))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where checkpoints are written and kept for later runs (default: a temporary folder, "
                             "deleted afterwards)")
    parser.add_argument("--cold", action="store_true", help="evict the source from the page cache before each step")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every step N times, interleaved, and keep the fastest of each")
    parser.add_argument("--with-link", action="store_true", help="also time `convert --link`")
    parser.add_argument("--with-naive", action="store_true",
                        help="also time the naive converter (load all, one GEMM, save all), the baseline to beat")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    if TIME is None:
        sys.exit("bench_convert needs GNU time at /usr/bin/time for the peak RSS (Debian: apt-get install time)")
    wanted = args.models.split(",")
    unknown = set(wanted) - {m.name for m in MODELS}
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-", dir=os.environ.get("TMPDIR", "/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for model in (m for m in MODELS if m.name in wanted):
            if model.config["model_type"] not in REGISTRY:
                print(f"  {model.name}: skipped, this precompute_cli has no {model.config['model_type']} recipe",
                      file=sys.stderr)
                continue
            rows.append(measure(quick(model) if args.quick else model, work, args.cold, args.repeat, args.with_link,
                                args.with_naive))
            print(f"  {model.name}: done ({rows[-1]['convert_s']:.1f} s to convert)", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(rows, args.cold))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "cold": args.cold, "rows": rows}, indent=2) + "\n")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n(benchmark process itself peaked at {maxrss:,.0f} MB, outside the conversion's figure)")


if __name__ == "__main__":
    main()
