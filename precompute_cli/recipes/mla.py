"""Multi-head Latent Attention (MLA) at layer 0: deepseek_v2, deepseek_v3 (and Kimi-K2: model_type kimi_k2, the
DeepseekV3ForCausalLM architecture), deepseek_v32, glm4_moe_lite, mistral4, youtu, minicpm3, sarvam_mla, axk1,
glm_moe_dsa, longcat_flash, axk2, hy_v4.

Everything up to the latents is token-only (transformers' DeepseekV3Attention.forward and its twins):

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

Where the twins differ, the difference is data in their Latents (and Layout):
  minicpm3      the embedding module multiplies the row by scale_emb (Layout.embedding_scale, as Gemma's sqrt(d));
                its residual_scale acts on the attention output, after the table.
  glm_moe_dsa   deepseek_v32's indexer, present at layer 0 when indexer_types[0] is "full" (interleaved RoPE
                in the indexer, after the table); "shared" layers reuse the previous layer's top-k.
  longcat_flash two attention sublayers per decoder layer: layer 0's first (self_attn.0, input_layernorm.0) reads
                the token; the second, the dense MLPs and the shortcut MoE with its zero experts read sums of
                attention outputs. Its LoRA scales sqrt(hidden / rank) multiply q and the kv latent after
                q_b_proj and kv_a_layernorm: linear, they stay in the model and act on the table's columns.
  axk2          the input norm is gated: h = y * sigmoid(W_up(silu(W_down(y)))), y = RMSNorm(x) (NormGate), and
                q_b_proj (q_gate_proj in memory) reads [ql | q_a_proj(h)] and gives per head [q | output gate].
                The latent table holds q_a_proj(h) unnormed (q_a_layernorm stays, and so do q_b_proj and wq_b);
                the full one q_b_proj's output (q and gate) and wq_b(ql), q_a_proj and q_a_layernorm passing h
                through to modules that return table columns whatever they read.
  hy_v4         hyper-connections: the model expands x into hc_mult streams, all x at layer 0, and the attention
                reads input_layernorm(sum_j pre_j x), pre a function of those streams, so of the token
                (HyperPre); attn_hc stays in the model, as its post weights act after the attention. An output
                gate projection of h (linear_gate, gate_proj in memory) folds into an "output_gate" column (named
                apart from the declared families' "gate", which inspect adds to q, k, v); its indexer's k_norm
                takes rms_norm_eps; the sinks stay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from precompute_cli.block import MLA_TABLE
from precompute_cli.errors import InputError
from precompute_cli.recipes import ops
from precompute_cli.recipes.base import PaperCounts, RuntimePatch, Shape, Weights, register, spans
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms
from precompute_cli.spec import TIED, Config, ModelSpec, heads, value

TABLES = ("latent", "full")
DEFAULT_TABLE = "latent"
LATENT_EPS = 1e-6  # q_a_layernorm, kv_a_layernorm and the indexer's k_norm: the class default, never rms_norm_eps
_ATTN = "self_attn."


@dataclass(frozen=True)
class NormGate:
    """A low-rank sigmoid gate on the input norm's output (A.X-K2's GatedRMSNorm, Megatron's GatedNormWrapper):
    h = y * sigmoid(up(silu(down(y)))) with y the declared input norm of x. Names are under layer 0, on disk;
    `module` is the whole gated norm in memory, which passes through at runtime."""

    module: str = "input_layernorm"
    down: str = "input_layernorm.W_down"  # transformers' mlp.fc1: hidden -> rank
    up: str = "input_layernorm.W_up"  # mlp.fc2: rank -> hidden
    rank: Key = Key("gated_norm_rank", default=16)


@dataclass(frozen=True)
class HyperPre:
    """Hyper-connections in front of layer 0's attention (hy_v4's HYV4HyperConnection): the model feeds layer 0
    `streams` identical copies of x, and the attention's input norm reads sum_j pre_j * x with
    pre = sigmoid(scale[0] * (fn[:n] . [x, ..., x]) / rms([x, ..., x]) + base[:n]) + hc_eps, a function of x alone.
    The module stays (its post weights act after the attention): the fold reads its tensors and keeps them.
    DeepSeek-V4's form (comb) also mixes n x n comb weights: (2 + n) n rows and three scales; pre comes first."""

    fn: str = "hc_pre.hc_attn_layer.hc_fn"  # under layer 0, on disk (attn_hc.fn in memory)
    base: str = "hc_pre.hc_attn_layer.hc_base"
    scale: str = "hc_pre.hc_attn_layer.hc_scale"
    streams: Key = Key("hc_mult", default=4)
    eps: Key = Key("hc_eps", default=1e-6)
    norm_eps: Key = Key("rms_norm_eps", default=1e-5)  # the unweighted RMS of the flattened streams
    comb: bool = False

    def tensors(self, where: str, cfg: Config, hidden: int) -> dict[str, Shape]:
        n = self.streams.int(cfg, {})
        rows = (2 + n) * n if self.comb else 2 * n
        return {where + self.fn: (rows, n * hidden), where + self.base: (rows,),
                where + self.scale: (3 if self.comb else 2,)}

    def collapse(self, w: Weights, x: np.ndarray, where: str, cfg: Config) -> np.ndarray:
        """sum_j pre_j * x for n identical streams x."""
        n = self.streams.int(cfg, {})
        flat = np.concatenate([x] * n, axis=-1)
        logits = ops.linear(flat, w(where + self.fn)[:n]) / np.sqrt(ops.mean_square(flat) + float(value(cfg,
                                                                                              self.norm_eps)))
        pre = ops.sigmoid(logits * w(where + self.scale)[0] + w(where + self.base)[:n]) + float(value(cfg, self.eps))
        return pre.sum(-1, keepdims=True) * x


