"""How strong `precompute verify` is: damage conversions in realistic ways and see whether verify fails.

    python scripts/faults.py catalogue [--json PATH] [--models qwen2,gpt_neox] [--dtypes float32,...]
    python scripts/faults.py false-alarms [--seeds 5] [--json PATH]
    python scripts/faults.py table RESULTS.json                    # the markdown table of a catalogue's --json

`catalogue` converts a tiny random model of each kind (serial GQA with biases, parallel with a fused QKV and two
LayerNorms, q/k norms with (1 + w) norms and a scaled embedding) in float32, bfloat16 and float16, injects every
fault of FAULTS that applies, and runs verify on each. `false-alarms` runs verify on fault-free conversions of the
equivalence tests' models over several seeds: any failure there is a false alarm.

Faults are injected without touching the recipes, through their public surface only (recipe_for, fold, columns,
runtime_patch): a recipe bug is the recipe's own fold run on altered inputs (a weight, the config's eps, the
embedding rows), damage is an alteration of the correct table (columns swapped, rows shifted, precision dropped);
either way the faulty table is written over the converted checkpoint's table in place.

For each case the harness records verify's verdict, the check that decided and by how much (measured / allowed:
above 1 fails), and the fault's effect on the model: the largest logit change it causes (the converted model with
the faulty table against the same model with the correct one, both run in float32, over every token of the
vocabulary), in units of the dtype's noise: the original model's own largest logit error in that dtype against its
float32 run (in float32, verify's own tolerance, 1e-4 of the largest logit). A fault above one noise unit changes
the model's output by more than the dtype itself does, so verify must fail it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's package, and the tests' tiny models
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
from tiny import build, convert  # noqa: E402

from precompute_cli import load_model  # noqa: E402
from precompute_cli.plan import make_plan  # noqa: E402
from precompute_cli.recipes import Recipe, recipe_for  # noqa: E402
from precompute_cli.source import resolve  # noqa: E402
from precompute_cli.spec import Config  # noqa: E402
from precompute_cli.st_io import from_float, read_array, read_header  # noqa: E402
from precompute_cli.verify import FLOAT32_LOGIT_TOL, VerifyResult, verify_checkpoint  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
TABLE = "precompute.table"
# The three kinds of model the issue asks for. eps 1e-5 everywhere, so that "a fixed 1e-6" is a wrong eps.
MODELS: dict[str, dict] = {
    "qwen2": dict(model_type="qwen2", rms_norm_eps=1e-5),  # serial GQA, q/k/v biases, untied embedding
    "gpt_neox": dict(model_type="gpt_neox"),  # parallel, fused per-head QKV, two LayerNorms of x
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
UNIT_OFFSET_NORMS = {"gemma3_text"}  # RMSNorm * (1 + w): the harness's own knowledge of its three models


@dataclass
class Subject:
    """A correct conversion, and what the faults are computed from (all float32, as the converter folds)."""

    name: str
    dtype: str
    src: Path
    out: Path
    recipe: Recipe
    table_dtype: str  # safetensors name
    stored: np.ndarray  # the correct table as stored, in float32
    x: np.ndarray  # the embedding rows
    weights: Callable[[str], np.ndarray]
    cache: dict = field(default_factory=dict)  # logits of the reference runs, computed once

    @property
    def columns(self) -> dict[str, tuple[int, int] | None]:
        return self.recipe.columns()

    def fold(self, weights: Callable[[str], np.ndarray] | None = None, x: np.ndarray | None = None,
             recipe: Recipe | None = None) -> np.ndarray:
        """The table the recipe's fold gives from (altered) inputs, laid out by its columns."""
        cols = (recipe or self.recipe).fold(weights or self.weights, self.x if x is None else x)
        table = np.zeros_like(self.stored)
        for name, span in self.columns.items():
            if span is not None:
                table[:, span[0]:span[1]] = cols[name]
        return table

    def layer0(self, suffix: str) -> str | None:
        """The folded tensor whose name ends with `suffix`, if the recipe folds one."""
        return next((n for n in self.recipe.folded() if n.endswith(suffix)), None)


