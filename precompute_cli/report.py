"""Numbers about a conversion, as values: the paper's read and memory analysis, and the size-delta report.

The paper's convention counts only Q, K, V (and for parallel blocks FFN) weight *matrices* as eliminated;
`eliminated_params` counts every element we actually remove (norms, biases, routers, the untied embedding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from rich.console import Console
from rich.table import Table

from precompute_cli.execute import Result
from precompute_cli.plan import Plan
from precompute_cli.spec import ModelSpec
from precompute_cli.st_io import TensorRef

BATCHES = (1, 16, 256, 1024)


def linear_weights(spec: ModelSpec, parallel: bool) -> int:
    """The paper's num_weights_Q_K_V_FFN of a plain attention layer 0: its Q, K, V matrices, plus the FFN's when it
    folds too (scripts/bench_decode.py; inspect asks the recipe, Recipe.paper_counts)."""
    qkv = spec.hidden_size * (spec.q_dim + spec.kv_dim + spec.v_dim)
    ffn = spec.ffn_matrices * spec.hidden_size * spec.intermediate_size * spec.num_experts
    return qkv + (ffn if parallel else 0)


def estimated_params(spec: ModelSpec) -> int:
    """Weight matrices of the whole model from the config alone (norms and biases left out)."""
    d = spec.hidden_size
    attn = d * (spec.q_dim + spec.kv_dim + spec.v_dim + spec.num_heads * (spec.v_head_dim or spec.head_dim))
    ffn = spec.ffn_matrices * d * spec.intermediate_size * spec.num_experts
    router = d * spec.num_experts if spec.num_experts > 1 else 0
    embeddings = spec.vocab_size * d * (1 if spec.tied_embeddings else 2)
    return embeddings + spec.num_layers * (attn + ffn + router)


def analysis(plan: Plan, assume_parallel: bool = False) -> dict[str, Any]:
    """inspect's figures: detected architecture, and what converting would gain or cost. What layer 0 is, what its
    table eliminates and how wide it is are the recipe's answers (Recipe.paper_counts); the rest is arithmetic."""
    recipe = plan.recipe
    subject = recipe.assumed_parallel() if assume_parallel else recipe
    spec = replace(recipe.spec, block="parallel") if assume_parallel else recipe.spec
    counts = subject.paper_counts()
    eliminated_linear, new_columns = counts.eliminated_linear, counts.new_columns
    eliminated = sum(r.numel for r in plan.removed)
    if assume_parallel and recipe.spec.block == "serial":
        ffn = linear_weights(spec, True) - linear_weights(spec, False)
        eliminated += ffn + (spec.hidden_size * spec.num_experts if spec.num_experts > 1 else 0)
    options = recipe.table_options()
    table_width = replace(plan.table, columns=subject.columns()).width if assume_parallel else plan.table.width
    table_params = table_width * spec.vocab_size
    per_layer = _per_layer(plan)
    total = plan.params_before if plan.params_before is not None else estimated_params(spec) + (
        per_layer["eliminated_params"] if per_layer else 0)  # the per-layer embedding and projection, which exist
    delta = table_params - eliminated
    also = counts.also_read  # read per token either way (per-layer inputs instead of the per-layer embedding)
    reads = spec.hidden_size + new_columns + also
    paper_increase = new_columns * spec.vocab_size - eliminated_linear
    return {
        "layer0": counts.layer0,
        "folds": {k: v[1] - v[0] for k, v in plan.table.columns.items() if v and k != "residual"},
        **{k: v for k, v in spec.as_dict().items() if k not in ("num_heads", "num_kv_heads", "head_dim")},
        "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "num_layers": spec.num_layers,
        "assumed_parallel": assume_parallel,
        "precomputable": True,
        "reason": None,
        "eliminated_params": eliminated,
        "eliminated_linear_params": eliminated_linear,
        "table_width": table_width,
        "table_params": table_params,
        "total_params": total,
        "total_params_exact": plan.params_before is not None,
        "param_delta": delta,
        "param_delta_pct": 100.0 * delta / total if total else None,
        "memory_increase_paper": paper_increase,
        "memory_increase_paper_pct": 100.0 * paper_increase / total if total else None,
        "reads_per_token": reads,
        "reads_without_precompute": {str(b): b * (spec.hidden_size + also) + eliminated_linear for b in BATCHES},
        "reads_with_precompute": {str(b): b * reads for b in BATCHES},
        "reduction_factor": {str(b): (b * (spec.hidden_size + also) + eliminated_linear) / (b * reads)
                             for b in BATCHES},
        "removed": [_tensor(r) for r in plan.removed],
        "table": _tensor(plan.table.ref),
        "columns": {k: list(v) if v else None for k, v in plan.table.columns.items()},
        **({"table_choice": recipe.choices(), "table_options": options} if options else {}),
        **({"per_layer": per_layer} if per_layer else {}),
    }


