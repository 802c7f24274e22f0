"""Gemma: gemma, gemma2, gemma3_text (serial; only Q, K, V fold).

x = embed_tokens[t] * sqrt(hidden_size), the scale cast to the run dtype and the product taken in that dtype.
In transformers 5 the scale sits inside the embedding module (GemmaTextScaledWordEmbedding), so it depends on the
dtype the model runs in. The table's residual columns therefore hold the raw row and the runtime repeats the product
(RuntimePatch.embedding_scale), exact in every dtype; q, k, v are folded from the product in the checkpoint's dtype
(RMSNorm makes them insensitive to the scale's rounding but for eps).
h = RMSNorm(x) * (1 + w), in float32; q, k, v = W h (+ b if attention_bias); gemma3_text: per-head q_norm/k_norm,
(1 + w) again, before RoPE. Gemma 2/3's sandwich norms, query_pre_attn_scalar, soft-capping and sliding windows all
act after RoPE or on the attention output, so none of them touches the table. head_dim defaults to 256 (not d/heads).
"""

from __future__ import annotations

import torch

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec

_QK_NORM = {"gemma3_text"}
_KV_DEFAULT = {"gemma": 16, "gemma2": 4, "gemma3_text": 4}  # the config classes' defaults when the key is absent


@register
class Gemma(Recipe):
    model_types = ("gemma", "gemma2", "gemma3_text")
    prefix = "model.layers.0."

    def describe(self) -> ModelSpec:
        c = self.cfg
        return ModelSpec(
            model_type=c.model_type, block="serial", positional="rope",
            hidden_size=c.int("hidden_size"), num_heads=c.int("num_attention_heads"),
            num_kv_heads=c.int("num_key_value_heads", default=_KV_DEFAULT[c.model_type]),
            head_dim=c.int("head_dim", default=256),
            intermediate_size=c.int("intermediate_size"), ffn_matrices=3, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=True)), dtype=c.dtype,
        )

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    @property
    def embedding(self) -> str:
        return "model.embed_tokens.weight"

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        out: dict[str, Shape] = {p + "input_layernorm.weight": (s.hidden_size,)}
        for name, width in (("q", s.q_dim), ("k", s.kv_dim), ("v", s.kv_dim)):
            out[f"{p}self_attn.{name}_proj.weight"] = (width, s.hidden_size)
            if self.has_bias:
                out[f"{p}self_attn.{name}_proj.bias"] = (width,)
        if s.model_type in _QK_NORM:
            out[p + "self_attn.q_norm.weight"] = (s.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (s.head_dim,)
        return out

    def scale_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """x * sqrt(d) exactly as the embedding module computes it in the model's dtype (the checkpoint's, which
        transformers loads by default): the scale rounded to that dtype, the product rounded to it too (bf16:
        sqrt(3072) is 55.5). The result comes back upcast, so float64 rows (verify) give float64 columns."""
        dtype = getattr(torch, self.spec.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            dtype = x.dtype
        return (x.to(dtype) * torch.tensor(self.spec.hidden_size ** 0.5).to(dtype)).to(ops.upcast(x).dtype)

    def fold(self, w: Weights, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p, s = self.prefix, self.spec
        out = {"residual": ops.upcast(x)}
        eps = float(self.cfg.get("rms_norm_eps", default=1e-6))
        h = ops.rms_norm(self.scale_embedding(x), w(p + "input_layernorm.weight"), eps, offset=1.0)
        for name in "qkv":
            bias = w(f"{p}self_attn.{name}_proj.bias") if self.has_bias else None
            out[name] = ops.linear(h, w(f"{p}self_attn.{name}_proj.weight"), bias)
        if s.model_type in _QK_NORM:
            for name in "qk":
                heads = out[name].unflatten(-1, (-1, s.head_dim))
                out[name] = ops.rms_norm(heads, w(f"{p}self_attn.{name}_norm.weight"), eps, offset=1.0).flatten(-2)
        return out

    def runtime_patch(self) -> RuntimePatch:
        qk_norms = ("self_attn.q_norm", "self_attn.k_norm") if self.cfg.model_type in _QK_NORM else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
            identities=("input_layernorm", *qk_norms),
            embedding_scale=self.spec.hidden_size ** 0.5,
        )
