"""Recipes as data: a family is one `Layout` per model_type, and one fold skeleton computes every layout.

A Layout says where layer 0's tensors are and what they do; `Declared` derives from it everything the converter, the
runtime and `inspect` ask: the ModelSpec (describe), the refusals, the tensors the table replaces (folded), the
table's columns (fold) and the modules the runtime swaps (runtime_patch). A tensor name is written once, in the
Layout. The skeleton, in order:

    x = embedding[t] -> embedding_norm -> (the residual columns)
      -> * embedding_scale / embedding_multiplier -> input_norm = h
      -> q, k, v = qkv(h) (a fused output split by its layout) -> clamp -> q/k norms before RoPE
      parallel blocks: residual = x + ffn(h, or ffn.norm(x))

How to add a model type
-----------------------
1. Read layer 0 in transformers' modeling file (models/<type>/modeling_<type>.py): the embedding module, the
   decoder layer's forward up to attention, the attention's forward up to RoPE; and its configuration file for the
   keys and their defaults. Anything that acts after RoPE or on the attention output is not the table's business.
2. If it is the Llama skeleton with other names, flags or norms, add a `Layout` to the family's `layouts` (or a
   new module in recipes/ with a `@register`ed `Declared` subclass: modules are discovered, nothing to import).
   Every field defaults to Llama's; write only what differs: Mistral is
   `Layout(sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8)))`, Qwen2 `Layout(qkv=separate(bias=True))`
   (recipes/llama.py). A Qwen3-like type with biases from a config key, a per-head q/k RMSNorm before RoPE, an eps
   default of 1e-5, three KV heads by default and a GPT-NeoX-style parallel FFN reading its own LayerNorm would be:

        from precompute_cli.recipes.base import register
        from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, layer_norm, mlp, rms, separate

        EPS = Key("rms_norm_eps", default=1e-5)

        @register
        class Example(Declared):
            layouts = {"example": Layout(
                sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=3)),
                input_norm=rms("input_layernorm", eps=EPS),
                qkv=separate("self_attn.{}_proj", bias=Key("attention_bias", default=False)),
                qk_norm=rms("self_attn.{}_norm", eps=EPS, scope="head"),
                parallel=True,
                ffn=mlp("fc1", "fc2", bias=True, act=Key("hidden_act", default="gelu"),
                        norm=layer_norm("post_attention_layernorm")),
            )}

   Names under the layer are relative to `prefix` ("model.layers.0."); "{}" in a q/k/v or q/k-norm name stands for
   q, k, v (a q/k norm named with other words sets fill=("query", "key"), Hunyuan). Norms are values: rms(...)
   with offset=1.0 for (1 + w), layer_norm(...) with bias=False for Cohere's mean-centred norm, l2(...) for an L2
   norm onto the unit sphere (Dory), weight=False for a weightless one; each with eps=Key(config key, default=...)
   or a fixed float. Fused projections:
   fused(module, "blocked" | "per_head" | "per_kv_group" | a fixed number of blocks, order="qkv" | "qvk").
   Clamp(key) clamps q, k, v to [-c, c] on the
   projections' outputs, or after the q/k norms with after_qk_norm=True (OLMoE). Tensors the attention reads after
   the table (sinks) go in keep=(...); a q/k norm after RoPE is declared with after_rope=True (it stays).
   A parallel block's FFN is mlp(up, down), glu(gate, up, down) or Moe(router, experts, shared expert...): it
   folds whole, a Moe's experts streamed (never held whole in float).
   Sizes (spec.Sizes) read transformers' common keys; a Key without names is a value the model fixes whatever the
   config says (spec.mha() for the older MHA families). Also: clamp=Clamp(key), embedding_multiplier=Key(...),
   embedding_scale=sqrt_hidden, embedding_norm=... (embedding_norm_in_model=True when the model must keep applying
   it: nanochat), norm_is_residual=Key(...), base_prefix="transformer.".
   A gated attention's gate projection of h folds into a column of its own: gate=Gate(module, per="channel"|"head").
   Names are those on disk; when transformers renames or splits them on loading (its conversion_mapping.py),
   memory=Layout(...) says how the loaded model names the same modules (exaone, sarvam_moe), for the runtime.
3. Add one row to the equivalence tests (tests/test_serial_families.py or test_parallel_families.py): a tiny
   random model of the type, converted and compared with transformers' own logits and generations.
4. Only what the skeleton cannot say is code: override `declare()` to build the Layout from config flags (Falcon),
   `config_refusal()` for flags the converter cannot honour (MPT), or `fold()` for a new kind of layer 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import FromLayout, PaperCounts, RuntimePatch, Shape, Weights
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value
from precompute_cli.st_io import NAME_TO_ST, from_float, to_float

__all__ = ["Clamp", "Declared", "Ffn", "Gate", "Key", "Layout", "Moe", "Norm", "Qkv", "Sizes", "fused", "glu",
           "l2", "layer_norm", "mlp", "rms", "separate", "sqrt_hidden"]


@dataclass(frozen=True)
class Norm:
    """A norm as data. `module` is its path under layer 0 (model-level for the embedding norm); in a q/k norm "{}"
    stands for q or k. The fold computes in float32 (float64 for verify) whatever the module's dtype."""

    module: str
    centred: bool = False  # LayerNorm (the mean removed first); else RMSNorm
    l2: bool = False  # an L2 norm, x / sqrt(sum x^2 + eps), where an RMSNorm divides by the mean (Dory's nGPT norms)
    weight: bool = True  # False: weightless (nothing on disk, OLMo)
    bias: bool = False
    offset: float = 0.0  # 1.0: the (1 + w) convention (Gemma)
    eps: Key | float = Key("rms_norm_eps", default=1e-6)
    scope: str = "hidden"  # q/k norms: "head" (over head_dim) or "projection" (over all of q or k)
    rows: str = "shared"  # per-head weights: "shared" [hd], "per_head" [H, hd], "modules" ({}.norms.i, one per head)
    when: Key | bool = True  # present only when this is true (a q/k norm behind a config flag)
    after_rope: bool = False  # a q/k norm applied after RoPE: outside the table, so it stays in the model
    fill: tuple[str, str] = ("q", "k")  # what "{}" in a q/k norm's name stands for (Hunyuan: "query", "key")

    def path(self, which: str = "") -> str:
        """The module's path under layer 0; `which` is "q" or "k" for a q/k norm."""
        return self.module.format(self.fill["qk".index(which)]) if which else self.module

    def __post_init__(self) -> None:
        if self.scope not in ("hidden", "head", "projection") or self.rows not in ("shared", "per_head", "modules"):
            raise ValueError(f"norm {self.module}: scope {self.scope!r} / rows {self.rows!r} is not one this knows")

    def tensors(self, where: str, spec: ModelSpec, which: str = "") -> dict[str, Shape]:
        """Its tensors on disk; `which` is "q" or "k" for a q/k norm."""
        module = where + self.path(which)
        if not self.weight:
            return {}
        kinds = ("weight", "bias") if self.bias else ("weight",)
        count = spec.num_heads if which == "q" else spec.num_kv_heads
        if self.scope == "projection":
            return {f"{module}.{k}": (count * spec.head_dim,) for k in kinds}
        if self.scope == "head" and self.rows == "modules":
            return {f"{module}.norms.{i}.{k}": (spec.head_dim,) for i in range(count) for k in kinds}
        if self.scope == "head":
            shape = (count, spec.head_dim) if self.rows == "per_head" else (spec.head_dim,)
            return {f"{module}.{k}": shape for k in kinds}
        return {f"{module}.{k}": (spec.hidden_size,) for k in kinds}

    def apply(self, w: Weights, x: np.ndarray, where: str, cfg: Config, spec: ModelSpec, which: str = "") -> np.ndarray:
        names = list(self.tensors(where, spec, which))
        if self.rows == "modules":  # one module per head: their weights stacked into [H, hd] (and biases so)
            step = 2 if self.bias else 1
            weight = np.stack([w(n) for n in names[::step]]) if self.weight else None
            bias = np.stack([w(n) for n in names[1::step]]) if self.bias else None
        else:
            weight = w(names[0]) if self.weight else None
            bias = w(names[1]) if self.bias else None
        eps = float(value(cfg, self.eps))
        y = ops.heads(x, spec.head_dim) if self.scope == "head" else x
        if self.l2:
            y = ops.l2_norm(y, weight, eps)
        elif self.centred:
            y = ops.layer_norm(y, weight if weight is None or not self.offset else weight + self.offset, bias, eps)
        else:
            y = ops.rms_norm(y, weight, eps, self.offset)
        return y.reshape(x.shape)