def _per_layer(plan: Plan) -> dict[str, Any] | None:
    """The per-layer inputs folded into the table (recipes/per_layer.py): their columns replace the per-layer
    embedding's (extra width 0), and the projection and its norm are gone."""
    span = plan.table.columns.get("per_layer")
    patch = plan.recipe.runtime_patch().per_layer if span else None
    if patch is None:
        return None
    removed = {r.name: r for r in plan.removed}
    embedding, *rest = (removed[n] for n in patch.tensors)
    width = span[1] - span[0]
    return {"width": width, "layers": patch.layers, "hidden_size_per_layer_input": patch.width,
            "extra_width": width - embedding.shape[1], "replaces": {"name": embedding.name,
                                                                   "shape": list(embedding.shape)},
            "eliminated_params": embedding.numel + sum(r.numel for r in rest)}


def refused(spec: ModelSpec, reason: str) -> dict[str, Any]:
    """inspect's answer for a checkpoint we cannot fold: the detection, and why not."""
    return {**spec.as_dict(), "precomputable": False, "reason": reason, "eliminated_params": 0,
            "eliminated_linear_params": 0, "table_width": 0, "param_delta": 0, "param_delta_pct": 0.0,
            "reads_per_token": spec.hidden_size, "reduction_factor": {str(b): 1.0 for b in BATCHES}}


@dataclass(frozen=True)
class ConversionReport:
    source: str
    revision: str | None
    out: str
    model_type: str
    block: str
    removed: list[dict[str, Any]]
    added: list[dict[str, Any]]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    param_delta: int
    param_delta_pct: float
    byte_delta: int
    byte_delta_pct: float
    seconds: float
    files: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def conversion_report(plan: Plan, result: Result) -> ConversionReport:
    params_after, bytes_after = plan.params_after, plan.bytes_after
    return ConversionReport(
        source=plan.source.ref, revision=plan.source.revision, out=str(result.out),
        model_type=plan.recipe.spec.model_type, block=plan.recipe.spec.block,
        removed=[_tensor(r) for r in plan.removed], added=[_tensor(plan.table.ref)],
        params_before=plan.params_before, params_after=params_after,
        bytes_before=plan.bytes_before, bytes_after=bytes_after,
        param_delta=params_after - plan.params_before,
        param_delta_pct=100.0 * (params_after - plan.params_before) / plan.params_before,
        byte_delta=bytes_after - plan.bytes_before,
        byte_delta_pct=100.0 * (bytes_after - plan.bytes_before) / plan.bytes_before,
        seconds=round(result.seconds, 3),
        files=[asdict(f) for f in result.files],
    )


def _tensor(ref: TensorRef) -> dict[str, Any]:
    return {"name": ref.name, "shape": list(ref.shape), "dtype": ref.dtype, "params": ref.numel, "bytes": ref.nbytes}


def render_analysis(console: Console, data: dict[str, Any], title: str) -> None:
    arch = Table(title=title, show_header=False)
    for key in ("model_type", "block", "attention", "ffn", "num_experts", "positional", "hidden_size", "q_dim",
                "kv_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "num_layers", "tied_embeddings",
                "dtype"):
        if key in data:
            arch.add_row(key, str(data[key]))
    console.print(arch)
    if not data["precomputable"]:
        console.print(f"[bold red]Not precomputable:[/] {data['reason']}")
        console.print(f"Supported model types: {', '.join(data.get('supported_model_types', []))}")
        return
    gain = Table(title="Converting it" + (" (assuming a parallel attention/FFN block)" if data["assumed_parallel"]
                                          else ""), show_header=False)
    mixer = data.get("layer0", "attention") != "attention"
    gain.add_row("layer 0", f"{data.get('layer0', 'attention')}: folds "
                 + ", ".join(f"{k} ({w:,})" for k, w in data.get("folds", {}).items()))
    gain.add_row("eliminated weights (paper: " + ("layer 0's input projections" if mixer else "Q, K, V")
                 + (", FFN" if data["block"] == "parallel" else "") + ")", f"{data['eliminated_linear_params']:,}")
    gain.add_row("eliminated parameters (every tensor removed)", f"{data['eliminated_params']:,}")
    gain.add_row("table", f"{data['vocab_size']:,} x {data['table_width']:,} = {data['table_params']:,}")
    if data.get("per_layer"):
        pl = data["per_layer"]
        gain.add_row("per-layer inputs", f"{pl['layers']} layers x {pl['hidden_size_per_layer_input']:,} columns, "
                     f"replacing {pl['replaces']['name']} {' x '.join(f'{n:,}' for n in pl['replaces']['shape'])} "
                     f"(extra width {pl['extra_width']:,}); {pl['eliminated_params']:,} parameters removed")
    gain.add_row("reads per token with precompute", f"{data['reads_per_token']:,}")
    for b in BATCHES:
        gain.add_row(f"first-layer reads, batch {b}: without / with",
                     f"{data['reads_without_precompute'][str(b)]:,} / {data['reads_with_precompute'][str(b)]:,}"
                     f"  ({_factor(data['reduction_factor'][str(b)])})")
    exact = "" if data["total_params_exact"] else " (total estimated from config)"
    gain.add_row("memory increase, paper's formula",
                 f"{data['memory_increase_paper']:+,} ({data['memory_increase_paper_pct']:+.1f}%){exact}")
    gain.add_row("parameter delta, exact", f"{data['param_delta']:+,} ({data['param_delta_pct']:+.2f}%){exact}")
    console.print(gain)
    if data.get("table_options"):
        render_table_options(console, data["table_options"], data["table_choice"])