@dataclass(frozen=True)
class Latents:
    """Where a type's config keeps MLA's widths, with its configuration class's defaults (transformers 5.24), and
    what its attention does besides DeepSeek-V3's (module docstring)."""

    q_lora_rank: int | None  # the default; a null means a plain q_proj (DeepSeek-V2-Lite, Sarvam's default)
    kv_lora_rank: Key = Key("kv_lora_rank", default=512)
    rope: Key = Key("qk_rope_head_dim", default=64)
    nope: Key = Key("qk_nope_head_dim", default=128)
    v_head_dim: Key = Key("v_head_dim", default=128)  # a default may be a function of hidden_size and heads
    # the DSA indexer (deepseek_v32): always, or as layer 0's config says (glm_moe_dsa's indexer_types)
    indexer: bool | Callable[[Config], bool] = False
    index_heads: Key = Key("index_n_heads", default=64)
    index_head_dim: Key = Key("index_head_dim", default=128)
    attention: str = "self_attn."  # layer 0's token-reading attention (LongCat-Flash's first sublayer: self_attn.0.)
    plain_q: bool = True  # a null q_lora_rank means q_proj; False: the type always has q_a_proj (a null is refused)
    q_gate: bool = False  # A.X-K2: q_b_proj reads [ql | q_a_proj(h)] and gives per head [q (qk) | gate (v_head_dim)]
    input_gate: NormGate | None = None
    hyper: HyperPre | None = None
    gate: str | None = None  # hy_v4: an output gate projection of h under the attention, heads * v_head_dim wide
    index_eps: Key | float = LATENT_EPS  # the indexer's k_norm (hy_v4: rms_norm_eps)
    # LongCat-Flash: the normed latents are multiplied by sqrt(hidden / rank) (tensor arithmetic, no module) before
    # q_b_proj and kv_b_proj read them
    lora_scaled: bool = False
    # modules under the attention that transformers renames on loading: (on disk, in memory)
    memory: tuple[tuple[str, str], ...] = ()

    def read(self, cfg: Config) -> MlaDims:
        known: dict[str, Any] = {"hidden_size": cfg.int("hidden_size"), "num_heads": cfg.int("num_attention_heads")}
        null = "q_lora_rank" in cfg.data and cfg.data["q_lora_rank"] is None
        q_lora = None if null or (self.q_lora_rank is None and cfg.get("q_lora_rank") is None) else \
            cfg.int("q_lora_rank", default=self.q_lora_rank)
        indexer = self.indexer(cfg) if callable(self.indexer) else self.indexer
        return MlaDims(
            hidden=known["hidden_size"], heads=known["num_heads"], q_lora_rank=q_lora,
            kv_lora_rank=self.kv_lora_rank.int(cfg, known), rope=self.rope.int(cfg, known),
            nope=self.nope.int(cfg, known), v_head_dim=self.v_head_dim.int(cfg, known),
            index_heads=self.index_heads.int(cfg, known) if indexer else 0,
            index_head_dim=self.index_head_dim.int(cfg, known) if indexer else 0,
            q_gate=self.q_gate, gate=self.gate is not None,
        )

    def in_memory(self, module: str) -> str:
        """A module's path as the loaded model names it."""
        return dict(self.memory).get(module, module)


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
    q_gate: bool = False  # A.X-K2's q_b_proj: [ql | q latent before its norm] -> per head [q | gate]
    gate: bool = False  # hy_v4's output gate projection of h: heads * v_head_dim

    @property
    def q_full(self) -> int:
        """q_b_proj's output: every head's q (and with q_gate its output gate)."""
        return self.heads * (self.nope + self.rope + (self.v_head_dim if self.q_gate else 0))

    @property
    def q_b_input(self) -> int:
        return 2 * self.q_lora_rank if self.q_gate else self.q_lora_rank

    @property
    def kvb(self) -> int:
        return self.heads * (self.nope + self.v_head_dim)

    def widths(self, table: str) -> dict[str, int]:
        """The new columns of one table choice, in order (the residual, when stored, comes first)."""
        full = table == "full"
        q = self.q_full if full or self.q_lora_rank is None else self.q_lora_rank
        out = {"q": q, "kv": (self.kvb if full else self.kv_lora_rank) + self.rope}
        if self.gate:
            out["output_gate"] = self.heads * self.v_head_dim
        if self.index_heads:
            out.update(index_k=self.index_head_dim, index_w=self.index_heads)
            if full:
                out["index_q"] = self.index_heads * self.index_head_dim
        return out