def rms(module: str, eps: Key | float = Key("rms_norm_eps", default=1e-6), **kind: Any) -> Norm:
    """RMSNorm (offset=1.0 for (1 + w); weight=False for a weightless one)."""
    return Norm(module, eps=eps, **kind)


def l2(module: str, eps: Key | float = 1e-6, weight: bool = False, **kind: Any) -> Norm:
    """An L2 norm onto the unit sphere (weightless unless weight=True)."""
    return Norm(module, l2=True, eps=eps, weight=weight, **kind)


def layer_norm(module: str, eps: Key | float = Key("layer_norm_eps", default=1e-5), bias: bool = True,
               **kind: Any) -> Norm:
    """LayerNorm, with a bias unless bias=False (Cohere's mean-centred norm, MPT)."""
    return Norm(module, centred=True, eps=eps, bias=bias, **kind)


# groups of [q part, k part, v part] in a fused output (ops.split_qkv), by layout
_GROUPS: dict[str, Callable[[ModelSpec], int]] = {
    "blocked": lambda s: 1, "per_head": lambda s: s.num_heads, "per_kv_group": lambda s: s.num_kv_heads,
}


@dataclass(frozen=True)
class Qkv:
    """Layer 0's Q, K, V projections: three modules ("{}" = q, k, v) or one fused module with a layout."""

    module: str = "self_attn.{}_proj"
    bias: Key | bool = False
    # fused: "blocked" [q; k; v], "per_head" [q_h, k_h, v_h], "per_kv_group" [q.., k, v], or a fixed number of
    # blocks (CodeGen's 4 model-parallel shards)
    layout: str | int | None = None
    order: str = "qkv"  # the parts' order inside each block of a fused output (CodeGen: "qvk")

    def widths(self, spec: ModelSpec) -> dict[str, int]:
        """The output width of each projection module."""
        if self.layout:
            return {self.module: spec.q_dim + 2 * spec.kv_dim}
        return {self.module.format(n): width for n, width in zip("qkv", (spec.q_dim, spec.kv_dim, spec.v_dim),
                                                                   strict=True)}

    def groups(self, spec: ModelSpec) -> int:
        """The number of [q part, k part, v part] blocks of a fused output."""
        return self.layout if isinstance(self.layout, int) else _GROUPS[self.layout](spec)


