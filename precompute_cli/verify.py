"""The numeric proof that a converted checkpoint computes what its original computes.

Two kinds of evidence. The model runs: the converted model (load_model) and the original (transformers) see the
same inputs (ids covering the vocabulary's start, middle and end, a left-padded batch, a greedy generation) and
their logits are compared. The table itself: rows are recomputed by the original model's own layer 0 in float64
(transformers' modules, hooked where the runtime stands in for them: oracle_rows), never by the recipe's fold (a
routed attention aside: oracle_covers), so a recipe bug shows as a wrong row as surely as a damaged table does,
whatever precision the runs had. The rows checked: every token the runs used, BOS/EOS/padding, the vocabulary's
edges and a random sample (or, with all_rows, every row).

Tolerances depend on the precision in play (the run's dtype or the table's, whichever is lower). In float32 the
converted model must match the original's float32 run to FLOAT32_LOGIT_TOL and generate the same greedy text.
In bfloat16/float16 the table must not cost precision the model did not already lose: the converted model may be
no further from the original's float32 run than the original itself is when run in that precision. Lower precision
also flips discontinuities (MoE routing) at a few positions by chance, so those criteria leave out every position
from a routing flip (read with hooks on the routers) to the end of its row, and set aside the worst LOSSY_OUTLIERS
of the rest; the float64 row check, which covers every token the runs used, keeps them honest.
Models load one at a time, so verifying needs the memory of one model.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from precompute_cli.block import PrecomputeBlock, is_converted
from precompute_cli.errors import InputError
from precompute_cli.plan import Plan, load_recipe, make_plan
from precompute_cli.recipes import ops
from precompute_cli.source import Source
from precompute_cli.spec import Config
from precompute_cli.st_io import NAME_TO_ST, TensorInfo, read_array

if TYPE_CHECKING:  # torch is imported where models run: `convert` imports this module and must not load torch
    import torch

    from precompute_cli.recipes import Recipe
    from precompute_cli.recipes.base import Routers

# -- tolerances (the README quotes these) -------------------------------------------------------------------------
FLOAT32_LOGIT_TOL = 1e-4  # float32: max |converted - original| / max |original logit|; granted in every mode
LOSSY_MEAN_RATIO = 1.25  # lower precision: mean |converted - float32 original| <= 1.25 x the original's own ...
LOSSY_MAX_RATIO = 2.0  # ... and the largest such error <= 2 x the original's own largest
# ... after setting aside each model's worst 10% of positions (at least one). Low precision flips MoE routing at a
# random few positions, each a jump in the logits; with 5% set aside a tiny Qwen3-MoE in bfloat16 failed (six jumps
# in 60 positions against the original's none: scripts/faults.py false-alarms). The table-row check, exact, is what
# catches damage to a few rows.
LOSSY_OUTLIERS = 0.10
# MoE: the error criteria compare only positions where every router picked the same experts in the converted run as
# in the original's own low-precision run, here and at every earlier position of the same row (a flip is a jump in
# one run's error that attention carries to the row's later positions). When fewer than a quarter of the positions
# are left, the routing is too far apart for rounding: then every position is compared.
ROUTED_ALIKE_MIN = 0.25
# Rounding unit (machine epsilon) of each table dtype: a stored value may differ from the exact one by half of it,
# relative to its row's scale; the other half is room for the float32 arithmetic of the fold.
ROUNDING_UNIT = {"F64": 2.0**-52, "F32": 2.0**-23, "BF16": 2.0**-7, "F16": 2.0**-10}
TABLE_COMPUTE_SLACK = 1e-5  # the fold's float32 accumulation, relative to a row's scale

RUN_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_TOKENS = 16
DEFAULT_PROMPT = "The first layer of a transformer"
PROBE_SHAPE = (2, 16)  # each of the two probe batches
TABLE_SAMPLE = 64  # random table rows checked besides the edges and every token the runs used
ROW_CHUNK = 1024  # table rows recomputed at a time (--all-rows: the whole vocabulary, a chunk at a time)


def table_tolerance(table_dtype: str) -> float:
    """Largest allowed |stored - float64| / row scale for a table stored in `table_dtype` (safetensors name)."""
    return ROUNDING_UNIT[table_dtype] + TABLE_COMPUTE_SLACK


def criterion_dtype(run_dtype: str, table_dtype: str) -> str:
    """The lowest precision in play: the run's or the table's, whichever has the larger rounding unit."""
    table_name = {st: name for name, st in NAME_TO_ST.items()}[table_dtype]
    lowest = max((run_dtype, table_name), key=lambda n: ROUNDING_UNIT[NAME_TO_ST[n]])
    return "float32" if lowest == "float64" else lowest


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: reported, not judged
    value: str  # what was measured
    limit: str  # what was allowed
    measured: float | None = None  # the number judged, and the largest that passes (margins: scripts/faults.py)
    allowed: float | None = None


@dataclass(frozen=True)
class VerifyResult:
    """Everything verify measured, as a plain value (the CLI, convert-all and model cards render it).

    Logit differences are against the original's float32 run; "own" numbers are the original's own run in the
    criterion dtype (lower precision only); "trimmed" numbers set aside the `outliers` worst positions."""

    original: str
    converted: str
    dtype: str  # the converted model ran in this dtype
    table_dtype: str
    criterion: str  # "float32", or the lower precision whose own error the converted model may have
    positions: int  # logit positions compared (both probe batches, padding left out)
    outliers: int  # decisive top-1 flips allowed (0 in float32)
    routing_differs: int  # positions left out: MoE routing differs from the own run's there or earlier in the row
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / the largest |logit| of the original's float32 run
    mean_abs_diff: float
    trimmed_mean_abs_diff: float
    trimmed_max_abs_diff: float
    own_trimmed_mean_abs_diff: float | None
    own_trimmed_max_abs_diff: float | None
    top1_agreement: float  # fraction of positions whose argmax is the float32 original's
    own_top1_agreement: float | None
    top1_decisive_flips: int  # disagreements the allowed error cannot explain
    greedy_identical: bool  # converted vs the original's float32 run
    greedy_original: list[int]  # new tokens
    greedy_converted: list[int]
    prompt: str | None  # the text prompt, or None when generation started from token ids
    table_row_error: float  # worst |stored - float64| / row scale
    table_row_tolerance: float
    table_worst_row: int
    table_rows_checked: int
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failure(self) -> str | None:
        """One sentence naming the failed checks, or None."""
        failed = [f"{c.name} ({c.value}; allowed {c.limit})" for c in self.checks if c.passed is False]
        if not failed:
            return None
        return f"{self.converted} does not verify against {self.original}: " + "; ".join(failed)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "failure": self.failure}


# -- inputs and runs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """The inputs every model sees."""

    ids: torch.Tensor  # (batch, length), no padding
    padded: torch.Tensor  # (batch, length), the last row left-padded
    mask: torch.Tensor  # attention mask of `padded`
    prompt_ids: torch.Tensor  # (1, length): where greedy generation starts
    pad_id: int

    def tokens(self) -> set[int]:
        return {*self.ids.flatten().tolist(), *self.padded[self.mask.bool()].tolist(),
                *self.prompt_ids.flatten().tolist()}


def edges(vocab: int) -> list[int]:
    """The vocabulary's first, middle and last three ids."""
    mid = vocab // 2
    return sorted({i for i in (0, 1, 2, mid - 1, mid, mid + 1, vocab - 3, vocab - 2, vocab - 1) if 0 <= i < vocab})