def _moe_width(cfg: Config, known: dict[str, Any]) -> int:
    """Routed experts are moe_intermediate_size wide (the dense layers' intermediate_size is not layer 0's business)."""
    return cfg.int("moe_intermediate_size" if known["num_experts"] > 1 else "intermediate_size")


def _longcat_width(cfg: Config, known: dict[str, Any]) -> int:
    """LongCat-Flash's experts are expert_ffn_hidden_size wide, its dense MLPs ffn_hidden_size."""
    return cfg.int("expert_ffn_hidden_size" if known["num_experts"] > 1 else "ffn_hidden_size")


def _layout(experts: int, eps: float = 1e-6, norm: str = "input_layernorm", sizes: dict[str, Any] | None = None,
            **layout: Any) -> Layout:
    """An MLA type's Layout: Llama's names; every head gets the latent (num_kv_heads = heads). `sizes` overrides
    Sizes fields, `layout` Layout fields."""
    return Layout(sizes=Sizes(**{"num_kv_heads": Key(default=heads),
                                 "num_experts": Key("n_routed_experts", default=experts),
                                 "intermediate_size": _moe_width, **(sizes or {})}),
                  input_norm=rms(norm, eps=Key("rms_norm_eps", default=eps)), **layout)


def _per_head(v: dict[str, Any]) -> int:
    """MiniCPM3's v_head_dim when the config leaves it out: hidden_size / heads."""
    return v["hidden_size"] // max(v["num_heads"], 1)


def _layer0_indexes(cfg: Config) -> bool:
    """glm_moe_dsa, hy_v4: whether layer 0 runs its own indexer ("full") or reuses a previous layer's top-k
    ("shared"), from indexer_types, or (glm_moe_dsa) the index_topk_pattern or index_topk_freq and
    index_skip_topk_offset it is built from (GlmMoeDsaConfig.__post_init__); hy_v4's default makes layer 0 full."""
    types = cfg.get("indexer_types")
    if isinstance(types, list) and types:
        return types[0] == "full"
    pattern = cfg.get("index_topk_pattern")
    if isinstance(pattern, (str, list)) and pattern:
        return pattern[0] in ("F", "full")
    freq = max(cfg.int("index_topk_freq", default=1), 1)
    return max(1 - cfg.int("index_skip_topk_offset", default=2), 0) % freq == 0


class ChosenTable:
    """What a recipe with two tables to choose from (`--mla-table`: Mla, DeepseekV4) derives from the chosen one:
    the table's columns and the paper's counts. The recipe gives `table`, `dims.widths(table)` (its column groups in
    order) and `table_options()` (each table's widths and eliminated matrices, as inspect prints them)."""

    table: str = DEFAULT_TABLE  # "latent" | "full": chosen by convert's --mla-table, read back from the block

    def choices(self) -> dict[str, str]:
        return {MLA_TABLE: self.table}

    def choose(self, mla_table: str | None = None, **_: str | None) -> None:
        if mla_table is not None:
            self.table = check_table(mla_table)

    def columns(self) -> dict[str, tuple[int, int] | None]:
        """residual | the chosen table's column groups (q | kv | ...), in that order."""
        widths = {"residual": self.spec.hidden_size if self.stores_residual else 0, **self.dims.widths(self.table)}
        return spans(list(widths.items()))

    def paper_counts(self) -> PaperCounts:
        """The chosen table's widths and eliminated matrices (latents are not q_dim + 2 kv_dim wide)."""
        chosen = self.table_options()[self.table]
        return PaperCounts("attention", chosen["eliminated_linear_params"] + self.parallel_ffn_weights(),
                           chosen["new_columns"])


