"""Multi-head Latent Attention (MLA) at layer 0: deepseek_v2, deepseek_v3 (and Kimi-K2: model_type kimi_k2, the
DeepseekV3ForCausalLM architecture), deepseek_v32, glm4_moe_lite, mistral4.

Everything up to the latents is token-only (transformers' DeepseekV3Attention.forward and its four twins):

    h     = RMSNorm(x; input_layernorm, rms_norm_eps)
    ql    = RMSNorm(q_a_proj(h) (+b); q_a_layernorm, eps 1e-6 fixed)     q = q_b_proj(ql)   (q_lora_rank set)
    q     = q_proj(h)                                                                        (q_lora_rank null)
    c     = kv_a_proj_with_mqa(h) (+b) = [c_kv (kv_lora_rank) | k_rot (qk_rope_head_dim, pre-RoPE)]
    lat   = RMSNorm(c_kv; kv_a_layernorm, eps 1e-6 fixed)                  kvb = kv_b_proj(lat) = per head [k_nope | v]

Two tables, chosen with `--mla-table`:
  latent (default): q = ql (or q), kv = [lat | k_rot]. q_a_proj, kv_a_proj_with_mqa and the norms go; q_b_proj and
      kv_b_proj stay and run on the looked-up latents (2112 columns for DeepSeek-V3). The attention caches the latent.
  full:  q = q_b_proj(ql), kv = [kvb | k_rot]: q_b_proj and kv_b_proj go too, for a table about 27x wider. The runtime
      widens layer 0's kv_lora_rank to the kvb width, so its cache holds the expanded keys and values.
deepseek_v32's DSA indexer reads, per token, wk(h) through k_norm (LayerNorm with bias, eps 1e-6 fixed) and
weights_proj(h): both read h, so both fold in either table (h is gone). Its wq_b reads ql: it stays with the latent
table (as q_b_proj does) and folds with the full one (ql is no longer there to read).
The FFN of layer 0 (dense when first_k_dense_replace >= 1 or mlp_layer_types[0] is "dense", else MoE) reads the
attention output: serial, it never folds. RoPE (interleaved or not, V2's complex form) acts after the table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from precompute_cli.block import MLA_TABLE
from precompute_cli.errors import InputError
from precompute_cli.recipes import ops
from precompute_cli.recipes.base import PaperCounts, RuntimePatch, Shape, Weights, register, spans
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms
from precompute_cli.spec import Config, ModelSpec, heads

TABLES = ("latent", "full")
DEFAULT_TABLE = "latent"
LATENT_EPS = 1e-6  # q_a_layernorm, kv_a_layernorm and the indexer's k_norm: the class default, never rms_norm_eps
_ATTN = "self_attn."


@dataclass(frozen=True)
class Latents:
    """Where a type's config keeps MLA's widths, with its configuration class's defaults (transformers 5.24)."""

    q_lora_rank: int  # the default; an explicit null in the config means a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: Key = Key("kv_lora_rank", default=512)
    rope: Key = Key("qk_rope_head_dim", default=64)
    nope: Key = Key("qk_nope_head_dim", default=128)
    v_head_dim: Key = Key("v_head_dim", default=128)
    indexer: bool = False  # deepseek_v32's DSA indexer
    index_heads: Key = Key("index_n_heads", default=64)
    index_head_dim: Key = Key("index_head_dim", default=128)

    def read(self, cfg: Config) -> MlaDims:
        known: dict[str, Any] = {}
        q_lora = None if "q_lora_rank" in cfg.data and cfg.data["q_lora_rank"] is None else \
            cfg.int("q_lora_rank", default=self.q_lora_rank)
        return MlaDims(
            hidden=cfg.int("hidden_size"), heads=cfg.int("num_attention_heads"), q_lora_rank=q_lora,
            kv_lora_rank=self.kv_lora_rank.int(cfg, known), rope=self.rope.int(cfg, known),
            nope=self.nope.int(cfg, known), v_head_dim=self.v_head_dim.int(cfg, known),
            index_heads=self.index_heads.int(cfg, known) if self.indexer else 0,
            index_head_dim=self.index_head_dim.int(cfg, known) if self.indexer else 0,
        )


