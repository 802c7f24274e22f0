"""What the trick buys at run time: decode speed and time to first token, original vs converted, beside the saving
that the paper's read counts predict.

For a 4-layer parallel model (GPT-NeoX-shaped, Pythia-1.4B widths, d=2048) and a 4-layer serial one (Llama-3.2-1B
widths, d=2048) with synthetic float32 weights: the original is loaded with transformers, the converted one with
`precompute_cli.load_model`, and both have their weights copied out of the file mapping into aligned memory
(`in_memory`: file layouts differ, and misaligned weights run slower). Both run `generate` (greedy, exactly N new
tokens) from a 32-token prompt at batch 1 and 16, alternating original and converted runs so drift hits both
alike. A logits processor that only reads the clock times every token inside generate: time to first token is the
median over runs, the decode step the median over every step of every run (tokens/s = batch / step).

Predicted saving: the fraction of one decode step's weight reads that the table removes. Per step a model reads
every weight matrix once (the output head included) but only B rows of the input embedding, so
  predicted = (eliminated + B*d - B*table_width) / (weights read per step + B*d)
with `eliminated` = report.linear_weights (layer 0's Q, K, V, and its FFN when parallel) and the weights read per
step = report.estimated_params minus the input embedding when it is not tied to the head.

--profile times every decoder layer and the output head inside the decode steps (forward hooks), to show where
the time the read count ignores goes (attention, the framework, the head).

    python scripts/bench_decode.py            # 32 new tokens, 5 runs each
    python scripts/bench_decode.py --quick    # 8 new tokens, 2 runs each, 8192-token vocabularies
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import LLAMA_32_1B, PYTHIA_14B, Model, machine, write_checkpoint  # noqa: E402

from precompute_cli import load_model  # noqa: E402
from precompute_cli.plan import load_recipe  # noqa: E402
from precompute_cli.report import estimated_params, linear_weights  # noqa: E402
from precompute_cli.source import resolve  # noqa: E402

MODELS = [
    Model("parallel: gpt_neox 4L d=2048", PYTHIA_14B, "float32", 4, None),
    Model("serial: llama 4L d=2048", LLAMA_32_1B, "float32", 4, None),
]
PROMPT = 32


def predicted_saving(spec, batch: int, table_width: int) -> float:
    parallel = spec.block == "parallel"
    eliminated = linear_weights(spec, parallel)
    per_step = estimated_params(spec) - (0 if spec.tied_embeddings else spec.vocab_size * spec.hidden_size)
    d = spec.hidden_size
    return (eliminated + batch * d - batch * table_width) / (per_step + batch * d)


class LayerTimer:
    """Wall time spent in each decoder layer and the head during generate (hooks; the same cost in both models)."""

    def __init__(self, model, layers_path: str):
        self.totals: dict[str, float] = {}
        self.handles = []
        modules = dict(model.get_submodule(layers_path).named_children())
        modules["head"] = model.get_output_embeddings()
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._start))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        self._t0 = 0.0

    def _start(self, module, args):
        self._t0 = time.perf_counter()

    def _stop(self, name):
        def hook(module, args, output):
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - self._t0
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class Clock:
    """A logits processor that only notes the time: generate calls it once per new token, after each forward."""

    def __init__(self) -> None:
        self.ticks: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.ticks.append(time.perf_counter())
        return scores


def generate_timed(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float], float]:
    """(time to first token, the N-1 decode step times, whole call): one greedy generate of exactly N tokens."""
    from transformers import LogitsProcessorList

    clock = Clock()
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([clock]))
        total = time.perf_counter() - started
    ticks = clock.ticks
    return ticks[0] - started, [b - a for a, b in zip(ticks, ticks[1:], strict=False)], total


def generate_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    return generate_timed(model, ids, new_tokens)[2]


def measure(models: dict, batch: int, vocab: int, new_tokens: int, runs: int) -> dict:
    """Median time to first token over runs, median decode step over every step of every run, per model."""
    ids = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    ttft: dict[str, list[float]] = {k: [] for k in models}
    steps: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up: allocator, kernels, caches
        generate_timed(m, ids, 2)
    for _ in range(runs):
        for k, m in models.items():
            first, step_times, _ = generate_timed(m, ids, new_tokens)
            ttft[k].append(first)
            steps[k] += step_times
    out = {}
    for k in models:
        step = statistics.median(steps[k])
        out[k] = {"ttft_s": statistics.median(ttft[k]), "step_s": step, "tokens_per_s": batch / step}
    return out


def profile(models: dict, layers_path: str, vocab: int, new_tokens: int, runs: int) -> dict:
    """Seconds inside each module during one batch-1 generate: the median over `runs`, models alternating."""
    ids = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    for _ in range(runs):
        for k, m in models.items():
            timer = LayerTimer(m, layers_path)
            seconds = generate_seconds(m, ids, new_tokens)
            timer.remove()
            for name, value in {"total_s": seconds, **timer.totals}.items():
                samples[k].setdefault(name, []).append(value)
    return {k: {name: statistics.median(v) for name, v in per.items()} for k, per in samples.items()}


def in_memory(model):
    """Move every weight from the safetensors mapping transformers leaves it in to aligned anonymous memory.

    Mapped weights sit at whatever offset their file gives them (any multiple of 8 bytes), and a batch-16 decode
    step on misaligned matrices is several per cent slower: without this, the two files' layouts, not the
    table, would decide part of the difference. Tied weights stay tied (parameters() yields each once)."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def bench_model(model: Model, work: Path, batches: list[int], new_tokens: int, runs: int, want_profile: bool):
    src, out = work / f"src-{model.config['model_type']}", work / f"out-{model.config['model_type']}"
    if write_checkpoint(model, src) or not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "precompute_cli", "convert", str(src), str(out), "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(resolve(str(src)))
    spec = recipe.spec
    width = sum(stop - start for start, stop in (s for s in recipe.columns().values() if s))
    models = {
        "original": in_memory(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()),
        "converted": in_memory(load_model(out, dtype=torch.float32)),
    }
    rows = []
    for batch in batches:
        got = measure(models, batch, spec.vocab_size, new_tokens, runs)
        o, c = got["original"], got["converted"]
        predicted = predicted_saving(spec, batch, width)
        measured = 1 - c["step_s"] / o["step_s"]
        rows.append({
            "model": model.name, "batch": batch, "tps_orig": o["tokens_per_s"], "tps_conv": c["tokens_per_s"],
            "ttft_orig": o["ttft_s"], "ttft_conv": c["ttft_s"], "ttft_saving": 1 - c["ttft_s"] / o["ttft_s"],
            "measured": measured, "predicted": predicted, "fraction": measured / predicted if predicted else None,
        })
    prof = profile(models, recipe.runtime_patch().layer.rsplit(".", 1)[0], spec.vocab_size, new_tokens, runs) \
        if want_profile else None
    return rows, prof