def separate(module: str = "self_attn.{}_proj", bias: Key | bool = False) -> Qkv:
    return Qkv(module, bias)


def fused(module: str, layout: str | int, bias: Key | bool = False, order: str = "qkv") -> Qkv:
    if not (layout in _GROUPS or (isinstance(layout, int) and layout > 0)):
        raise ValueError(f"fused QKV layout {layout!r}: one of {', '.join(_GROUPS)}, or a number of blocks")
    if order not in ("qkv", "qvk"):  # q first: split_qkv cuts a q-wide part, then two kv-wide ones
        raise ValueError(f"fused QKV order {order!r}: qkv or qvk")
    return Qkv(module, bias, layout, order)


@dataclass(frozen=True)
class Clamp:
    """q, k, v clamped to [-c, c] before RoPE, c read from `key` (None: no clamp; 0: none too when zero_is_off),
    on the projections' outputs, or on q and k after their norms when after_qk_norm (OLMoE)."""

    key: str
    zero_is_off: bool = False
    after_qk_norm: bool = False

    def limit(self, cfg: Config) -> float | None:
        c = cfg.get(self.key)
        return float(c) if (c if self.zero_is_off else c is not None) else None

    def refusal(self, cfg: Config) -> str | None:
        c = cfg.get(self.key)
        least = "non-negative" if self.zero_is_off else "positive"
        bad = isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0 or (c == 0 and not self.zero_is_off)
        return f"{self.key} must be a {least} number or null, got {c!r}" if c is not None and bad else None