def make_probe(vocab: int, seed: int, prompt_ids: torch.Tensor | None = None, pad_id: int = 0) -> Probe:
    """Random ids with the vocabulary's edges among them at shuffled positions, and a left-padded batch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, n = PROBE_SHAPE
    fixed = torch.tensor(edges(vocab))
    ids = torch.cat([fixed, torch.randint(0, vocab, (b * n - len(fixed),), generator=g)])
    ids = ids[torch.randperm(b * n, generator=g)].reshape(b, n)
    padded = torch.randint(0, vocab, (b, n), generator=g)
    mask = torch.ones_like(padded)
    mask[-1, : n // 4] = 0
    padded[mask == 0] = pad_id
    return Probe(ids, padded, mask, ids[:1, :6] if prompt_ids is None else prompt_ids, pad_id)


@dataclass(frozen=True)
class Run:
    logits: torch.Tensor  # (positions, vocab) float32: the unpadded batch, then the padded batch's real tokens
    greedy: list[int]  # new tokens
    routing: torch.Tensor | None = None  # (positions, choices): every MoE router's experts per position, sorted
    sequence: torch.Tensor | None = None  # (positions,): the probe row each position belongs to, in order


def run_model(model: torch.nn.Module, probe: Probe, tokens: int, routers: Routers | None = None) -> Run:
    """The model's logits on both probe batches and its greedy tokens; with `routers` (the recipe's
    Recipe.routers), also the experts every router picked at every position."""
    import torch

    with torch.no_grad(), _routing(model, routers) as routes:
        plain = model(probe.ids).logits.float().flatten(0, 1)
        plain_routes = _positions(routes, probe.ids.shape, None)
        padded = model(probe.padded, attention_mask=probe.mask).logits.float()[probe.mask.bool()]
        padded_routes = _positions(routes, probe.padded.shape, probe.mask.bool())
    with torch.no_grad():
        out = model.generate(probe.prompt_ids, attention_mask=torch.ones_like(probe.prompt_ids),
                             max_new_tokens=tokens, do_sample=False, pad_token_id=probe.pad_id)
    routing = torch.cat([plain_routes, padded_routes]) if plain_routes is not None else None
    rows = torch.arange(probe.ids.shape[0] + probe.padded.shape[0])
    sequence = torch.cat([rows[:probe.ids.shape[0], None].expand(probe.ids.shape).flatten(),
                          rows[probe.ids.shape[0]:, None].expand(probe.padded.shape)[probe.mask.bool()]])
    return Run(torch.cat([plain, padded]), out[0, probe.prompt_ids.shape[1]:].tolist(), routing, sequence)


@contextmanager
def _routing(model: torch.nn.Module, routers: Routers | None):
    """The experts every MoE router picks, where the recipe says its routers are (Recipe.routers; the runtime never
    replaces one it names): a routing flip is a discontinuity low precision causes at random positions, so the
    criteria compare positions where the converted model and the original routed alike."""
    import torch

    routes: list[torch.Tensor] = []

    def record(module, args, output):
        values = output if isinstance(output, tuple) else (output,)
        if routers.top_k is not None:  # logits: the experts are their top k
            logits = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
            if logits:
                routes.append(logits[-1].detach().topk(routers.top_k, dim=-1).indices.sort(-1).values)
            return
        for value in values:
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dim() >= 1:
                routes.append(value.detach().sort(-1).values)

    handles = [] if routers is None else [
        m.register_forward_hook(record) for path, m in model.named_modules() if routers.matches(path, type(m).__name__)]
    try:
        yield routes
    finally:
        for h in handles:
            h.remove()


def _positions(routes: list, shape: tuple[int, ...], mask) -> torch.Tensor | None:
    """The recorded routes of one forward pass as (positions, choices), padding left out; emptied for the next."""
    import torch

    tokens = shape[0] * shape[1]
    kept = [r.reshape(tokens, -1) for r in routes if r.numel() % tokens == 0 and r.numel() > 0]
    routes.clear()
    if not kept:
        return None
    flat = torch.cat(kept, dim=-1)
    return flat if mask is None else flat.reshape(*shape, -1)[mask]


# -- the table ----------------------------------------------------------------------------------------------------
def locate_table(plan: Plan, converted: Source, block: PrecomputeBlock) -> tuple[Path, TensorInfo]:
    """Where CONVERTED's table is, after checking it has the layout ORIGINAL's recipe folds to."""
    found = converted.tensors().get(block.table)
    if found is None:
        raise InputError(f"{converted.ref}: the config names table {block.table}, but no shard holds it")
    path, info = found
    if info.shape != plan.table.ref.shape or block.columns != plan.recipe.columns():
        raise InputError(f"{path}: table {info.name} has shape {list(info.shape)} and columns {block.columns}, "
                         f"but {plan.source.ref} folds to {list(plan.table.ref.shape)} with {plan.recipe.columns()} "
                         "(converted from another model?)")
    return found


def runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted `rows` as [start, stop) runs of consecutive ids, each read from a file at once."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def table_row_error(table: tuple[Path, TensorInfo], columns: dict[str, tuple[int, int] | None],
                    exact: dict[str, np.ndarray], rows: list[int]) -> tuple[float, int]:
    """Worst |stored - reference| / row scale over `rows` (each column group scaled on its own), and the row where
    it is. `exact` holds the reference columns for `rows` (oracle_rows: transformers' own modules, in float64)."""
    stored = np.concatenate([read_array(*table, run, np.float64) for run in runs(rows)])
    worst, worst_row = 0.0, rows[0]
    for name, span in columns.items():
        if span is None:
            continue
        ref, got = exact[name], stored[:, span[0]:span[1]]
        scale = np.abs(ref).max(-1)
        scale = np.maximum(scale, 1e-6 * np.median(scale) + 1e-300)  # an all-zero row (a zeroed pad token)
        with np.errstate(invalid="ignore", over="ignore"):  # inf or NaN rows: reported as an infinite error
            err = np.nan_to_num(np.abs(got - ref).max(-1) / scale, nan=math.inf)
        i = int(err.argmax())
        if err[i] > worst:
            worst, worst_row = float(err[i]), rows[i]
    return worst, worst_row


class _Stop(Exception):
    """Raised once layer 0 has run: the oracle needs nothing after it."""


def oracle_covers(recipe: Recipe) -> bool:
    """Whether oracle_rows reads every column of this recipe's table off transformers' modules: the residual, and
    the outputs of the projections the runtime stands in for (RuntimePatch.projections and .masked: q/k/v or a
    fused qkv, an attention gate, MLA's latents, a mixer's in_proj), after the pass-through modules that read them.
    A routed attention (jetmoe: experts and gates a router picks), the per-layer inputs (gemma3n, gemma4) and a
    column reached by tensor arithmetic between modules (Recipe.modules_give_columns) it cannot: those tables are
    checked against the recipe's own float64 fold (fold_rows), which catches a damaged table but not a recipe bug;
    there the model runs (and the equivalence tests) are the independent check."""
    patch = recipe.runtime_patch()
    read = set(patch.projections) | {c for m in patch.masked for c in m.columns}
    if "qkv" in read:
        read |= {"q", "k", "v"}
    needed = {name for name, span in recipe.columns().items() if span and name != "residual"}
    return patch.routed is None and recipe.modules_give_columns() and bool(needed) and needed <= read


def fold_rows(plan: Plan, rows: list[int]) -> dict[str, np.ndarray]:
    """The table's columns for `rows` from the recipe's fold, in float64 from the original's weights."""
    recipe = plan.recipe
    x = np.concatenate([read_array(*plan.inputs[recipe.embedding], run, np.float64) for run in runs(rows)])
    tokens = np.concatenate([np.arange(*run) for run in runs(rows)])
    return recipe.fold_tokens(plan.weights(np.float64), x, tokens)


def oracle_rows(model: torch.nn.Module, recipe: Recipe, rows: list[int]) -> dict[str, np.ndarray]:
    """The table's columns for `rows`, computed by the original model's own modules: a reference that shares nothing
    with the recipe's fold, so a recipe bug (a wrong norm, eps, split, bias or branch) shows as a wrong row.

    Each token runs alone through the embedding and layer 0 (cast to float64; the model is not used afterwards)
    with hooks on the modules the runtime replaces (RuntimePatch), and the columns are read off as the runtime will
    stand in for them. A projection's columns: its output, after the modules the runtime passes through that read
    it or a part of it (q/k norms of a per-head view; MLA's latent norms of a slice, and with the full table the
    q_b_proj/kv_b_proj that read their outputs), and any clamp of it. A mixer's projection (RuntimePatch.masked):
    its output cut into the table's column groups in order; where the mixer multiplies two parts of that output
    (LFM2's B * x) and the runtime hands it 1 for the last (`ones`), the product stands in the first's place. The
    residual: what layer 0 adds as its residual, which is its input (the embedding's output after its transforms,
    without the scale the runtime repeats) unless only a pass-through norm reads that input (BLOOM's post-LayerNorm
    residual, MiniMax's: then that norm's output), plus for a parallel block the outputs of the branches the runtime
    zeroes."""
    import torch
    from torch.overrides import TorchFunctionMode

    patch = recipe.runtime_patch()
    spec = recipe.spec
    layer = model.get_submodule(patch.layer)
    embedding = model.get_input_embeddings()
    transforms = [model.get_submodule(p) for p in patch.embedding_transforms]
    ids = torch.tensor(rows).reshape(-1, 1)
    n = len(rows)
    stored = getattr(torch, spec.dtype, None)
    scaled = None
    if patch.embedding_scale != 1.0 and stored in (torch.bfloat16, torch.float16):
        # A scaled embedding rounds its product in the dtype the model runs in, by default the checkpoint's, which
        # the table is for (Gemma's x * sqrt(d)): layer 0 reads that. The weights came from that dtype, so the round
        # trip is lossless for them; buffers (the scale itself) are put back as they were.
        buffers = {name: b.clone() for name, b in embedding.named_buffers()}
        with torch.no_grad():
            scaled = embedding.to(stored)(ids).double()
            embedding.to(torch.float32)
            for name, b in buffers.items():
                embedding.get_buffer(name).copy_(b)
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")  # the fused kernels take no float64
    for module in (layer, *transforms):
        module.double()

    got: dict[str, torch.Tensor] = {}
    norms: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of every pass-through module
    products: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (a, b, a * b) of parts of a mixer's output
    mixers = [f"masked:{i}" for i in range(len(patch.masked))]
    state = {"inside": 0, "input": None, "input_read": False}

    def embedded(module, args, output):  # the float32 lookup; layer 0 runs in float64
        got["embedded"] = output.double()
        return got["embedded"] if scaled is None else scaled

    def keep(name: str, clone: bool = False):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            got[name] = value.clone() if clone else value  # a branch's output may be added to in place (Falcon)
        return hook

    def enter(module, args):
        state["inside"] += 1

    def leave(module, args, output):
        state["inside"] -= 1
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            norms.append((args[0], output))

    def layer_input(module, args, kwargs):
        state["input"] = args[0] if args else kwargs.get("hidden_states")

    def stop(module, args, output):
        raise _Stop

    def shares(part: torch.Tensor, whole: torch.Tensor | None) -> bool:
        return isinstance(part, torch.Tensor) and whole is not None \
            and part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()

    class Watch(TorchFunctionMode):
        """Clamps of a projection's output (MPT's and OLMo's clip_qkv) belong to the table; products of two parts of
        a mixer's projection may (LFM2's B * x); and whether anything but a pass-through module reads layer 0's
        input."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if state["inside"] == 0 and state["input"] is not None and any(
                    a is state["input"] for a in (*args, *kwargs.values())):
                state["input_read"] = True
            out = func(*args, **kwargs)
            name = getattr(func, "__name__", "")
            if name in ("clamp", "clamp_", "clip", "clip_") and args:
                for key in patch.projections:
                    if args[0] is got.get(key):
                        got[key] = out
            if name in ("mul", "__mul__") and len(args) == 2 and any(
                    shares(args[0], got.get(m)) and shares(args[1], got.get(m)) for m in mixers):
                products.append((args[0], args[1], out))
            return out

    handles = [embedding.register_forward_hook(embedded), layer.register_forward_hook(stop),
               layer.register_forward_pre_hook(layer_input, with_kwargs=True)]
    if transforms:
        handles.append(transforms[-1].register_forward_hook(keep("embedded")))
    for name, path in patch.projections.items():
        handles.append(layer.get_submodule(path).register_forward_hook(keep(name)))
    for key, masked in zip(mixers, patch.masked, strict=True):
        handles.append(layer.get_submodule(masked.module).register_forward_hook(keep(key)))
    for path in (*patch.identities, *patch.dtype_identities):
        handles += [layer.get_submodule(path).register_forward_pre_hook(enter),
                    layer.get_submodule(path).register_forward_hook(leave)]
    for path in patch.zeros:
        handles.append(layer.get_submodule(path).register_forward_hook(keep(f"zero:{path}", clone=True)))
    try:
        with torch.no_grad(), Watch():
            model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()

    def offset(part: torch.Tensor, whole: torch.Tensor) -> int:
        """Where in each of whole's rows the view `part` starts (rows: one token each, laid out contiguously)."""
        return (part.storage_offset() - whole.storage_offset()) % (whole.numel() // n)

    def through(value: torch.Tensor, used: frozenset[int] = frozenset()) -> torch.Tensor | None:
        """What the pass-through modules reading `value` or a part of each of its rows make of it, (rows, width)
        in value's layout; None when none reads it. A module's output is followed in turn (MLA's full table:
        kv_b_proj reads kv_a_layernorm's output)."""
        whole, parts, normed_in_place = None, [], None
        for i, (inp, normed) in enumerate(norms):
            if i in used or not shares(inp, value):
                continue
            later = through(normed, used | {i})
            if later is None and normed.shape == inp.shape:
                # a norm of a view (q_norm per head, Persimmon's of a strided part of a fused output, MLA's of the
                # latent slice): its output where its input was, in value's layout
                if normed_in_place is None:
                    normed_in_place = value.clone()
                normed_in_place.as_strided(inp.shape, inp.stride(), inp.storage_offset() - value.storage_offset()) \
                    .copy_(normed)
                continue
            later = (normed if later is None else later).reshape(n, -1)
            if inp.numel() == value.numel():
                whole = later
            else:  # a module of another width reads a slice of each row (MLA's full table: kv_b_proj after the norm)
                parts.append((offset(inp, value), offset(inp, value) + inp.numel() // n, later))
        if whole is not None:
            return whole
        if normed_in_place is not None:
            value = normed_in_place
        if not parts:
            return None if normed_in_place is None else value.reshape(n, -1)
        flat, joined, at = value.reshape(n, -1), [], 0
        for start, stop, later in sorted(parts, key=lambda p: p[0]):
            joined += [flat[:, at:start], later]
            at = stop
        return torch.cat([*joined, flat[:, at:]], dim=1)

    def read(value: torch.Tensor) -> torch.Tensor:
        resolved = through(value)
        return value.reshape(n, -1) if resolved is None else resolved

    out: dict[str, np.ndarray] = {}
    for name in patch.projections:
        out[name] = read(got[name]).double().numpy()
    if "qkv" in out:
        out.update(zip(patch.fused_order, ops.split_qkv(out.pop("qkv"), patch.fused_groups, spec.q_dim, spec.kv_dim),
                       strict=True))  # CodeGen's groups are [q | v | k]
    columns = recipe.columns()
    for key, masked in zip(mixers, patch.masked, strict=True):
        value = got[key]
        flat = read(value)
        for a, b, product in products:
            if not (shares(a, value) and shares(b, value)):
                continue
            # the runtime hands the mixer 1 for the factor that ends the row: the product takes the other's place
            (kept, kept_stop), (dropped, dropped_stop) = sorted((offset(t, value), offset(t, value) + t.numel() // n)
                                                                for t in (a, b))
            if dropped_stop == flat.shape[1] and masked.ones == dropped_stop - dropped:
                flat = torch.cat([flat[:, :kept], product.reshape(n, -1), flat[:, kept_stop:dropped]], dim=1)
        widths = [columns[c][1] - columns[c][0] for c in masked.columns]
        if sum(widths) != flat.shape[1]:  # the runtime's columns cannot stand for what transformers computes
            flat = torch.full((n, sum(widths)), math.nan, dtype=torch.float64)
        start = 0
        for c, width in zip(masked.columns, widths, strict=True):
            out[c] = flat[:, start:start + width].double().numpy()
            start += width
    residual = got["embedded"] if state["input_read"] else next(o for i, o in norms if i is state["input"])
    residual = residual / patch.embedding_scale  # if not read, the residual is a pass-through norm's output
    for path in patch.zeros:
        residual = residual + got[f"zero:{path}"].double() / patch.embedding_scale
    out["residual"] = residual.reshape(n, -1).double().numpy()
    return out


def special_tokens(src: Source, tokenizer) -> set[int]:
    """The ids every prompt is likely to hold (BOS, EOS, padding), from the config and the tokenizer."""
    data = Config.load(src.config_path).data
    found: set[int] = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = data.get(key)
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool):
                found.add(i)
    return found


def sample_rows(vocab: int, seed: int, used: set[int]) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    picked = torch.randint(0, vocab, (TABLE_SAMPLE,), generator=g).tolist()
    return sorted({r for r in (*edges(vocab), *picked, *used) if 0 <= r < vocab})


# -- the proof ----------------------------------------------------------------------------------------------------
def verify_checkpoint(original: Source, converted: Source, dtype: str = "float32", tokens: int = DEFAULT_TOKENS,
                      prompt: str | None = None, seed: int = 0, all_rows: bool = False) -> VerifyResult:
    """Compare CONVERTED with ORIGINAL: the models' runs (one model in memory at a time), then the table's rows
    (with `all_rows`, every row of the vocabulary, ROW_CHUNK at a time)."""
    if dtype not in RUN_DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(RUN_DTYPES)}")
    if tokens < 1:
        raise InputError(f"--tokens {tokens}: generate at least one token")
    if is_converted(Config.load(original.config_path).data):
        raise InputError(f"{original.ref}: this is a converted checkpoint; pass the original first, then the converted")
    block = PrecomputeBlock.read(Config.load(converted.config_path).data, converted.config_path)
    plan = make_plan(original, load_recipe(original, **block.choices))  # the table the conversion chose
    if plan.from_config_only:
        raise InputError(f"{original.ref}: no safetensors weights to verify against")
    table = locate_table(plan, converted, block)
    criterion = criterion_dtype(dtype, block.dtype)

    tokenizer = _tokenizer(original, prompt is not None)
    prompt_text = (prompt or DEFAULT_PROMPT) if tokenizer is not None else None
    prompt_ids = tokenizer(prompt_text, return_tensors="pt").input_ids if tokenizer is not None else None
    pad_id = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
    probe = make_probe(plan.recipe.spec.vocab_size, seed, prompt_ids, pad_id)

    with _quiet_loading():
        routers = plan.recipe.routers()
        conv = run_model(_load_converted(converted, dtype), probe, tokens, routers)
        gc.collect()
        model = _load_original(original, "float32")
        ref = run_model(model, probe, tokens, routers)
        tie = _near_tie(model, probe, ref.greedy, conv.greedy) if criterion == "float32" else None
        used = probe.tokens() | set(ref.greedy) | set(conv.greedy) | special_tokens(original, tokenizer)
        vocab = plan.recipe.spec.vocab_size
        rows = list(range(vocab)) if all_rows else sample_rows(vocab, seed, used)
        independent = oracle_covers(plan.recipe)
        row_error, worst_row = 0.0, rows[0]
        for start in range(0, len(rows), ROW_CHUNK):  # the oracle runs the model's layer 0 in float64: last
            chunk = rows[start:start + ROW_CHUNK]
            exact = oracle_rows(model, plan.recipe, chunk) if independent else fold_rows(plan, chunk)
            error, row = table_row_error(table, plan.recipe.columns(), exact, chunk)
            if error > row_error:
                row_error, worst_row = error, row
        del model
        gc.collect()
        own = run_model(_load_original(original, criterion), probe, tokens, routers) if criterion != "float32" \
            else None

    row_tol = table_tolerance(block.dtype)
    numbers, checks = _compare(ref, conv, own, criterion)
    checks.insert(0, Check("table rows", row_error <= row_tol,
                           f"worst row error {row_error:.3g} (token {worst_row}; {len(rows)} rows vs "
                           + ("transformers' layer 0" if independent else "the recipe's fold") + " in float64)",
                           f"{row_tol:.3g} for a {block.dtype} table", row_error, row_tol))
    identical = conv.greedy == ref.greedy
    if criterion == "float32":
        how = "identical" if identical else f"differs from step {tie}, a near-tie" if tie is not None else "differs"
        checks.append(Check("greedy generation", identical or tie is not None, f"{how} ({tokens} tokens)",
                            "identical", float(not identical and tie is None), 0.0))
    else:
        checks.append(Check("greedy generation", None, f"{'identical' if identical else 'differs'} ({tokens} "
                            "tokens, vs float32 original)", f"not judged in {criterion}"))
    return VerifyResult(
        original=original.ref, converted=converted.ref, dtype=dtype, table_dtype=block.dtype, criterion=criterion,
        **numbers, greedy_identical=identical, greedy_original=ref.greedy, greedy_converted=conv.greedy,
        prompt=prompt_text, table_row_error=row_error, table_row_tolerance=row_tol, table_worst_row=worst_row,
        table_rows_checked=len(rows), checks=tuple(checks),
    )


def _compare(ref: Run, conv: Run, own: Run | None, criterion: str) -> tuple[dict[str, Any], list[Check]]:
    """Logit numbers and checks: exact in float32, relative to the original's own error in lower precision."""
    import torch

    positions = ref.logits.shape[0]
    outliers = 0 if own is None else max(1, math.ceil(LOSSY_OUTLIERS * positions))
    scale = ref.logits.abs().max().item() or 1.0
    slack = FLOAT32_LOGIT_TOL * scale
    alike = torch.ones(positions, dtype=torch.bool)
    if own is not None and conv.routing is not None and own.routing is not None \
            and conv.routing.shape == own.routing.shape:
        differs = (conv.routing != own.routing).any(-1)
        for row in conv.sequence.unique():  # attention carries a flip's jump to the row's later positions
            at = conv.sequence == row
            alike[at] = differs[at].cumsum(0) == 0
        if alike.sum() < ROUTED_ALIKE_MIN * positions:  # routing this far apart is damage: judge every position
            alike[:] = True
    compared = int(alike.sum())
    trim = 0 if own is None else max(1, math.ceil(LOSSY_OUTLIERS * compared))

    def trimmed(run: Run) -> tuple[float, float]:
        err = (run.logits - ref.logits).abs()[alike]
        keep = compared - trim
        return err.mean(-1).sort().values[:keep].mean().item(), err.amax(-1).sort().values[keep - 1].item()

    err = (conv.logits - ref.logits).abs()
    t_mean, t_max = trimmed(conv)
    o_mean, o_max = trimmed(own) if own is not None else (None, None)
    # an argmax that differs from the float32 original's must be a near-tie the allowed error could flip
    flip_room = 2 * (slack if o_max is None else LOSSY_MAX_RATIO * o_max + slack)
    top_ref = ref.logits.argmax(-1)
    top_conv = conv.logits.argmax(-1)
    margin = (ref.logits.gather(-1, top_ref[:, None]) - ref.logits.gather(-1, top_conv[:, None]))[:, 0]
    decisive = int(((top_ref != top_conv) & (margin > flip_room)).sum())
    numbers = dict(
        positions=positions, outliers=outliers, routing_differs=positions - compared,
        max_abs_diff=err.max().item(), max_rel_diff=err.max().item() / scale,
        mean_abs_diff=err.mean().item(), trimmed_mean_abs_diff=t_mean, trimmed_max_abs_diff=t_max,
        own_trimmed_mean_abs_diff=o_mean, own_trimmed_max_abs_diff=o_max,
        top1_agreement=(top_ref == top_conv).float().mean().item(),
        own_top1_agreement=(own.logits.argmax(-1) == top_ref).float().mean().item() if own is not None else None,
        top1_decisive_flips=decisive,
    )
    top1 = Check("top-1", decisive <= outliers, f"{numbers['top1_agreement']:.1%} agree, {decisive} decisive flips",
                 f"{outliers} flips beyond a near-tie (margin {flip_room:.2g})", decisive, outliers)
    if own is None:
        rel, diff = numbers["max_rel_diff"], numbers["max_abs_diff"]
        return numbers, [Check("logits", rel <= FLOAT32_LOGIT_TOL, f"max rel diff {rel:.3g} (abs {diff:.3g})",
                               f"{FLOAT32_LOGIT_TOL:g} of the largest logit", rel, FLOAT32_LOGIT_TOL), top1]
    aside = f"worst {trim} of {compared} positions aside" + (
        f", {positions - compared} after routing unlike the original's own" if compared < positions else "")
    return numbers, [
        Check("logits, mean error", t_mean <= LOSSY_MEAN_RATIO * o_mean + slack,
              f"{t_mean:.3g} vs the original's own {o_mean:.3g} in {criterion} ({aside})",
              f"{LOSSY_MEAN_RATIO:g}x own + {slack:.2g}", t_mean, LOSSY_MEAN_RATIO * o_mean + slack),
        Check("logits, max error", t_max <= LOSSY_MAX_RATIO * o_max + slack,
              f"{t_max:.3g} vs the original's own {o_max:.3g} in {criterion} ({aside})",
              f"{LOSSY_MAX_RATIO:g}x own + {slack:.2g}", t_max, LOSSY_MAX_RATIO * o_max + slack),
        top1,
    ]


def _near_tie(model: torch.nn.Module, probe: Probe, ref: list[int], conv: list[int]) -> int | None:
    """The step where the greedy generations part, if the float32 original itself nearly tied there."""
    import torch

    step = next((i for i, (a, b) in enumerate(zip(ref, conv, strict=False)) if a != b), None)
    if step is None:
        return None
    ids = torch.cat([probe.prompt_ids, torch.tensor([ref[:step]], dtype=probe.prompt_ids.dtype)], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].double()
    margin = (logits[ref[step]] - logits[conv[step]]).item()
    return step if margin <= 2 * FLOAT32_LOGIT_TOL * logits.abs().max().item() else None


@contextmanager
def _quiet_loading():
    """transformers' per-load progress bars would bury the verdict."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise InputError("verify needs transformers: pip install 'precompute-cli[runtime]'") from None
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_original(src: Source, dtype: str) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    from precompute_cli.runtime import causal_lm_class

    cls = causal_lm_class(Config.load(src.config_path), AutoModelForCausalLM)  # mistral4, kimi_k2: not mapped
    return cls.from_pretrained(src.root, dtype=getattr(torch, dtype), trust_remote_code=False).eval()


def _load_converted(src: Source, dtype: str) -> torch.nn.Module:
    from precompute_cli.runtime import load_model

    return load_model(src.root, dtype=dtype)


def _tokenizer(src: Source, required: bool):
    """The original's tokenizer when its folder has one; --prompt without one is an error."""
    if not any((src.root / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        if required:
            raise InputError(f"{src.ref}: no tokenizer beside the checkpoint, so --prompt cannot be encoded")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.root, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{src.ref}: its tokenizer does not load ({exc})") from None


def render_verify(console: Console, result: VerifyResult) -> None:
    """The pass/fail table and the verdict (on stderr through `console`)."""
    table = Table(title=f"verify {result.converted} against {result.original}: run in {result.dtype}, "
                        f"{result.table_dtype} table, {result.criterion} tolerances")
    for col in ("check", "", "measured", "allowed"):
        table.add_column(col)
    marks = {True: "[bold green]PASS[/]", False: "[bold red]FAIL[/]", None: "[dim]info[/]"}
    for c in result.checks:
        table.add_row(c.name, marks[c.passed], c.value, c.limit)
    console.print(table)
    console.print(f"{result.positions} logit positions: max abs diff {result.max_abs_diff:.3g}, max rel diff "
                  f"{result.max_rel_diff:.3g}, top-1 agreement {result.top1_agreement:.1%}")
    if result.passed:
        console.print("[bold green]verified[/]")
