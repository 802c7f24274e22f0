"""OLMo and OLMo 2 (serial; only Q, K, V fold).

olmo:  h = LayerNorm(x) without weight or bias, eps fixed at 1e-5 (no norm tensor exists on disk);
       q, k, v = W h (+ b if attention_bias), each clamped to [-clip_qkv, clip_qkv] when set, before RoPE.
       The runtime clamps the table's columns again, which changes nothing (clamping is idempotent).
olmo2: no norm before attention at all: q = RMSNorm(Wq x; q_norm), k = RMSNorm(Wk x; k_norm), each norm over the
       whole projection (H*hd or KV*hd), not per head; v = Wv x. Its post-norms act on attention and FFN outputs.
"""

from __future__ import annotations

import torch

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec

_LN_EPS = 1e-5  # OlmoLayerNorm's hard-coded eps


class _OlmoBase(Recipe):
    prefix = "model.layers.0."

    def describe(self) -> ModelSpec:
        c = self.cfg
        d, heads = c.int("hidden_size"), c.int("num_attention_heads")
        return ModelSpec(
            model_type=c.model_type, block="serial", positional="rope",
            hidden_size=d, num_heads=heads, num_kv_heads=c.int("num_key_value_heads", default=heads),
            head_dim=c.int("head_dim", default=d // heads), intermediate_size=c.int("intermediate_size"),
            ffn_matrices=3, num_experts=1, vocab_size=c.int("vocab_size"), num_layers=c.int("num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=False)), dtype=c.dtype,
        )

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    @property
    def embedding(self) -> str:
        return "model.embed_tokens.weight"

    def projections(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        out: dict[str, Shape] = {}
        for name, width in (("q", s.q_dim), ("k", s.kv_dim), ("v", s.kv_dim)):
            out[f"{p}self_attn.{name}_proj.weight"] = (width, s.hidden_size)
            if self.has_bias:
                out[f"{p}self_attn.{name}_proj.bias"] = (width,)
        return out

    def project(self, w: Weights, h: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.prefix
        return {n: ops.linear(h, w(f"{p}self_attn.{n}_proj.weight"),
                              w(f"{p}self_attn.{n}_proj.bias") if self.has_bias else None) for n in "qkv"}


@register
class Olmo(_OlmoBase):
    model_types = ("olmo",)

    def refusal(self) -> str | None:
        value = self.cfg.get("clip_qkv")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            return f"clip_qkv must be a positive number or null, got {value!r}"
        return None

    @property
    def clip(self) -> float | None:
        value = self.cfg.get("clip_qkv")
        return None if value is None else float(value)

    def folded(self) -> dict[str, Shape]:
        return self.projections()

    def fold(self, w: Weights, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = ops.upcast(x)
        out = self.project(w, ops.layer_norm(x, None, None, _LN_EPS))
        if self.clip is not None:
            out = {n: t.clamp(-self.clip, self.clip) for n, t in out.items()}
        return {"residual": x, **out}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(
            layer="model.layers.0",
            projections={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
            identities=("input_layernorm",),
        )


@register
class Olmo2(_OlmoBase):
    model_types = ("olmo2",)

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        return {**self.projections(), p + "self_attn.q_norm.weight": (s.q_dim,),
                p + "self_attn.k_norm.weight": (s.kv_dim,)}

    def fold(self, w: Weights, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.prefix
        eps = float(self.cfg.get("rms_norm_eps", default=1e-5))
        x = ops.upcast(x)
        out = self.project(w, x)
        for n in "qk":
            out[n] = ops.rms_norm(out[n], w(f"{p}self_attn.{n}_norm.weight"), eps)
        return {"residual": x, **out}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(
            layer="model.layers.0",
            projections={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
            identities=("self_attn.q_norm", "self_attn.k_norm"),
        )