@dataclass(frozen=True)
class Gate:
    """A gate on the attention output projected from h (afmoe, beam, laguna): a fourth per-token projection, so a
    table column "gate" after v. `per` says its width: "channel" (heads * head_dim) or "head" (heads)."""

    module: str = "self_attn.gate_proj"
    per: str = "channel"

    def width(self, spec: ModelSpec) -> int:
        return spec.q_dim if self.per == "channel" else spec.num_heads


@dataclass(frozen=True)
class Ffn:
    """Layer 0's FFN under `module`: two matrices (up, down) a plain MLP, three (gate, up, down) a GLU. It folds
    only in a parallel block, where it reads `norm`(x), or, without a norm of its own, the attention's h."""

    matrices: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    module: str = "mlp"
    bias: Key | bool = False  # plain MLPs only
    act: Key = Key("hidden_act", default="silu")
    norm: Norm | None = None

    def __post_init__(self) -> None:
        if len(self.matrices) not in (2, 3) or (len(self.matrices) == 3 and self.bias is not False):
            raise ValueError(f"FFN {self.matrices}: two matrices (with or without biases) or three without")

    def tensors(self, where: str, spec: ModelSpec, cfg: Config) -> dict[str, Shape]:
        d, inner, bias = spec.hidden_size, spec.intermediate_size, bool(value(cfg, self.bias))
        out: dict[str, Shape] = {}
        for name in self.matrices:
            shape = (d, inner) if name == self.matrices[-1] else (inner, d)  # the last is down: inner -> d
            out[f"{where}{self.module}.{name}.weight"] = shape
            if bias:
                out[f"{where}{self.module}.{name}.bias"] = shape[:1]
        return out

    def apply(self, w: Weights, h: np.ndarray, where: str, cfg: Config, spec: ModelSpec) -> np.ndarray:
        names = [f"{where}{self.module}.{m}" for m in self.matrices]
        act = str(value(cfg, self.act))
        if len(names) == 3:
            return ops.glu(h, *(w(n + ".weight") for n in names), act)
        up, down = names
        bias = bool(value(cfg, self.bias))
        return ops.mlp(h, w(up + ".weight"), w(up + ".bias") if bias else None,
                       w(down + ".weight"), w(down + ".bias") if bias else None, act)