def subject(root: Path, name: str, dtype: str, seed: int = 0, overrides: dict | None = None,
            choices: dict[str, str] | None = None) -> Subject:
    """A correct conversion of MODELS[name] (or of a tiny model with `overrides`), with the recipe's `choices`
    passed to convert as flags (mla_table -> --mla-table)."""
    src = build(root / "src", dtype=getattr(torch, dtype), seed=seed, **(overrides or MODELS[name]))
    flags = [arg for key, choice in (choices or {}).items() for arg in (f"--{key.replace('_', '-')}", choice)]
    if quiet_convert(src, root / "out", *flags) != 0:
        raise RuntimeError(f"{name} {dtype}: the conversion failed")
    recipe = recipe_for(Config.load(src / "config.json"))
    recipe.choose(**(choices or {}))
    plan = make_plan(resolve(str(src)), recipe)
    table = resolve(str(root / "out")).tensors()[TABLE]
    return Subject(name, dtype, src, root / "out", recipe, table[1].dtype, read_array(*table),
                   read_array(*plan.inputs[recipe.embedding]), plan.weights(np.float32))


def quiet_convert(src: Path, out: Path, *args: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return convert(src, out, *args)


# -- the catalogue ------------------------------------------------------------------------------------------------
def altered(base: Callable[[str], np.ndarray], changes: dict[str, Callable[[np.ndarray], np.ndarray]]):
    return lambda name: changes[name](base(name)) if name in changes else base(name)


def norm_convention(s: Subject) -> np.ndarray | None:
    """The pre-attention norm read as w where the model computes (1 + w), or as (1 + w) where it computes w."""
    norm = s.layer0("input_layernorm.weight")
    if norm is None:
        return None
    shift = -1.0 if s.name in UNIT_OFFSET_NORMS else 1.0
    return s.fold(altered(s.weights, {norm: lambda w: w + shift}))


def wrong_eps(s: Subject) -> np.ndarray | None:
    """A fixed 1e-6 where the config says otherwise."""
    data = Config.load(s.src / "config.json").data
    key = next((k for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon") if k in data), None)
    if key is None or data[key] == 1e-6:
        return None
    return s.fold(recipe=recipe_for(Config({**data, key: 1e-6}, str(s.src / "config.json"))))


def kv_swapped(s: Subject) -> np.ndarray:
    (k0, k1), (v0, v1) = s.columns["k"], s.columns["v"]
    t = s.stored.copy()
    t[:, k0:k1], t[:, v0:v1] = s.stored[:, v0:v1], s.stored[:, k0:k1]
    return t


def q_heads_reversed(s: Subject) -> np.ndarray:
    """A fused-layout split bug: the right q values, heads in the wrong order."""
    q0, q1 = s.columns["q"]
    t = s.stored.copy()
    t[:, q0:q1] = s.stored[:, q0:q1].reshape(len(t), s.recipe.spec.num_heads, -1)[:, ::-1].reshape(len(t), -1)
    return t


def missing_bias(s: Subject) -> np.ndarray | None:
    patch = s.recipe.runtime_patch()
    biases = [f"{patch.layer}.{path}.bias" for path in patch.projections.values()]
    biases = [b for b in biases if b in s.recipe.folded()]
    return s.fold(altered(s.weights, dict.fromkeys(biases, np.zeros_like))) if biases else None


def embedding_scaled(factor: Callable[[float], float]) -> Callable[[Subject], np.ndarray | None]:
    """The embedding scale applied twice (the residual holds the scaled row, which the runtime scales again, and
    q/k/v are folded from it), or not at all (q/k/v from the raw row, and so the residual the runtime sees)."""

    def make(s: Subject) -> np.ndarray | None:
        scale = s.recipe.runtime_patch().embedding_scale
        if scale == 1.0 or s.columns["residual"] is None:
            return None
        x = s.x * np.float32(factor(scale))
        return s.fold(x=x)  # the fold's residual is its input row: the runtime multiplies it by the scale

    return make


def shifted(s: Subject) -> np.ndarray:
    """Row t holds token t + 1's values."""
    return np.roll(s.stored, -1, axis=0)


def corrupted_row(s: Subject) -> np.ndarray:
    """The row of the most common token (BOS, else id 1) overwritten with noise of the same size."""
    bos = Config.load(s.src / "config.json").data.get("bos_token_id")
    row = bos if isinstance(bos, int) and 0 <= bos < len(s.stored) else 1
    t = s.stored.copy()
    rng = np.random.default_rng(row)
    t[row] = rng.standard_normal(t.shape[1]).astype(np.float32) * s.stored[row].std()
    return t


def residual_zeroed(s: Subject) -> np.ndarray | None:
    span = s.columns["residual"]
    if span is None or s.recipe.spec.block != "parallel":
        return None
    t = s.stored.copy()
    t[:, span[0]:span[1]] = 0
    return t


def ffn_wrong_norm(s: Subject) -> np.ndarray | None:
    """A parallel FFN folded from the attention's norm instead of its own."""
    own = [n for n in s.recipe.folded() if ".post_attention_layernorm." in n]
    if s.recipe.spec.block != "parallel" or not own:
        return None
    attention = {n: n.replace(".post_attention_layernorm.", ".input_layernorm.") for n in own}
    return s.fold(lambda name: s.weights(attention.get(name, name)))


def round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """x (float32) rounded to nearest even with `bits` explicit mantissa bits (7 = bfloat16's, 3 = float8 e4m3's)."""
    drop = 23 - bits
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + ((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) >> drop << drop
    return u.astype(np.uint32).view(np.float32)


LOWER = {"F32": 7, "F16": 7, "BF16": 3}  # stored as the dtype says, rounded as bfloat16 (float8 for bf16) does


def lower_precision(s: Subject) -> np.ndarray:
    return round_mantissa(s.stored, LOWER[s.table_dtype])


@dataclass(frozen=True)
class Fault:
    name: str
    kind: str  # "recipe bug" or "damage"
    make: Callable[[Subject], np.ndarray | None]  # the faulty table, or None where the fault cannot happen


FAULTS = (
    Fault("norm read as w / (1 + w)", "recipe bug", norm_convention),
    Fault("eps 1e-6 instead of the config's", "recipe bug", wrong_eps),
    Fault("k and v columns swapped", "recipe bug", kv_swapped),
    Fault("q heads in the wrong order", "recipe bug", q_heads_reversed),
    Fault("q/k/v bias missing", "recipe bug", missing_bias),
    Fault("embedding scale applied twice", "recipe bug", embedding_scaled(lambda s: s)),
    Fault("embedding scale not applied", "recipe bug", embedding_scaled(lambda s: 1 / s)),
    Fault("table shifted by one token", "damage", shifted),
    Fault("one common token's row corrupted", "damage", corrupted_row),
    Fault("residual columns zeroed (parallel)", "recipe bug", residual_zeroed),
    Fault("FFN folded from the attention's norm (parallel)", "recipe bug", ffn_wrong_norm),
    Fault("table rounded below its dtype", "damage", lower_precision),
)
FAULT_BY_NAME = {f.name: f for f in FAULTS}


def inject(s: Subject, table: np.ndarray, dest: Path) -> Path:
    """A copy of the correct conversion whose table holds `table` (rounded to the table's dtype)."""
    shutil.copytree(s.out, dest)
    for shard in sorted(dest.glob("*.safetensors")):
        info = read_header(shard).tensors.get(TABLE)
        if info is not None:
            data = from_float(np.ascontiguousarray(table, dtype=np.float32), s.table_dtype).tobytes()
            assert len(data) == info.nbytes
            with open(shard, "r+b") as f:
                f.seek(info.start)
                f.write(data)
            return dest
    raise RuntimeError(f"{s.out}: no shard holds {TABLE}")


# -- measuring ----------------------------------------------------------------------------------------------------
def vocabulary_probe(vocab: int, length: int = 16) -> torch.Tensor:
    """Every token of the vocabulary at least once, in sequences of `length`."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(vocab, generator=g)
    extra = (-vocab) % length
    return torch.cat([ids, torch.randint(0, vocab, (extra,), generator=g)]).reshape(-1, length)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def noise(s: Subject) -> tuple[torch.Tensor, float, float]:
    """The float32 original's logits over the vocabulary probe, its largest |logit|, and the dtype's noise: the
    original's own largest error in that dtype (float32: verify's tolerance), both relative to that logit."""
    if "noise" not in s.cache:
        from transformers import AutoModelForCausalLM

        ids = vocabulary_probe(s.recipe.spec.vocab_size)
        ref = _logits(AutoModelForCausalLM.from_pretrained(s.src, dtype=torch.float32).eval(), ids)
        scale = ref.abs().max().item()
        if s.dtype == "float32":
            own = FLOAT32_LOGIT_TOL
        else:
            low = AutoModelForCausalLM.from_pretrained(s.src, dtype=getattr(torch, s.dtype)).eval()
            own = (_logits(low, ids) - ref).abs().max().item() / scale
        correct = _logits(load_model(s.out, dtype=torch.float32), ids)
        s.cache["noise"] = (ids, correct, scale, own)
    return s.cache["noise"]


def effect(s: Subject, faulty: Path) -> tuple[float, float]:
    """The fault's largest logit change relative to the largest logit, and that in units of the dtype's noise."""
    ids, correct, scale, own = noise(s)
    change = (_logits(load_model(faulty, dtype=torch.float32), ids) - correct).abs().max().item() / scale
    return change, change / own


RUN_CHECKS = ("logits", "logits, mean error", "logits, max error")  # continuous; top-1 and greedy are counts


def margins(result: VerifyResult) -> tuple[float, float]:
    """measured / allowed (above 1 fails) of the table-row check, and of the worst logit check of the runs."""
    ratio = {c.name: c.measured / c.allowed for c in result.checks if c.measured is not None and c.allowed}
    return ratio["table rows"], max(ratio[n] for n in RUN_CHECKS if n in ratio)


@dataclass(frozen=True)
class Outcome:
    model: str
    dtype: str
    fault: str
    kind: str
    applies: bool
    change: float | None = None  # largest logit change / largest logit
    noise: float | None = None  # the dtype's own, the same way
    above_noise: bool | None = None
    passed: bool | None = None  # verify's verdict
    failed_checks: tuple[str, ...] = ()
    rows_margin: float | None = None  # the table-row check's measured / allowed (above 1 fails)
    runs_margin: float | None = None  # the worst logit check's


def run_fault(s: Subject, fault: Fault, work: Path) -> Outcome:
    table = fault.make(s)
    if table is None:
        return Outcome(s.name, s.dtype, fault.name, fault.kind, False)
    faulty = inject(s, table, work / fault.name.replace(" ", "_").replace("/", "_"))
    change, units = effect(s, faulty)
    result = verify_checkpoint(resolve(str(s.src)), resolve(str(faulty)), dtype=s.dtype)
    shutil.rmtree(faulty)
    return Outcome(s.name, s.dtype, fault.name, fault.kind, True, change, noise(s)[3], units > 1, result.passed,
                   tuple(c.name for c in result.checks if c.passed is False), *margins(result))


def catalogue(models: list[str], dtypes: list[str], faults: list[Fault], log=print) -> list[Outcome]:
    outcomes = []
    for name in models:
        for dtype in dtypes:
            with tempfile.TemporaryDirectory() as tmp:
                s = subject(Path(tmp), name, dtype)
                for fault in faults:
                    outcome = run_fault(s, fault, Path(tmp))
                    outcomes.append(outcome)
                    log(f"{name:12} {dtype:9} {fault.name:48} {cell_text(outcome)}")
    return outcomes


def cell_text(o: Outcome) -> str:
    if not o.applies:
        return "n/a"
    verdict = "pass" if o.passed else "FAIL: " + ", ".join(o.failed_checks)
    missed = " MISSED" if o.passed and o.above_noise else ""
    return (f"{o.change / o.noise:.3g} noise; {verdict}{missed} (rows {o.rows_margin:.3g}, "
            f"runs {o.runs_margin:.3g} of the limit)")


def markdown(outcomes: list[Outcome]) -> str:
    """One row per fault and model (where it applies), one column per dtype: the fault's effect in noise units, then
    verify's verdict with the table-row check's and the runs' worst measured / allowed (above 1 fails)."""
    dtypes = [d for d in DTYPES if any(o.dtype == d for o in outcomes)]
    by = {(o.fault, o.model, o.dtype): o for o in outcomes}
    lines = ["| fault | model | " + " | ".join(dtypes) + " |", "|---|---|" + "---|" * len(dtypes)]
    for fault in dict.fromkeys(o.fault for o in outcomes):
        for model in dict.fromkeys(o.model for o in outcomes):
            cells = [by.get((fault, model, d)) for d in dtypes]
            if any(c is not None and c.applies for c in cells):
                lines.append(f"| {fault} | {model} | " + " | ".join(short_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def summary(outcomes: list[Outcome]) -> str:
    """One row per fault, one column per dtype, over the models it applies to: how many fail verify, the smallest
    effect among those above the noise, and the smallest margins of the failures (the README's table)."""
    dtypes = [d for d in DTYPES if any(o.dtype == d for o in outcomes)]
    lines = ["| fault | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    for fault in dict.fromkeys(o.fault for o in outcomes):
        cells = []
        for d in dtypes:
            group = [o for o in outcomes if o.fault == fault and o.dtype == d and o.applies]
            failed = [o for o in group if not o.passed]
            text = f"{len(failed)}/{len(group)} fail"
            if failed:
                text += (f", effect ≥ {number(min(o.change / o.noise for o in failed))}, "
                         f"rows ≥ ×{number(min(o.rows_margin for o in failed))}")
            passed = [o for o in group if o.passed]
            if passed:
                worst = max(o.change / o.noise for o in passed)
                text += f"; {len(passed)} pass{' **above the noise**' if worst > 1 else ''} (effect ≤ {number(worst)})"
            cells.append(text)
        lines.append(f"| {fault} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_cell(o: Outcome | None) -> str:
    if o is None or not o.applies:
        return "n/a"
    units = o.change / o.noise
    verdict = "pass" + (" **MISSED**" if o.above_noise else "") if o.passed else "**FAIL**"
    return f"{number(units)}: {verdict} (rows {number(o.rows_margin)}, runs {number(o.runs_margin)})"


def number(x: float) -> str:
    if math.isinf(x):
        return "∞"
    if x >= 1000:
        return f"{x:.1e}".replace("e+0", "e").replace("e+", "e")
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def load_outcomes(path: Path) -> list[Outcome]:
    return [Outcome(**{**d, "failed_checks": tuple(d["failed_checks"])}) for d in json.loads(path.read_text())]


# -- false alarms -------------------------------------------------------------------------------------------------
def equivalence_cases() -> dict[str, tuple[dict, tuple[str, ...]]]:
    """The equivalence tests' models (overrides of tiny.build), each in every dtype; with the parallel MoE model
    the tests define (registered here as its test module's fixture does)."""
    import test_attention_zoo as zoo
    import test_falcon_bloom_mpt as fbm
    import test_llama_family as llama
    import test_mixer_families as mixers
    import test_mla as mla
    import test_parallel_families as par
    import test_parallel_moe as moe
    import test_serial_families as ser
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    from precompute_cli.recipes.base import register

    AutoConfig.register(moe.MODEL_TYPE, moe.ParallelMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(moe.ParallelMoeConfig, moe.ParallelMoeForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(moe.MODEL_TYPE, get_checkpoint_conversion_mapping("qwen2_moe"),
                                           overwrite=True)
    register(moe.ParallelMoeRecipe)
    cases = {name: value for module in (llama, par, fbm, mixers) for name, value in module.CASES.items()}
    cases.update({name: value[0] for module in (ser, zoo) for name, value in module.CASES.items()})
    cases.update({name: {**mla.MLA, **value} for name, value in mla.CASES.items()})  # the default (latent) table
    cases["parallel-moe"] = dict(model_type=moe.MODEL_TYPE, norm_topk_prob=True, **moe.SIZES)
    return {name: (overrides, DTYPES) for name, overrides in cases.items()}


def false_alarms(seeds: int, cases: dict[str, tuple[dict, tuple[str, ...]]], log=print) -> list[dict]:
    results = []
    for name, (overrides, dtypes) in cases.items():
        for dtype in dtypes:
            for seed in range(seeds):
                with tempfile.TemporaryDirectory() as tmp:
                    src = build(Path(tmp) / "src", dtype=getattr(torch, dtype), seed=seed, **overrides)
                    if quiet_convert(src, Path(tmp) / "out") != 0:
                        raise RuntimeError(f"{name} {dtype} seed {seed}: the conversion failed")
                    result = verify_checkpoint(resolve(str(src)), resolve(str(Path(tmp) / "out")), dtype=dtype,
                                               seed=seed)
                rows, runs = margins(result)
                results.append(dict(case=name, dtype=dtype, seed=seed, passed=result.passed, rows_margin=rows,
                                    runs_margin=runs, routing_differs=result.routing_differs,
                                    failure=result.failure))
                log(f"{name:28} {dtype:9} seed {seed}: {'pass' if result.passed else 'FALSE ALARM'} "
                    f"(rows {rows:.2f}, runs {runs:.2f} of the limit; routing differs at "
                    f"{result.routing_differs} of {result.positions} positions)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cat = sub.add_parser("catalogue", help="every fault, model and dtype")
    cat.add_argument("--models", default=",".join(MODELS))
    cat.add_argument("--dtypes", default=",".join(DTYPES))
    cat.add_argument("--json", type=Path)
    fa = sub.add_parser("false-alarms", help="fault-free conversions of the equivalence models over seeds")
    fa.add_argument("--seeds", type=int, default=5)
    fa.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    fa.add_argument("--dtypes", default=",".join(DTYPES))
    fa.add_argument("--json", type=Path)
    tab = sub.add_parser("table", help="the markdown table of a catalogue's --json")
    tab.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.command == "table":
        outcomes = load_outcomes(args.results)
        print(summary(outcomes), markdown(outcomes), sep="\n\n")
        return 0
    if args.command == "catalogue":
        outcomes = catalogue(args.models.split(","), args.dtypes.split(","), list(FAULTS))
        print(markdown(outcomes))
        missed = [o for o in outcomes if o.applies and o.above_noise and o.passed]
        print(f"{sum(o.applies for o in outcomes)} cases, {len(missed)} above the noise missed "
              f"({time.perf_counter() - start:.0f} s)")
        if args.json:
            args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
        return 1 if missed else 0
    cases = equivalence_cases()
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    dtypes = set(args.dtypes.split(","))
    cases = {k: (o, tuple(d for d in ds if d in dtypes)) for k, (o, ds) in cases.items()}
    results = false_alarms(args.seeds, cases)
    alarms = [r for r in results if not r["passed"]]
    print(f"{len(alarms)} false alarms in {len(results)} fault-free verifications "
          f"({len(cases)} models, {args.seeds} seeds; {time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if alarms else 0


if __name__ == "__main__":
    raise SystemExit(main())
