"""BLOOM (serial, ALiBi; only Q, K, V fold), with a LayerNorm on the embedding before layer 0.

x = LN(word_embeddings[t]; word_embeddings_layernorm) is layer 0's input; h = LN(x; input_layernorm);
the fused `query_key_value` (bias always) is laid out per head as [q_h, k_h, v_h]. ALiBi acts on the attention
logits only, so nothing position-dependent reaches the table.
apply_residual_connection_post_layernorm: the attention's residual is h instead of x. When the table holds the
residual, it then holds h (input_layernorm passes through either way, since h is what the block sees); when it
does not (tied embeddings), input_layernorm stays in the model so that the residual is recomputed.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class Bloom(Recipe):
    model_types = ("bloom",)
    prefix = "transformer.h.0."
    base_prefix = "transformer."  # BLOOM checkpoints saved from BloomModel name tensors without it ("h.0....")
    emb_norm = "transformer.word_embeddings_layernorm"

    def describe(self) -> ModelSpec:
        c = self.cfg
        d = c.int("hidden_size", "n_embed")
        heads = c.int("n_head", "num_attention_heads")
        return ModelSpec(
            model_type="bloom", block="serial", positional="alibi",
            hidden_size=d, num_heads=heads, num_kv_heads=heads, head_dim=d // max(heads, 1),
            intermediate_size=4 * d, ffn_matrices=2, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("n_layer", "num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=True)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        s = self.spec
        if s.num_heads == 0 or s.hidden_size % s.num_heads:
            return f"hidden_size {s.hidden_size} is not a multiple of n_head {s.num_heads}"
        return None

    @property
    def post_ln_residual(self) -> bool:
        return bool(self.cfg.get("apply_residual_connection_post_layernorm", default=False))

    @property
    def keeps_input_norm(self) -> bool:
        """The model must still compute h itself: it is the residual, and the table does not hold it."""
        return self.post_ln_residual and not self.stores_residual

    @property
    def eps(self) -> float:
        return float(self.cfg.get("layer_norm_epsilon", default=1e-5))

    @property
    def embedding(self) -> str:
        return "transformer.word_embeddings.weight"

    def embedding_transforms(self) -> dict[str, Shape]:
        d = self.spec.hidden_size
        return {f"{self.emb_norm}.weight": (d,), f"{self.emb_norm}.bias": (d,)}

    def folded(self) -> dict[str, Shape]:
        d, p = self.spec.hidden_size, self.prefix
        return {p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
                p + "self_attention.query_key_value.weight": (3 * d, d),
                p + "self_attention.query_key_value.bias": (3 * d,)}

    def removed(self) -> dict[str, Shape]:
        names = super().removed()
        if self.keeps_input_norm:
            for k in ("weight", "bias"):
                del names[f"{self.prefix}input_layernorm.{k}"]
        return names

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        x = ops.layer_norm(ops.upcast(x), w(f"{self.emb_norm}.weight"), w(f"{self.emb_norm}.bias"), self.eps)
        h = ops.layer_norm(x, w(p + "input_layernorm.weight"), w(p + "input_layernorm.bias"), self.eps)
        fused = ops.linear(h, w(p + "self_attention.query_key_value.weight"),
                           w(p + "self_attention.query_key_value.bias"))
        q, k, v = ops.split_qkv(fused, s.num_heads, s.q_dim, s.kv_dim)
        return {"residual": h if self.post_ln_residual else x, "q": q, "k": k, "v": v}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(
            layer="transformer.h.0",
            projections={"qkv": "self_attention.query_key_value"},
            identities=() if self.keeps_input_norm else ("input_layernorm",),
            embedding_transforms=(self.emb_norm,),
            fused_groups=self.spec.num_heads,
        )
