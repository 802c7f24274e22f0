"""Cohere (Command-R, Command-R+): a parallel block with one bias-free, mean-centred LayerNorm.

x = embed_tokens[t]; h = CohereLayerNorm(x) (float32, no bias); q, k, v = W h (+ b if attention_bias);
use_qk_norm: the same norm over head_dim on q and k before RoPE, with one weight row per head ([H, hd], [KV, hd]);
out = x + o_proj(attn) + down(silu(gate h) * up h), so the whole MLP of layer 0 folds into the residual columns.
Tied by default; the LM head's logit_scale comes after the last layer and is left alone.
"""

from __future__ import annotations

import torch

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


def cohere_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """CohereLayerNorm: (x - mean) / sqrt(var + eps) * weight; `weight` may be per head ([heads, hd])."""
    return ops.layer_norm(x, None, None, eps) * weight


@register
class Cohere(Recipe):
    model_types = ("cohere",)
    prefix = "model.layers.0."

    def describe(self) -> ModelSpec:
        c = self.cfg
        d, heads = c.int("hidden_size"), c.int("num_attention_heads")
        return ModelSpec(
            model_type="cohere", block="parallel", positional="rope",
            hidden_size=d, num_heads=heads, num_kv_heads=c.int("num_key_value_heads", default=heads),
            head_dim=c.int("head_dim", default=d // max(heads, 1)),
            intermediate_size=c.int("intermediate_size"), ffn_matrices=3, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=True)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        if self.act not in ops.ACTIVATIONS:
            return f"hidden_act {self.act!r} is not one precompute knows how to fold"
        return None

    @property
    def act(self) -> str:
        return self.cfg.get("hidden_act", default="silu")

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    @property
    def qk_norm(self) -> bool:
        return bool(self.cfg.get("use_qk_norm", default=False))

    @property
    def embedding(self) -> str:
        return "model.embed_tokens.weight"

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        d, inner = s.hidden_size, s.intermediate_size
        out: dict[str, Shape] = {p + "input_layernorm.weight": (d,)}
        for name, width in (("q", s.q_dim), ("k", s.kv_dim), ("v", s.kv_dim)):
            out[f"{p}self_attn.{name}_proj.weight"] = (width, d)
            if self.has_bias:
                out[f"{p}self_attn.{name}_proj.bias"] = (width,)
        if self.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (s.num_heads, s.head_dim)
            out[p + "self_attn.k_norm.weight"] = (s.num_kv_heads, s.head_dim)
        out.update({p + "mlp.gate_proj.weight": (inner, d), p + "mlp.up_proj.weight": (inner, d),
                    p + "mlp.down_proj.weight": (d, inner)})
        return out

    def fold(self, w: Weights, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p, s = self.prefix, self.spec
        x = ops.upcast(x)
        eps = float(self.cfg.get("layer_norm_eps", default=1e-5))
        h = cohere_norm(x, w(p + "input_layernorm.weight"), eps)
        out = {}
        for n in "qkv":
            bias = w(f"{p}self_attn.{n}_proj.bias") if self.has_bias else None
            out[n] = ops.linear(h, w(f"{p}self_attn.{n}_proj.weight"), bias)
        if self.qk_norm:
            for n in "qk":
                heads = out[n].unflatten(-1, (-1, s.head_dim))
                out[n] = cohere_norm(heads, w(f"{p}self_attn.{n}_norm.weight"), eps).flatten(-2)
        out["residual"] = x + ops.glu(h, w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight"),
                                      w(p + "mlp.down_proj.weight"), self.act)
        return out

    def runtime_patch(self) -> RuntimePatch:
        qk = ("self_attn.q_norm", "self_attn.k_norm") if self.qk_norm else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections={n: f"self_attn.{n}_proj" for n in "qkv"},
            identities=("input_layernorm", *qk),
            zeros=("mlp",),
        )
