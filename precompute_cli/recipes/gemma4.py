"""Gemma 4's text decoder (gemma4_text; the multimodal gemma4 converts to it with --text-only): serial, Q, K, V and
the per-layer inputs fold. gemma4_unified_text (and the multimodal gemma4_unified) is the same layer 0 without
per-layer inputs or the MoE block.

x = embed_tokens[t] * sqrt(D) (the scale in the weight's dtype, as Gemma 3); h = RMSNorm(x) * w with the plain w
(not Gemma 3's 1 + w); q = q_norm(q_proj h), k = k_norm(k_proj h) per head, plain w again; v = v_norm(v_proj h),
a per-head RMSNorm without weight; all before RoPE (attention scaling 1.0). A full-attention layer 0 with
attention_k_eq_v has no v_proj: v = v_norm(k_proj h), the same projection as k through another norm. Its table then
holds the raw k projection, and the model keeps k_norm (its weight stays) and v_norm: one column for both.
Sandwich norms, the MoE block beside the MLP (serial), layer_scalar (a buffer on disk) and the per-layer gate of
every layer act after attention and stay. Layer 0's head_dim and KV heads come from per_layer_config["0"] when the
config has it (a saved config.json keys overrides by layer index; `config.head_dim` itself is ambiguous), else from
transformers' own rule: a full-attention layer gets global_head_dim (512) and, with attention_k_eq_v,
num_global_key_value_heads. Layer 0 is sliding by default (5 sliding : 1 full), and full when it is the only layer.
Per-layer inputs (hidden_size_per_layer_input set): recipes/per_layer.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import PaperCounts, RuntimePatch, Shape, Weights, register, spans
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate, sqrt_hidden
from precompute_cli.recipes.per_layer import COLUMN, PerLayerInputs
from precompute_cli.spec import TIED, Config

EPS = Key("rms_norm_eps", default=1e-6)
PER_LAYER = PerLayerInputs(clamp=False)
NO_PER_LAYER = PerLayerInputs(absent=True)  # gemma4_unified_text has none
ATTN = "self_attn."
# per_layer_config keys layer 0 may override without changing what the table holds (attention sizes are read;
# the window, RoPE and the FFN act after the table)
OVERRIDES_READ = ("head_dim", "num_key_value_heads")
OVERRIDES_AFTER = ("sliding_window", "rope_parameters", "intermediate_size", "moe_intermediate_size",
                   "num_experts", "top_k_experts", "layer_types")


def layer_types(cfg: Config) -> list[str]:
    """transformers' rule: every 6th layer full, the rest sliding; the last layer always full."""
    count = cfg.int("num_hidden_layers", default=30)
    given = cfg.data.get("layer_types")
    types = list(given) if isinstance(given, list) and given else [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(count)]
    if types:
        types[-1] = "full_attention"
    return types


def layer0_overrides(cfg: Config) -> dict:
    """Layer 0's per_layer_config entry, or what the config class derives when the config has none."""
    per_layer = cfg.data.get("per_layer_config")
    if isinstance(per_layer, dict):
        entry = per_layer.get("0", {})
        return entry if isinstance(entry, dict) else {"(not an object)": entry}
    if layer_types(cfg)[0] != "full_attention":
        return {}
    out = {"head_dim": cfg.get("global_head_dim", default=512)}
    if cfg.get("attention_k_eq_v", default=False) and cfg.get("num_global_key_value_heads") is not None:
        out["num_key_value_heads"] = cfg.get("num_global_key_value_heads")
    return out


def sizes(cfg: Config) -> Sizes:
    """Gemma 4's defaults, with layer 0's own head_dim and KV heads."""
    over = Config(layer0_overrides(cfg), cfg.path)
    head_dim = over.int("head_dim", default=cfg.int("head_dim", default=256))
    kv = over.int("num_key_value_heads", default=cfg.int("num_key_value_heads", default=4))
    experts = cfg.int("num_experts", default=1) if cfg.get("enable_moe_block", default=False) else 1
    return Sizes(num_kv_heads=Key(default=kv), head_dim=Key(default=head_dim), tied_embeddings=TIED,
                 num_experts=Key(default=experts),
                 intermediate_size=Key("intermediate_size", default=9216), hidden_size=Key("hidden_size", default=2304),
                 num_heads=Key("num_attention_heads", default=8), vocab_size=Key("vocab_size", default=262_144),
                 num_layers=Key("num_hidden_layers", default=30))