@dataclass(frozen=True)
class Moe:
    """A routed GLU FFN under `module` (ops.moe): the router scores the experts (softmax over all of them, or the
    sigmoid of the top k), each token takes the top k ("{}" = the expert's index), and an optional shared expert,
    scaled by sigmoid(shared_gate x), is added to the routed sum or averaged with it. Experts are intermediate_size
    wide (Sizes), the shared expert `shared_width` (a Key, or a function of the config and spec; 0: none). In a
    parallel block the whole of it folds, as an Ffn does, and its experts are streamed: read a block of rows at a
    time and converted from their stored dtype as they are used, never held whole in float (Declared.streamed)."""

    router: str = "gate"
    experts: str = "experts.{}"
    matrices: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    module: str = "mlp"
    top_k: Key = Key("num_experts_per_tok", default=2)
    renormalize: Key | bool = Key("norm_topk_prob", default=False)
    shared: str | None = None
    shared_width: Key | Callable[[Config, ModelSpec], int] | None = None
    shared_gate: str | None = None
    scoring: Key | str = "softmax"  # ops.top_k_route: "softmax" or "sigmoid"
    average_shared: Key | bool = False  # (routed + shared) / 2 rather than their sum (Cohere 2 MoE's "average")
    act: Key = Key("hidden_act", default="silu")
    norm: Norm | None = None

    def _experts(self, spec: ModelSpec, cfg: Config) -> dict[str, int]:
        """Each expert's module (and the shared one's) under `module`, with its width."""
        widths = {self.experts.format(e): spec.intermediate_size for e in range(spec.num_experts)}
        if self.shared:
            width = self.shared_width
            width = (spec.intermediate_size if width is None else width.int(cfg, {}) if isinstance(width, Key)
                     else width(cfg, spec))
            if width:
                widths[self.shared] = width
        return widths

    def tensors(self, where: str, spec: ModelSpec, cfg: Config) -> dict[str, Shape]:
        m, d = where + self.module, spec.hidden_size
        out: dict[str, Shape] = {f"{m}.{self.router}.weight": (spec.num_experts, d)}
        for expert, inner in self._experts(spec, cfg).items():
            out.update({f"{m}.{expert}.{name}.weight": (d, inner) if name == self.matrices[-1] else (inner, d)
                        for name in self.matrices})
        if self.shared_gate:
            out[f"{m}.{self.shared_gate}.weight"] = (1, d)
        return out

    def streamed(self, where: str, spec: ModelSpec, cfg: Config) -> tuple[str, ...]:
        """The experts' matrices (the shared expert's too): read a block of rows at a time."""
        m = where + self.module
        return tuple(f"{m}.{expert}.{name}.weight" for expert in self._experts(spec, cfg) for name in self.matrices)

    def apply(self, w: Weights, h: np.ndarray, where: str, cfg: Config, spec: ModelSpec) -> np.ndarray:
        m = where + self.module

        def glu(expert: str) -> tuple[ops.Rows, ...]:
            return tuple(streamed(w, f"{m}.{expert}.{name}.weight") for name in self.matrices)

        shared = self.shared in self._experts(spec, cfg)
        return ops.moe(h, w(f"{m}.{self.router}.weight"), lambda e: glu(self.experts.format(e)), spec.num_experts,
                       int(value(cfg, self.top_k)), bool(value(cfg, self.renormalize)), str(value(cfg, self.act)),
                       shared=glu(self.shared) if shared else None,
                       shared_gate=w(f"{m}.{self.shared_gate}.weight") if shared and self.shared_gate else None,
                       scoring=str(value(cfg, self.scoring)), average_shared=bool(value(cfg, self.average_shared)))


def streamed(w: Weights, name: str) -> ops.Rows:
    """A weight the fold reads a block of rows at a time (plan.Reader.streamed); from any other accessor, whole."""
    return w.streamed(name) if hasattr(w, "streamed") else w(name)


