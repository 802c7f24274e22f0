"""DeepSeek-V4 (deepseek_v4) at layer 0: hyper-connections in front of a shared-KV attention with a low-rank q, and
the compressors of its compressed layers (transformers 5.24's DeepseekV4Model, DecoderLayer and Attention).

The model feeds layer 0 hc_mult identical copies of x; attn_hc collapses them with weights computed from them
(mla.HyperPre, DeepSeek-V4's form: (2 + n) n mixes, three scales), so layer 0's attention input is the token's:

    h   = RMSNorm(sum_j pre_j x; attn_norm, rms_norm_eps)                               (input_layernorm in memory)
    qr  = RMSNorm(wq_a(h); q_norm, rms_norm_eps)       q = RMSNorm_unweighted(wq_b(qr)) per head  (q_a/q_b_proj)
    kv  = RMSNorm(wkv(h); norm, rms_norm_eps)          one head, read as both key and value (kv_proj, kv_norm)
    compressed layers (layer_types[0]): compressor.wkv(h), compressor.wgate(h), per token, pooled over windows of
        compress_rates tokens afterwards (ape, the pool's norm and RoPE stay); a compressed sparse layer's indexer
        also has its own compressor's wkv(h), wgate(h), and weights_proj(h), and wq_b(qr).

Two tables, as for MLA (--mla-table): latent holds qr (wq_b and the indexer's wq_b stay); full holds wq_b's normed
output and the indexer's wq_b(qr), wq_a and q_norm passing h on to modules that return table columns. attn_hc
stays (its post and comb weights act after the attention); so do the sinks, the grouped output projection, and the
hash-routed MoE of layer 0, which reads the attention's output (its tid2eid lookup is by token, the rest is not).
Names are those transformers' save_pretrained writes (model.layers.0.attn.wq_a, model.embed_tokens); the Hub's
original layout (embed.weight, layers.0.*, no model. prefix) is not read yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import RuntimePatch, Shape, Weights, register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms
from precompute_cli.recipes.mla import TABLES, ChosenTable, HyperPre
from precompute_cli.spec import Config

EPS = Key("rms_norm_eps", default=1e-6)
HCA, CSA, SLIDING = "heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention"
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}  # the legacy per-layer compress_ratios (DeepseekV4Config)
HYPER = HyperPre(fn="hc_attn_fn", base="hc_attn_base", scale="hc_attn_scale", comb=True,
                 norm_eps=Key("rms_norm_eps", default=1e-6))


def layer0_type(cfg: Config) -> str:
    """Layer 0's attention kind: layer_types, else the legacy compress_ratios, else the default (two HCA first)."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        return str(types[0])
    ratios = cfg.get("compress_ratios")
    if isinstance(ratios, list) and ratios:
        return _RATIO_TO_TYPE.get(ratios[0], str(ratios[0]))
    return HCA


@dataclass(frozen=True)
class V4Dims:
    hidden: int
    heads: int
    head_dim: int
    q_lora_rank: int
    kind: str  # layer 0's layer type
    index_heads: int
    index_head_dim: int

    def widths(self, table: str) -> dict[str, int]:
        """The new columns of one table choice, in order."""
        full = table == "full"
        out = {"q": self.heads * self.head_dim if full else self.q_lora_rank, "kv": self.head_dim}
        if self.kind in (HCA, CSA):  # a CSA compressor keeps two series per token (for this window and the next)
            width = self.head_dim * (2 if self.kind == CSA else 1)
            out.update(compress_kv=width, compress_gate=width)
        if self.kind == CSA:
            out.update(index_kv=2 * self.index_head_dim, index_gate=2 * self.index_head_dim,
                       index_w=self.index_heads)
            if full:
                out["index_q"] = self.index_heads * self.index_head_dim
        return out