def markdown(rows: list[dict]) -> str:
    head = ("| model | batch | tokens/s original | tokens/s converted | decode saving measured | predicted (reads) "
            "| measured / predicted | TTFT original ms | TTFT converted ms | TTFT saving |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['tps_orig']:.1f} | {r['tps_conv']:.1f} | {100 * r['measured']:.1f}% "
            f"| {100 * r['predicted']:.1f}% | {r['fraction']:.2f} | {1000 * r['ttft_orig']:.0f} "
            f"| {1000 * r['ttft_conv']:.0f} | {100 * r['ttft_saving']:.1f}% |")
    return "\n".join(lines)


def profile_markdown(name: str, prof: dict) -> str:
    names = [k for k in prof["original"] if k != "total_s"]
    head = "| " + name + " | total s | " + " | ".join(f"layer {n}" if n.isdigit() else n for n in names) + \
           " | outside layers and head |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k, p in prof.items():
        inside = sum(p.get(n, 0.0) for n in names)
        lines.append(f"| {k} | {p['total_s']:.2f} | " + " | ".join(f"{p.get(n, 0.0):.3f}" for n in names) +
                     f" | {p['total_s'] - inside:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 2 runs, 8192-token vocabularies")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generate run")
    parser.add_argument("--runs", type=int, default=5, help="runs per model and batch (median kept)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--profile", action="store_true", help="also time each layer and the head (batch 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here for later runs")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.runs = 8, 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-decode-", dir=os.environ.get("TMPDIR", "/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    from precompute_cli.recipes import REGISTRY

    rows, profiles = [], []
    try:
        for model in MODELS:
            if model.config["model_type"] not in REGISTRY:
                print(f"  {model.name}: skipped, no {model.config['model_type']} recipe", file=sys.stderr)
                continue
            if args.quick:
                model = Model(model.name + " (quick)", {**model.config, "vocab_size": 8192}, model.dtype,
                              model.layers, None)
            started = time.perf_counter()
            got, prof = bench_model(model, work, [int(b) for b in args.batches.split(",")], args.tokens, args.runs,
                                    args.profile)
            rows += got
            if prof:
                profiles.append((model.name, prof))
            print(f"  {model.name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Machine: {machine()}. float32 weights, {PROMPT}-token prompt, {args.tokens} new tokens (greedy), "
          f"median of {args.runs} runs.\n")
    print(markdown(rows))
    for name, prof in profiles:
        print(f"\nSeconds inside each module during one batch-1 generate (median of {args.runs}):\n")
        print(profile_markdown(name, prof))


if __name__ == "__main__":
    main()