def glu(gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj", **rest: Any) -> Ffn:
    return Ffn((gate, up, down), **rest)


def mlp(up: str, down: str, **rest: Any) -> Ffn:
    return Ffn((up, down), **rest)


def sqrt_hidden(spec: ModelSpec) -> float:
    """Gemma's embedding scale."""
    return spec.hidden_size ** 0.5


@dataclass(frozen=True)
class Layout:
    """Everything about one model type's layer 0 up to RoPE. Every field defaults to Llama's."""

    prefix: str = "model.layers.0."  # layer 0 on disk and in memory
    embedding: str = "model.embed_tokens.weight"
    base_prefix: str = ""  # a prefix some checkpoints of the family leave out of every tensor name (plan)
    sizes: Sizes = field(default_factory=Sizes)
    parallel: Key | bool = False  # attention and FFN both read the block's input
    positional: str = "rope"
    embedding_norm: Norm | None = None  # a model-level norm of the embedding before layer 0 (BLOOM)
    # the model applies embedding_norm itself, so the residual columns hold the raw row: nanochat's weightless
    # model.norm before layer 0 is also its final norm and cannot pass through
    embedding_norm_in_model: bool = False
    gate: Gate | None = None  # an attention output gate projected from h, separate q/k/v only

    def __post_init__(self) -> None:
        if self.gate and self.qkv.layout:
            raise ValueError("an attention gate beside a fused QKV projection is not one the runtime can swap")
    # inside the embedding module, in its dtype: a function of the spec (Gemma's sqrt(d)) or a config key (MiniCPM3)
    embedding_scale: Callable[[ModelSpec], float] | Key | None = None
    embedding_multiplier: Key | None = None  # after the embedding module, outside the residual columns (Granite)
    input_norm: Norm | None = field(default_factory=lambda: rms("input_layernorm"))
    norm_is_residual: Key | bool = False  # the attention's residual is input_norm(x), not x (BLOOM's flag)
    qkv: Qkv = field(default_factory=Qkv)
    qk_norm: Norm | None = None
    clamp: Clamp | None = None
    ffn: Ffn | Moe = field(default_factory=Ffn)
    keep: tuple[str, ...] = ()  # layer 0's tensors read after the table (sinks): they stay
    # The same layer as transformers holds it after loading, when its checkpoint conversion renames or splits the
    # tensors on disk (exaone's transformer.h.0.attn.attention.*, sarvam_moe's fused query_key_value): the runtime
    # swaps the modules named here. None: memory and disk agree.
    memory: Layout | None = None


def scaled_as_stored(x: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """x * scale exactly as a scaled embedding module computes it in the model's dtype (the checkpoint's, which
    transformers loads by default): the scale rounded to that dtype, the product rounded to it too (bf16:
    sqrt(3072) is 55.5). The result comes back upcast, so float64 rows (verify) give float64 columns.
    Row and scale are rounded to the model's dtype as loading does; their product is exact in float32 for
    bf16/f16 operands, so rounding it once more gives what torch's multiply in that dtype gives."""
    out, stored = ops.upcast(x).dtype, NAME_TO_ST.get(dtype)

    def rounded(a: np.ndarray) -> np.ndarray:
        return a.astype(out) if stored is None else to_float(from_float(a, stored), stored, out)

    return rounded(rounded(x) * rounded(np.float32(scale)))  # the module's buffer: a float32 tensor


class Declared(FromLayout):
    """A recipe computed from its model type's Layout. Subclasses set `layouts` (model_type -> Layout)."""

    layouts: ClassVar[dict[str, Layout]] = {}
    layout: Layout

    def __post_init__(self) -> None:
        self.layout = self.declare()
        super().__post_init__()

    def declare(self) -> Layout:
        """This config's Layout (a family whose layer 0 changes with config flags builds it here)."""
        return self.layouts[self.cfg.model_type]

    def config_refusal(self) -> str | None:
        """A family's own refusals, between the size checks and the clamp and activation checks."""
        return None

    # -- what the Layout answers ---------------------------------------------------------------------------------
    @property
    def base_prefix(self) -> str:  # type: ignore[override]
        return self.layout.base_prefix

    @property
    def parallel(self) -> bool:
        return bool(value(self.cfg, self.layout.parallel))

    @property
    def qk_norm(self) -> Norm | None:
        """The q/k norm the table folds (present in this config and before RoPE), or None."""
        norm = self.layout.qk_norm
        return norm if norm and not norm.after_rope and value(self.cfg, norm.when) else None

    @property
    def ffn_norm(self) -> Norm | None:
        return self.layout.ffn.norm if self.parallel else None

    @property
    def keeps_input_norm(self) -> bool:
        """The model must still compute h itself: it is the residual, and the table does not hold it."""
        return bool(value(self.cfg, self.layout.norm_is_residual)) and not self.stores_residual

    def describe(self) -> ModelSpec:
        lay = self.layout
        return lay.sizes.read(self.cfg, model_type=self.cfg.model_type, positional=lay.positional,
                              block="parallel" if self.parallel else "serial", ffn_matrices=len(lay.ffn.matrices))

    def refusal(self) -> str | None:
        lay, cfg = self.layout, self.cfg
        reason = lay.sizes.divisibility(self.spec) or self.config_refusal()
        reason = reason or (lay.clamp.refusal(cfg) if lay.clamp else None)
        if reason or not self.parallel:
            return reason
        return self.unknown_activation(value(cfg, lay.ffn.act), (*lay.ffn.act.names, "activation")[0])

    def embedding_transforms(self) -> dict[str, Shape]:
        norm = None if self.layout.embedding_norm_in_model else self.layout.embedding_norm
        return norm.tensors("", self.spec) if norm else {}

    def folded(self) -> dict[str, Shape]:
        lay, s, p = self.layout, self.spec, self.prefix
        out = lay.input_norm.tensors(p, s) if lay.input_norm else {}
        out.update(self.ffn_norm.tensors(p, s) if self.ffn_norm else {})
        has_bias = bool(value(self.cfg, lay.qkv.bias))
        for module, width in lay.qkv.widths(s).items():
            out[f"{p}{module}.weight"] = (width, s.hidden_size)
            if has_bias:
                out[f"{p}{module}.bias"] = (width,)
        if self.qk_norm:
            out.update({**self.qk_norm.tensors(p, s, "q"), **self.qk_norm.tensors(p, s, "k")})
        if lay.gate:
            out[f"{p}{lay.gate.module}.weight"] = (lay.gate.width(s), s.hidden_size)
        if self.parallel:
            out.update(lay.ffn.tensors(p, s, self.cfg))
        return out

    def streamed(self) -> tuple[str, ...]:
        """A parallel MoE's expert matrices (the router is small and read whole)."""
        ffn = self.layout.ffn
        return ffn.streamed(self.prefix, self.spec, self.cfg) if self.parallel and isinstance(ffn, Moe) else ()

    def columns(self) -> dict[str, tuple[int, int] | None]:
        """residual | q | k | v, then the attention gate's column when declared."""
        out = super().columns()
        if self.layout.gate:
            start = max(span[1] for span in out.values() if span)
            out["gate"] = (start, start + self.layout.gate.width(self.spec))
        return out

    def paper_counts(self) -> PaperCounts:
        """Q, K, V (and a parallel FFN), and an attention gate's projection beside them: a fourth column group."""
        counts = super().paper_counts()
        if not self.layout.gate:
            return counts
        width = self.layout.gate.width(self.spec)
        return replace(counts, eliminated_linear=counts.eliminated_linear + width * self.spec.hidden_size,
                       new_columns=counts.new_columns + width)

    def kept(self) -> tuple[str, ...]:
        """Layer 0's tensors the attention still reads after the table: declared ones and q/k norms after RoPE."""
        norm = self.layout.qk_norm
        after = norm.tensors("", self.spec, "q") | norm.tensors("", self.spec, "k") \
            if norm and norm.after_rope and value(self.cfg, norm.when) else {}
        return tuple(self.prefix + n for n in (*self.layout.keep, *after))

    def removed(self) -> dict[str, Shape]:
        names = super().removed()
        if self.keeps_input_norm and self.layout.input_norm:
            for name in self.layout.input_norm.tensors(self.prefix, self.spec):
                del names[name]
        return names

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        lay, s, p, cfg = self.layout, self.spec, self.prefix, self.cfg
        x = raw = ops.upcast(x)
        if lay.embedding_norm:
            x = lay.embedding_norm.apply(w, x, "", cfg, s)
        a = self.scale_embedding(x) if lay.embedding_scale else x
        if lay.embedding_multiplier:  # the embedding module's output (the residual) stays unscaled
            a = a * float(value(cfg, lay.embedding_multiplier))
        h = lay.input_norm.apply(w, a, p, cfg, s) if lay.input_norm else a
        out = {"residual": h if value(cfg, lay.norm_is_residual) else raw if lay.embedding_norm_in_model else x,
               **self.project(w, h)}
        if lay.gate:
            out["gate"] = ops.linear(h, w(f"{p}{lay.gate.module}.weight"), None)
        if self.qk_norm:
            for n in "qk":
                out[n] = self.qk_norm.apply(w, out[n], p, cfg, s, n)
        if lay.clamp and lay.clamp.after_qk_norm:
            out.update(self.clamped({n: out[n] for n in "qkv"}))
        if self.parallel:
            h_ffn = self.ffn_norm.apply(w, x, p, cfg, s) if self.ffn_norm else h
            out["residual"] = out["residual"] + lay.ffn.apply(w, h_ffn, p, cfg, s)
        return out

    def project(self, w: Weights, h: np.ndarray) -> dict[str, np.ndarray]:
        """q, k, v from h: the projections (a fused output split by its layout), clamped when declared."""
        qkv, p, s = self.layout.qkv, self.prefix, self.spec
        has_bias = bool(value(self.cfg, qkv.bias))
        ys = [ops.linear(h, w(f"{p}{m}.weight"), w(f"{p}{m}.bias") if has_bias else None) for m in qkv.widths(s)]
        clamp = self.layout.clamp
        if clamp and not clamp.after_qk_norm:
            ys = list(self.clamped(dict(enumerate(ys))).values())
        if qkv.layout:  # q first, then k and v (equal widths) in the declared order
            return dict(zip(qkv.order, ops.split_qkv(ys[0], self.fused_groups, s.q_dim, s.kv_dim), strict=True))
        return dict(zip("qkv", ys, strict=True))

    def clamped(self, ys: dict) -> dict:
        """Each value clamped to [-c, c] (unchanged when this config sets no clamp)."""
        limit = self.layout.clamp.limit(self.cfg) if self.layout.clamp else None
        return ys if limit is None else {n: np.clip(y, -limit, limit) for n, y in ys.items()}

    @property
    def fused_groups(self) -> int:
        return self.layout.qkv.groups(self.spec)

    def embedding_scale(self) -> float:
        """What the embedding module multiplies its row by (Layout.embedding_scale), 1.0 when nothing."""
        scale = self.layout.embedding_scale
        if scale is None:
            return 1.0
        return float(value(self.cfg, scale)) if isinstance(scale, Key) else float(scale(self.spec))

    def scale_embedding(self, x: np.ndarray) -> np.ndarray:
        """x * the layout's embedding scale as the embedding module computes it (scaled_as_stored)."""
        return scaled_as_stored(x, self.embedding_scale(), self.spec.dtype)

    def runtime_patch(self) -> RuntimePatch:
        lay = self.layout
        mem = lay.memory or lay  # module paths as transformers names them in memory
        norms = [mem.input_norm if mem.input_norm and not self.keeps_input_norm else None,
                 mem.ffn.norm if self.parallel else None]
        qk = [mem.qk_norm.path(n) for n in "qk"] if self.qk_norm and mem.qk_norm else []
        return RuntimePatch(
            layer=mem.prefix.removesuffix("."),
            projections={"qkv": mem.qkv.module} if mem.qkv.layout else {
                **{n: mem.qkv.module.format(n) for n in "qkv"}, **({"gate": mem.gate.module} if mem.gate else {})},
            identities=tuple(dict.fromkeys([*(n.module for n in norms if n), *qk])),
            zeros=(mem.ffn.module,) if self.parallel else (),
            embedding_transforms=(mem.embedding_norm.module,) if mem.embedding_norm and not
            lay.embedding_norm_in_model else (),
            fused_groups=self.fused_groups if mem.qkv.layout else None,
            fused_order=mem.qkv.order,
            embedding_scale=self.embedding_scale(),
        )