@register
class DeepseekV4(ChosenTable, Declared):
    """DeepSeek-V4's layer 0: its own fold, columns and runtime patch; the table choice is MLA's."""

    layouts: ClassVar[dict[str, Layout]] = {"deepseek_v4": Layout(
        sizes=Sizes(num_kv_heads=Key(default=1), head_dim=Key("head_dim", default=512),
                    num_experts=Key("n_routed_experts", default=256),
                    intermediate_size=Key("moe_intermediate_size", default=2048)),
        input_norm=rms("attn_norm", eps=EPS),
    )}
    @property
    def dims(self) -> V4Dims:
        c = self.cfg
        return V4Dims(hidden=self.spec.hidden_size, heads=self.spec.num_heads, head_dim=self.spec.head_dim,
                      q_lora_rank=c.int("q_lora_rank", default=1024), kind=layer0_type(c),
                      index_heads=c.int("index_n_heads", default=64), index_head_dim=c.int("index_head_dim",
                                                                                           default=128))

    def config_refusal(self) -> str | None:
        d = self.dims
        if d.kind not in (SLIDING, HCA, CSA):
            return f"layer 0's layer type {d.kind!r} is not one DeepSeek-V4 has"
        if d.q_lora_rank <= 0 or d.head_dim <= 0:
            return "q_lora_rank and head_dim must be positive"
        return None

    # -- what layer 0 reads -------------------------------------------------------------------------------------
    def folded(self) -> dict[str, Shape]:
        return self.folded_for(self.table)

    def folded_for(self, table: str) -> dict[str, Shape]:
        d, p, full = self.dims, self.prefix + "attn.", table == "full"
        out: dict[str, Shape] = dict(self.layout.input_norm.tensors(self.prefix, self.spec))
        out[p + "wq_a.weight"] = (d.q_lora_rank, d.hidden)
        out[p + "q_norm.weight"] = (d.q_lora_rank,)
        if full:
            out[p + "wq_b.weight"] = (d.heads * d.head_dim, d.q_lora_rank)
        out[p + "wkv.weight"] = (d.head_dim, d.hidden)
        out[p + "norm.weight"] = (d.head_dim,)
        widths = d.widths(table)
        if "compress_kv" in widths:
            out[p + "compressor.wkv.weight"] = (widths["compress_kv"], d.hidden)
            out[p + "compressor.wgate.weight"] = (widths["compress_gate"], d.hidden)
        if d.kind == CSA:
            out[p + "indexer.compressor.wkv.weight"] = (2 * d.index_head_dim, d.hidden)
            out[p + "indexer.compressor.wgate.weight"] = (2 * d.index_head_dim, d.hidden)
            out[p + "indexer.weights_proj.weight"] = (d.index_heads, d.hidden)
            if full:
                out[p + "indexer.wq_b.weight"] = (d.index_heads * d.index_head_dim, d.q_lora_rank)
        return out

    def kept_inputs(self) -> dict[str, Shape]:
        """attn_hc's tensors: the fold reads them, the model keeps them."""
        return HYPER.tensors(self.prefix, self.cfg, self.spec.hidden_size)

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        d, p, full, cfg = self.dims, self.prefix + "attn.", self.table == "full", self.cfg
        eps = float(EPS.read(cfg))
        x = ops.upcast(x)
        h = self.layout.input_norm.apply(w, HYPER.collapse(w, x, self.prefix, cfg), self.prefix, cfg, self.spec)
        qr = ops.rms_norm(ops.linear(h, w(p + "wq_a.weight")), w(p + "q_norm.weight"), eps)
        out: dict[str, Any] = {"residual": x}
        if full:
            q = ops.linear(qr, w(p + "wq_b.weight"))
            out["q"] = ops.rms_norm(ops.heads(q, d.head_dim), None, eps).reshape(q.shape)
        else:
            out["q"] = qr
        out["kv"] = ops.rms_norm(ops.linear(h, w(p + "wkv.weight")), w(p + "norm.weight"), eps)
        if d.kind in (HCA, CSA):
            out["compress_kv"] = ops.linear(h, w(p + "compressor.wkv.weight"))
            out["compress_gate"] = ops.linear(h, w(p + "compressor.wgate.weight"))
        if d.kind == CSA:
            out["index_kv"] = ops.linear(h, w(p + "indexer.compressor.wkv.weight"))
            out["index_gate"] = ops.linear(h, w(p + "indexer.compressor.wgate.weight"))
            out["index_w"] = ops.linear(h, w(p + "indexer.weights_proj.weight"))
            if full:
                out["index_q"] = ops.linear(qr, w(p + "indexer.wq_b.weight"))
        return out

    def runtime_patch(self) -> RuntimePatch:
        d, full = self.dims, self.table == "full"
        a = "self_attn."
        projections = {"q": a + ("q_b_proj" if full else "q_a_proj"), "kv": a + "kv_proj"}
        # the full table: q_a_proj and q_a_norm pass h on to q_b_proj (and the indexer's), which return columns
        identities = ["input_layernorm", a + "kv_norm", a + "q_a_norm"]
        identities += [a + "q_a_proj", a + "q_b_norm"] if full else []
        if d.kind in (HCA, CSA):
            projections.update(compress_kv=a + "compressor.kv_proj", compress_gate=a + "compressor.gate_proj")
        if d.kind == CSA:
            i = a + "compressor.indexer."
            projections.update(index_kv=i + "kv_proj", index_gate=i + "gate_proj", index_w=i + "scorer.weights_proj")
            if full:
                projections["index_q"] = i + "q_b_proj"
        return RuntimePatch(layer="model.layers.0", projections=projections, identities=tuple(identities),
                            contiguous=True)

    # -- the two choices side by side (inspect) ------------------------------------------------------------------
    def table_options(self) -> dict[str, dict[str, int]]:
        d, vocab = self.dims, self.spec.vocab_size
        out = {}
        for table in TABLES:
            folded = self.folded_for(table)
            new = sum(d.widths(table).values())
            kept = 0 if table == "full" else d.heads * d.head_dim * d.q_lora_rank + (
                d.index_heads * d.index_head_dim * d.q_lora_rank if d.kind == CSA else 0)
            out[table] = {
                "new_columns": new,
                "extra_entries": vocab * new,
                "eliminated_params": sum(int(np.prod(s)) for s in folded.values()),
                "eliminated_linear_params": sum(s[0] * s[1] for s in folded.values() if len(s) == 2),
                "kept_linear_params": kept,
                "reads_per_token": d.hidden + new,
            }
        return out