@register
class Gemma4(Declared):
    layouts = dict.fromkeys(("gemma4_text", "gemma4_unified_text"), Layout(
        embedding_scale=sqrt_hidden, input_norm=rms("input_layernorm", eps=EPS),
        qkv=separate(bias=Key("attention_bias", default=False)), qk_norm=rms(ATTN + "{}_norm", eps=EPS, scope="head")))

    def declare(self) -> Layout:
        return replace(self.layouts[self.cfg.model_type], sizes=sizes(self.cfg))

    @property
    def per_layer(self) -> PerLayerInputs:
        """gemma4_text's per-layer inputs; gemma4_unified_text has none, whatever its config says."""
        if self.cfg.model_type == "gemma4_unified_text":
            return NO_PER_LAYER
        return PER_LAYER

    @property
    def shares_kv(self) -> bool:
        """attention_k_eq_v on a layer 0 that is not sliding: no v_proj, v = v_norm(k_proj h)."""
        return bool(self.cfg.get("attention_k_eq_v", default=False)) and layer_types(self.cfg)[0] != "sliding_attention"

    @property
    def bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    def config_refusal(self) -> str | None:
        cfg = self.cfg
        over = layer0_overrides(cfg)
        odd = sorted(k for k in over if k not in OVERRIDES_READ + OVERRIDES_AFTER)
        if odd:
            return (f"per_layer_config overrides {', '.join(odd)} for layer 0, which precompute does not know how "
                    "the table would follow")
        if cfg.int("num_kv_shared_layers", default=0) >= self.spec.num_layers:
            return "num_kv_shared_layers covers layer 0, which then has no k and v projections of its own to fold"
        return self.per_layer.refusal(cfg, self.spec)

    def _projections(self) -> tuple[str, ...]:
        return ("q", "k") if self.shares_kv else ("q", "k", "v")

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        out = self.layout.input_norm.tensors(p, s)
        widths = {"q": s.q_dim, "k": s.kv_dim, "v": s.kv_dim}
        for n in self._projections():
            out[f"{p}{ATTN}{n}_proj.weight"] = (widths[n], s.hidden_size)
            if self.bias:
                out[f"{p}{ATTN}{n}_proj.bias"] = (widths[n],)
        out.update(self.layout.qk_norm.tensors(p, s, "q"))
        if not self.shares_kv:
            out.update(self.layout.qk_norm.tensors(p, s, "k"))
        out.update(self.per_layer.tensors(self.cfg, s))
        return out

    def kept(self) -> tuple[str, ...]:
        """With k = v sharing one projection, k_norm acts on the table's raw k, in the model."""
        return tuple(self.layout.qk_norm.tensors(self.prefix, self.spec, "k")) if self.shares_kv else ()

    def streamed(self) -> tuple[str, ...]:
        return self.per_layer.streamed(self.cfg)

    def columns(self) -> dict[str, tuple[int, int] | None]:
        """residual | q | k | v (none when k = v: the k column is the raw projection both read) | per_layer."""
        s = self.spec
        return spans([("residual", s.hidden_size if self.stores_residual else 0), ("q", s.q_dim), ("k", s.kv_dim),
                      ("v", 0 if self.shares_kv else s.kv_dim), (COLUMN, self.per_layer.width(self.cfg, s))])

    def paper_counts(self) -> PaperCounts:
        """Q, K, V (K alone when v is the k projection) and per_layer_model_projection, read per batch without the
        table; the per_layer columns stand in for the per-layer embedding row, as wide, read either way."""
        s = self.spec
        new = sum(span[1] - span[0] for name, span in self.columns().items() if name not in ("residual", COLUMN)
                  and span)
        return PaperCounts("attention", new * s.hidden_size + self.parallel_ffn_weights()
                           + self.per_layer.projection_weights(self.cfg, s), new,
                           also_read=self.per_layer.width(self.cfg, s))

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.per_layer.enabled(self.cfg):
            raise TypeError("gemma4 with per-layer inputs folds by token id: call fold_tokens")
        return self.fold_tokens(w, x, np.arange(len(x)))

    def fold_tokens(self, w: Weights, x: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        s, p, cfg, lay = self.spec, self.prefix, self.cfg, self.layout
        x = ops.upcast(x)
        e = self.scale_embedding(x)
        h = lay.input_norm.apply(w, e, p, cfg, s)

        def project(n: str) -> np.ndarray:
            module = f"{p}{ATTN}{n}_proj"
            return ops.linear(h, w(module + ".weight"), w(module + ".bias") if self.bias else None)

        out = {"residual": x, "q": lay.qk_norm.apply(w, project("q"), p, cfg, s, "q")}
        if self.shares_kv:
            out["k"] = project("k")  # raw: k_norm and v_norm both read it in the model
        else:
            out["k"] = lay.qk_norm.apply(w, project("k"), p, cfg, s, "k")
            eps = float(EPS.read(cfg))
            out["v"] = ops.per_head_rms_norm(project("v"), None, eps, s.head_dim)
        if self.per_layer.enabled(cfg):
            out[COLUMN] = self.per_layer.fold(w, e, tokens, cfg, s)
        return out

    def runtime_patch(self) -> RuntimePatch:
        norms = ("input_layernorm", ATTN + "q_norm") + (() if self.shares_kv else (ATTN + "k_norm", ATTN + "v_norm"))
        return RuntimePatch(
            layer=self.prefix.removesuffix("."),
            projections={n: f"{ATTN}{n}_proj" for n in self._projections()},
            identities=norms,
            embedding_scale=sqrt_hidden(self.spec),
            per_layer=self.per_layer.patch(self.cfg, self.spec),
        )