@register
class Mla(ChosenTable, Declared):
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
        "youtu": _layout(1, sizes={"tied_embeddings": TIED}),  # dense
        "minicpm3": _layout(1, eps=1e-5, sizes={"tied_embeddings": TIED}, embedding_scale=Key("scale_emb", default=12)),
        # DeepseekV3ForCausalLM; the original remote-code config spells the expert count num_experts
        "sarvam_mla": _layout(128, sizes={"num_experts": Key("n_routed_experts", "num_experts", default=128)}),
        "axk1": _layout(192),
        "glm_moe_dsa": _layout(256, eps=1e-5),
        # the decoder layers are num_layers (transformers' num_hidden_layers counts attention sublayers, twice that)
        "longcat_flash": _layout(512, eps=1e-5, norm="input_layernorm.0", sizes={
            "intermediate_size": _longcat_width, "num_layers": Key("num_layers", default=28)}),
        "axk2": _layout(128, norm="input_layernorm.norm"),
        "hy_v4": _layout(256, eps=1e-5),
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
        "youtu": Latents(1536),
        "minicpm3": Latents(768, kv_lora_rank=Key("kv_lora_rank", default=256),
                            rope=Key("qk_rope_head_dim", default=32), nope=Key("qk_nope_head_dim", default=64),
                            v_head_dim=Key("v_head_dim", default=_per_head)),
        "sarvam_mla": Latents(None),
        "axk1": Latents(1536, plain_q=False),
        "glm_moe_dsa": Latents(2048, nope=Key("qk_nope_head_dim", default=192),
                               v_head_dim=Key("v_head_dim", default=256), indexer=_layer0_indexes,
                               index_heads=Key("index_n_heads", default=32), plain_q=False),
        "longcat_flash": Latents(1536, attention="self_attn.0.", plain_q=False, lora_scaled=True),
        "axk2": Latents(384, kv_lora_rank=Key("kv_lora_rank", default=128), rope=Key("qk_rope_head_dim", default=32),
                        nope=Key("qk_nope_head_dim", default=64), v_head_dim=Key("v_head_dim", default=64),
                        indexer=True, index_heads=Key("index_n_heads", default=16), plain_q=False, q_gate=True,
                        input_gate=NormGate(), memory=(("q_b_proj", "q_gate_proj"),)),
        "hy_v4": Latents(1536, nope=Key("qk_nope_head_dim", default=192), v_head_dim=Key("v_head_dim", default=256),
                         indexer=_layer0_indexes, index_heads=Key("index_n_heads", default=16), plain_q=False,
                         hyper=HyperPre(), gate="linear_gate", index_eps=Key("rms_norm_eps", default=1e-5),
                         memory=(("linear_gate", "gate_proj"),)),
    }
    @property
    def mla(self) -> Latents:
        return self.latents[self.cfg.model_type]

    @property
    def dims(self) -> MlaDims:
        return self.mla.read(self.cfg)

    def describe(self) -> ModelSpec:
        d = self.dims
        return replace(super().describe(), head_dim=d.nope + d.rope)  # q and k heads; v heads are v_head_dim

    def config_refusal(self) -> str | None:
        d, t = self.dims, self.cfg.model_type
        if d.q_lora_rank is None and not self.mla.plain_q:
            return f"q_lora_rank must be set: {t}'s attention always projects q through q_a_proj"
        if d.kv_lora_rank <= 0 or d.rope <= 0 or (d.q_lora_rank is not None and d.q_lora_rank <= 0):
            return "kv_lora_rank, q_lora_rank and qk_rope_head_dim must be positive for MLA"
        qk = self.cfg.get("qk_head_dim")  # LongCat-Flash's is settable; the heads split into nope and rope parts
        if isinstance(qk, int) and qk != d.nope + d.rope:
            return f"qk_head_dim {qk} is not qk_nope_head_dim + qk_rope_head_dim ({d.nope} + {d.rope})"
        if d.index_heads and d.index_head_dim < d.rope:
            return f"index_head_dim {d.index_head_dim} is smaller than qk_rope_head_dim {d.rope}"
        if self.mla.input_gate and self.mla.input_gate.rank.int(self.cfg, {}) <= 0:
            return f"{self.mla.input_gate.rank.names[0]} must be positive"
        return None

    @property
    def has_bias(self) -> bool:
        """attention_bias adds biases to q_a_proj and kv_a_proj_with_mqa (and o_proj), never to q_proj or *_b_proj."""
        return bool(self.cfg.get("attention_bias", default=False))

    # -- what layer 0 reads -------------------------------------------------------------------------------------
    def folded(self) -> dict[str, Shape]:
        return self.folded_for(self.table)

    def folded_for(self, table: str) -> dict[str, Shape]:
        d, lat = self.dims, self.mla
        p, full = self.prefix + lat.attention, table == "full"
        out: dict[str, Shape] = dict(self.layout.input_norm.tensors(self.prefix, self.spec))
        if lat.input_gate:
            rank = lat.input_gate.rank.int(self.cfg, {})
            out[self.prefix + lat.input_gate.down + ".weight"] = (rank, d.hidden)
            out[self.prefix + lat.input_gate.up + ".weight"] = (d.hidden, rank)
        bias = self.has_bias
        if d.q_lora_rank is None:
            out[p + "q_proj.weight"] = (d.q_full, d.hidden)
        else:
            out[p + "q_a_proj.weight"] = (d.q_lora_rank, d.hidden)
            if bias:
                out[p + "q_a_proj.bias"] = (d.q_lora_rank,)
            if full or not d.q_gate:  # A.X-K2's latent table holds q_a_proj(h) unnormed: the norm stays (kept)
                out[p + "q_a_layernorm.weight"] = (d.q_lora_rank,)
            if full:
                out[p + "q_b_proj.weight"] = (d.q_full, d.q_b_input)
        out[p + "kv_a_proj_with_mqa.weight"] = (d.kv_lora_rank + d.rope, d.hidden)
        if bias:
            out[p + "kv_a_proj_with_mqa.bias"] = (d.kv_lora_rank + d.rope,)
        out[p + "kv_a_layernorm.weight"] = (d.kv_lora_rank,)
        if full:
            out[p + "kv_b_proj.weight"] = (d.kvb, d.kv_lora_rank)
        if lat.gate:
            out[p + lat.gate + ".weight"] = (d.heads * d.v_head_dim, d.hidden)
        if d.index_heads:
            out[p + "indexer.wk.weight"] = (d.index_head_dim, d.hidden)
            out[p + "indexer.k_norm.weight"] = (d.index_head_dim,)
            out[p + "indexer.k_norm.bias"] = (d.index_head_dim,)
            out[p + "indexer.weights_proj.weight"] = (d.index_heads, d.hidden)
            if full:
                out[p + "indexer.wq_b.weight"] = (d.index_heads * d.index_head_dim, d.q_lora_rank)
        return out

    def kept_inputs(self) -> dict[str, Shape]:
        """hy_v4: the hyper-connection's tensors, which the fold reads and the model keeps."""
        hyper = self.mla.hyper
        return hyper.tensors(self.prefix, self.cfg, self.spec.hidden_size) if hyper else {}

    def kept(self) -> tuple[str, ...]:
        """A.X-K2's latent table: q_a_layernorm, read after the table (on q_a_proj's output, which it holds)."""
        d = self.dims
        keep = d.q_gate and d.q_lora_rank is not None and self.table != "full"
        return (self.prefix + self.mla.attention + "q_a_layernorm.weight",) if keep else ()

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        d, lat, full = self.dims, self.mla, self.table == "full"
        p = self.prefix + lat.attention
        x = ops.upcast(x)
        a = self.scale_embedding(x) if self.layout.embedding_scale else x  # the residual stays the raw row
        if lat.hyper:
            a = lat.hyper.collapse(w, a, self.prefix, self.cfg)
        h = self.layout.input_norm.apply(w, a, self.prefix, self.cfg, self.spec)
        if lat.input_gate:
            down, up = (w(self.prefix + m + ".weight") for m in (lat.input_gate.down, lat.input_gate.up))
            h = h * ops.sigmoid(ops.linear(ops.silu(ops.linear(h, down)), up))

        def bias(name: str) -> np.ndarray | None:
            return w(p + name + ".bias") if self.has_bias else None

        out = {"residual": x}
        ql = None
        if d.q_lora_rank is None:
            out["q"] = ops.linear(h, w(p + "q_proj.weight"))
        else:
            qc = ops.linear(h, w(p + "q_a_proj.weight"), bias("q_a_proj"))
            if full or not d.q_gate:
                ql = ops.rms_norm(qc, w(p + "q_a_layernorm.weight"), LATENT_EPS)
            if d.q_gate:
                out["q"] = ops.linear(np.concatenate([ql, qc], axis=-1), w(p + "q_b_proj.weight")) if full else qc
            else:
                out["q"] = ops.linear(ql, w(p + "q_b_proj.weight")) if full else ql
        c = ops.linear(h, w(p + "kv_a_proj_with_mqa.weight"), bias("kv_a_proj_with_mqa"))
        lat_kv = ops.rms_norm(c[..., :d.kv_lora_rank], w(p + "kv_a_layernorm.weight"), LATENT_EPS)
        kv = ops.linear(lat_kv, w(p + "kv_b_proj.weight")) if full else lat_kv
        out["kv"] = np.concatenate([kv, c[..., d.kv_lora_rank:]], axis=-1)
        if lat.gate:
            out["output_gate"] = ops.linear(h, w(p + lat.gate + ".weight"))
        if d.index_heads:
            out["index_k"] = ops.layer_norm(ops.linear(h, w(p + "indexer.wk.weight")), w(p + "indexer.k_norm.weight"),
                                            w(p + "indexer.k_norm.bias"), float(value(self.cfg, lat.index_eps)))
            out["index_w"] = ops.linear(h, w(p + "indexer.weights_proj.weight"))
            if full:
                out["index_q"] = ops.linear(ql, w(p + "indexer.wq_b.weight"))
        return out

    def runtime_patch(self) -> RuntimePatch:
        d, lat, full = self.dims, self.mla, self.table == "full"

        def a(module: str) -> str:  # under the attention, as the loaded model names it
            return lat.attention + lat.in_memory(module)

        gated_q = d.q_gate and d.q_lora_rank is not None
        q = "q_proj" if d.q_lora_rank is None else "q_b_proj" if gated_q and full else "q_a_proj"
        projections = {"q": a(q), "kv": a("kv_a_proj_with_mqa")}
        identities = [lat.input_gate.module if lat.input_gate else self.layout.input_norm.module, a("kv_a_layernorm")]
        if d.q_lora_rank is not None:
            if gated_q:
                # the full table: q_a_proj and its norm pass h on to q_b_proj and wq_b, which return table columns
                identities += [a("q_a_proj"), a("q_a_layernorm")] if full else []
            else:
                identities.append(a("q_a_layernorm"))
                if full:
                    identities.append(a("q_b_proj"))
        if full:
            identities.append(a("kv_b_proj"))
        if lat.gate:
            projections["output_gate"] = a(lat.gate)
        if d.index_heads:
            projections.update(index_k=a("indexer.wk"), index_w=a("indexer.weights_proj"))
            if full:
                projections["index_q"] = a("indexer.wq_b")
        return RuntimePatch(
            layer="model.layers.0", projections=projections, identities=tuple(identities),
            # hy_v4's indexer casts wk's output to k_norm.weight.dtype before calling it
            dtype_identities=(a("indexer.k_norm"),) if d.index_heads else (),
            # the full table's kv columns hold kv_b_proj's output: the attention splits and caches that width
            attributes={a("kv_lora_rank"): d.kvb} if full else {},
            contiguous=True,
            embedding_scale=self.embedding_scale(),
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

    def modules_give_columns(self) -> bool:
        """The full table's b-projections read LongCat's scaled latents, which no module outputs."""
        return not (self.mla.lora_scaled and self.table == "full")

    def _kept_linear(self, table: str) -> int:
        d = self.dims
        if table == "full":
            return 0
        q_b = d.q_full * d.q_b_input if d.q_lora_rank is not None else 0
        wq_b = d.index_heads * d.index_head_dim * (d.q_lora_rank or 0)
        return q_b + d.kvb * d.kv_lora_rank + wq_b


def check_table(choice: str) -> str:
    if choice not in TABLES:
        raise InputError(f"--mla-table {choice!r}: choose one of {', '.join(TABLES)}")
    return choice