def render_table_options(console: Console, options: dict[str, dict[str, int]], chosen: dict[str, str]) -> None:
    """The table choices side by side (MLA: --mla-table latent | full)."""
    (flag, current), = chosen.items()
    table = Table(title=f"--{flag.replace('_', '-')}: the choices (this analysis: {current})")
    table.add_column("")
    for name in options:
        table.add_column(name, justify="right")
    rows = (("new table columns", "new_columns"), ("extra table entries (vocab x columns)", "extra_entries"),
            ("eliminated weights (every tensor removed)", "eliminated_params"),
            ("eliminated linear weights", "eliminated_linear_params"),
            ("linear weights layer 0 still reads per token", "kept_linear_params"),
            ("table reads per token", "reads_per_token"))
    for label, key in rows:
        table.add_row(label, *(f"{o[key]:,}" for o in options.values()))
    console.print(table)


def render_conversion(console: Console, report: ConversionReport) -> None:
    tensors = Table(title=f"{report.source} -> {report.out}")
    for col in ("", "tensor", "shape", "dtype", "bytes"):
        tensors.add_column(col, justify="right" if col == "bytes" else "left")
    for sign, rows in (("-", report.removed), ("+", report.added)):
        for t in rows:
            tensors.add_row(sign, t["name"], "x".join(map(str, t["shape"])), t["dtype"], f"{t['bytes']:,}")
    console.print(tensors)
    sizes = Table(show_header=True)
    for col in ("", "before", "after", "delta"):
        sizes.add_column(col, justify="right")
    sizes.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}",
                  f"{report.param_delta:+,} ({report.param_delta_pct:+.2f}%)")
    sizes.add_row("bytes", f"{report.bytes_before:,}", f"{report.bytes_after:,}",
                  f"{report.byte_delta:+,} ({report.byte_delta_pct:+.2f}%)")
    console.print(sizes)
    files = Table(title=f"output files ({report.seconds:.2f} s)")
    for col in ("file", "bytes", "sha256"):
        files.add_column(col)
    for f in report.files:
        files.add_row(f["name"], f"{f['bytes']:,}", f["sha256"][:16] + "...")
    console.print(files)


def _factor(x: float) -> str:
    """2,458x as the paper prints it; below 10 one decimal, so that a small model's 0.4x does not read as 0x."""
    return f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x"


def render_converted(console: Console, data: dict[str, Any], title: str) -> None:
    """inspect on a converted checkpoint: what was folded, the table's columns, what was removed, the source."""
    block, spec = data["precompute"], data
    parallel = block.get("block") == "parallel"
    columns = {k: v for k, v in (block.get("columns") or {}).items() if v}
    width = max((v[1] for v in columns.values()), default=0)
    summary = Table(title=f"{title}: a precomputed {spec.get('model_type')} checkpoint", show_header=False)
    summary.add_row("folded", f"layer {block.get('layer', 0)}'s " + ("Q, K, V and the whole FFN (parallel block)"
                                                                    if parallel else "Q, K, V (serial block)"))
    if block.get("mla_table"):  # MLA: q is the q latent (latent) or q_b_proj's output (full), kv [latent | k_rot]
        summary.add_row("MLA table", f"{block['mla_table']} (convert --mla-table)")
    summary.add_row("table", f"{block.get('table')}: {spec.get('vocab_size', 0):,} tokens x {width:,} columns, "
                             f"{block.get('dtype')}")
    for name, (first, last) in columns.items():
        what = "x, the residual stream entering layer 0" if name == "residual" else f"layer 0's {name.upper()}"
        if name == "per_layer":
            what = ("the per-layer inputs of every layer (the per-layer embedding, its projection and norm folded; "
                    "no extra width)")
        if name == "residual" and parallel:
            what = "x + layer 0's FFN output"
        summary.add_row(f"  columns {first}:{last}", f"{name}: {what}")
    removed = block.get("removed") or []
    summary.add_row("removed", f"{len(removed)} tensors")
    for name in removed:
        summary.add_row("", name)
    source = block.get("source") or {}
    summary.add_row("source", f"{source.get('id')}" + (f" at {source['revision']}" if source.get("revision") else ""))
    tool = block.get("tool") or {}
    summary.add_row("converted by", f"{tool.get('name')} {tool.get('version')}")
    console.print(summary)