@dataclass(frozen=True)
class MlaDims:
    """The widths MLA's layer 0 is made of (read from the config)."""

    hidden: int
    heads: int
    q_lora_rank: int | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int
    rope: int
    nope: int
    v_head_dim: int
    index_heads: int = 0  # deepseek_v32's indexer; 0 when there is none
    index_head_dim: int = 0

    @property
    def q_full(self) -> int:
        return self.heads * (self.nope + self.rope)

    @property
    def kvb(self) -> int:
        return self.heads * (self.nope + self.v_head_dim)

    def widths(self, table: str) -> dict[str, int]:
        """The new columns of one table choice, in order (the residual, when stored, comes first)."""
        full = table == "full"
        q = self.q_full if full or self.q_lora_rank is None else self.q_lora_rank
        out = {"q": q, "kv": (self.kvb if full else self.kv_lora_rank) + self.rope}
        if self.index_heads:
            out.update(index_k=self.index_head_dim, index_w=self.index_heads)
            if full:
                out["index_q"] = self.index_heads * self.index_head_dim
        return out


def _moe_width(cfg: Config, known: dict[str, Any]) -> int:
    """Routed experts are moe_intermediate_size wide (the dense layers' intermediate_size is not layer 0's business)."""
    return cfg.int("moe_intermediate_size" if known["num_experts"] > 1 else "intermediate_size")


def _layout(experts: int, eps: float = 1e-6) -> Layout:
    """An MLA type's Layout: Llama's names; every head gets the latent (num_kv_heads = heads)."""
    return Layout(sizes=Sizes(num_kv_heads=Key(default=heads), num_experts=Key("n_routed_experts", default=experts),
                              intermediate_size=_moe_width),
                  input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=eps)))


@register
class Mla(Declared):
    """The MLA kind of layer 0: its own fold, columns and runtime patch; each type is a Layout and its Latents."""

    layouts = {
        "deepseek_v2": _layout(64),
        "deepseek_v3": _layout(256),
        "deepseek_v32": _layout(256),
        # Moonshot's Kimi-K2 checkpoints say model_type "kimi_k2" (for inference engines to tell them apart) and
        # name DeepseekV3ForCausalLM as their architecture: DeepSeek-V3's layer 0 with other sizes.
        "kimi_k2": _layout(256),
        "glm4_moe_lite": _layout(64, eps=1e-5),
        "mistral4": _layout(128),
    }
    latents: ClassVar[dict[str, Latents]] = {
        "deepseek_v2": Latents(1536),
        "deepseek_v3": Latents(1536),
        "deepseek_v32": Latents(1536, indexer=True),
        "kimi_k2": Latents(1536),
        "glm4_moe_lite": Latents(768, nope=Key("qk_nope_head_dim", default=192),
                                 v_head_dim=Key("v_head_dim", default=256)),
        "mistral4": Latents(1024, kv_lora_rank=Key("kv_lora_rank", default=256),
                            nope=Key("qk_nope_head_dim", default=64)),
    }
    table: str = DEFAULT_TABLE  # "latent" | "full": chosen by convert's --mla-table, read back from the block

    def choices(self) -> dict[str, str]:
        return {MLA_TABLE: self.table}

    def choose(self, mla_table: str | None = None, **_: str | None) -> None:
        if mla_table is not None:
            self.table = check_table(mla_table)

    @property
    def dims(self) -> MlaDims:
        return self.latents[self.cfg.model_type].read(self.cfg)

    def describe(self) -> ModelSpec:
        d = self.dims
        return replace(super().describe(), head_dim=d.nope + d.rope)  # q and k heads; v heads are v_head_dim

    def config_refusal(self) -> str | None:
        d = self.dims
        if d.kv_lora_rank <= 0 or d.rope <= 0 or (d.q_lora_rank is not None and d.q_lora_rank <= 0):
            return "kv_lora_rank, q_lora_rank and qk_rope_head_dim must be positive for MLA"
        if d.index_heads and d.index_head_dim < d.rope:
            return f"index_head_dim {d.index_head_dim} is smaller than qk_rope_head_dim {d.rope}"
        return None

    @property
    def has_bias(self) -> bool:
        """attention_bias adds biases to q_a_proj and kv_a_proj_with_mqa (and o_proj), never to q_proj or *_b_proj."""
        return bool(self.cfg.get("attention_bias", default=False))

    # -- what layer 0 reads -------------------------------------------------------------------------------------
    def folded(self) -> dict[str, Shape]:
        return self.folded_for(self.table)

    def folded_for(self, table: str) -> dict[str, Shape]:
        d, p = self.dims, self.prefix + _ATTN
        out: dict[str, Shape] = dict(self.layout.input_norm.tensors(self.prefix, self.spec))
        bias = self.has_bias
        if d.q_lora_rank is None:
            out[p + "q_proj.weight"] = (d.q_full, d.hidden)
        else:
            out[p + "q_a_proj.weight"] = (d.q_lora_rank, d.hidden)
            if bias:
                out[p + "q_a_proj.bias"] = (d.q_lora_rank,)
            out[p + "q_a_layernorm.weight"] = (d.q_lora_rank,)
            if table == "full":
                out[p + "q_b_proj.weight"] = (d.q_full, d.q_lora_rank)
        out[p + "kv_a_proj_with_mqa.weight"] = (d.kv_lora_rank + d.rope, d.hidden)
        if bias:
            out[p + "kv_a_proj_with_mqa.bias"] = (d.kv_lora_rank + d.rope,)
        out[p + "kv_a_layernorm.weight"] = (d.kv_lora_rank,)
        if table == "full":
            out[p + "kv_b_proj.weight"] = (d.kvb, d.kv_lora_rank)
        if d.index_heads:
            out[p + "indexer.wk.weight"] = (d.index_head_dim, d.hidden)
            out[p + "indexer.k_norm.weight"] = (d.index_head_dim,)
            out[p + "indexer.k_norm.bias"] = (d.index_head_dim,)
            out[p + "indexer.weights_proj.weight"] = (d.index_heads, d.hidden)
            if table == "full":
                out[p + "indexer.wq_b.weight"] = (d.index_heads * d.index_head_dim, d.q_lora_rank)
        return out

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        d, p, full = self.dims, self.prefix + _ATTN, self.table == "full"
        x = ops.upcast(x)
        h = self.layout.input_norm.apply(w, x, self.prefix, self.cfg, self.spec)

        def bias(name: str) -> np.ndarray | None:
            return w(p + name + ".bias") if self.has_bias else None

        out = {"residual": x}
        if d.q_lora_rank is None:
            out["q"] = ops.linear(h, w(p + "q_proj.weight"))
        else:
            ql = ops.rms_norm(ops.linear(h, w(p + "q_a_proj.weight"), bias("q_a_proj")),
                              w(p + "q_a_layernorm.weight"), LATENT_EPS)
            out["q"] = ops.linear(ql, w(p + "q_b_proj.weight")) if full else ql
        c = ops.linear(h, w(p + "kv_a_proj_with_mqa.weight"), bias("kv_a_proj_with_mqa"))
        lat = ops.rms_norm(c[..., :d.kv_lora_rank], w(p + "kv_a_layernorm.weight"), LATENT_EPS)
        kv = ops.linear(lat, w(p + "kv_b_proj.weight")) if full else lat
        out["kv"] = np.concatenate([kv, c[..., d.kv_lora_rank:]], axis=-1)
        if d.index_heads:
            out["index_k"] = ops.layer_norm(ops.linear(h, w(p + "indexer.wk.weight")), w(p + "indexer.k_norm.weight"),
                                            w(p + "indexer.k_norm.bias"), LATENT_EPS)
            out["index_w"] = ops.linear(h, w(p + "indexer.weights_proj.weight"))
            if full:
                out["index_q"] = ops.linear(ql, w(p + "indexer.wq_b.weight"))
        return out

    def columns(self) -> dict[str, tuple[int, int] | None]:
        """residual | q | kv (| index_k | index_w | index_q), in that order."""
        widths = {"residual": self.spec.hidden_size if self.stores_residual else 0, **self.dims.widths(self.table)}
        return spans(list(widths.items()))

    def runtime_patch(self) -> RuntimePatch:
        d, full = self.dims, self.table == "full"
        a = _ATTN
        projections = {"q": a + ("q_proj" if d.q_lora_rank is None else "q_a_proj"), "kv": a + "kv_a_proj_with_mqa"}
        identities = ["input_layernorm", a + "kv_a_layernorm"]
        if d.q_lora_rank is not None:
            identities.append(a + "q_a_layernorm")
            if full:
                identities.append(a + "q_b_proj")
        if full:
            identities.append(a + "kv_b_proj")
        if d.index_heads:
            projections.update(index_k=a + "indexer.wk", index_w=a + "indexer.weights_proj")
            identities.append(a + "indexer.k_norm")
            if full:
                projections["index_q"] = a + "indexer.wq_b"
        return RuntimePatch(
            layer="model.layers.0", projections=projections, identities=tuple(identities),
            # the full table's kv columns hold kv_b_proj's output: the attention splits and caches that width
            attributes={a + "kv_lora_rank": d.kvb} if full else {},
            contiguous=True,
        )

    # -- the two choices side by side (inspect) ------------------------------------------------------------------
    def table_options(self) -> dict[str, dict[str, int]]:
        """Per table choice: new columns, extra entries (vocab x new columns), eliminated weights (every element
        removed from layer 0's attention), eliminated linear weights, and layer-0 reads per token with the table."""
        d, vocab = self.dims, self.spec.vocab_size
        out = {}
        for table in TABLES:
            folded = self.folded_for(table)
            new = sum(self.dims.widths(table).values())
            linear = sum(s[0] * s[1] for s in folded.values() if len(s) == 2)
            out[table] = {
                "new_columns": new,
                "extra_entries": vocab * new,
                "eliminated_params": sum(int(np.prod(s)) for s in folded.values()),
                "eliminated_linear_params": linear,
                # weights layer 0 still reads per token before attention, beyond its table row: q_b_proj, kv_b_proj
                # (and the indexer's wq_b) stay with the latent table
                "kept_linear_params": self._kept_linear(table),
                "reads_per_token": d.hidden + new,  # x and the new columns, as the analysis counts them
            }
        return out

    def paper_counts(self) -> PaperCounts:
        """The chosen table's widths and eliminated matrices (the latents are not q_dim + 2 kv_dim wide)."""
        chosen = self.table_options()[self.table]
        return PaperCounts("attention", chosen["eliminated_linear_params"] + self.parallel_ffn_weights(),
                           chosen["new_columns"])

    def _kept_linear(self, table: str) -> int:
        d = self.dims
        if table == "full":
            return 0
        q_b = d.q_full * d.q_lora_rank if d.q_lora_rank is not None else 0
        wq_b = d.index_heads * d.index_head_dim * (d.q_lora_rank or 0)
        return q_b + d.kvb * d.kv_lora_rank + wq_b


def check_table(choice: str) -> str:
    if choice not in TABLES:
        raise InputError(f"--mla-table {choice!r}: choose one of {', '.join(TABLES)}")
    return choice
