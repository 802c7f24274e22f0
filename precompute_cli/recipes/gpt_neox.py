"""GPT-NeoX (Pythia, GPT-NeoX-20B): parallel by default, two LayerNorms of the same x, one fused QKV.

x = embed_in[t]; q, k, v = query_key_value(LN(x; input_layernorm)), the fused output interleaved per head
as [q_h, k_h, v_h] for h = 0..H-1 (GPTNeoXAttention views it as (H, 3*hd) and chunks it in three).
use_parallel_residual (default True): out = x + attn + mlp(LN(x; post_attention_layernorm)), so the whole MLP
of layer 0 folds into the residual columns. False: the MLP reads x + attn, and only Q, K, V fold.
On disk the LM head is `embed_out.weight` (transformers renames it to lm_head in memory).
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class GPTNeoX(Recipe):
    model_types = ("gpt_neox",)
    prefix = "gpt_neox.layers.0."

    def describe(self) -> ModelSpec:
        c = self.cfg
        d, heads = c.int("hidden_size"), c.int("num_attention_heads")
        parallel = bool(c.get("use_parallel_residual", default=True))
        # No GQA: a num_key_value_heads key (some configs carry one) is ignored by GPTNeoXAttention, and so here.
        return ModelSpec(
            model_type="gpt_neox", block="parallel" if parallel else "serial", positional="rope",
            hidden_size=d, num_heads=heads, num_kv_heads=heads, head_dim=d // max(heads, 1),
            intermediate_size=c.int("intermediate_size"), ffn_matrices=2, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=False)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        s = self.spec
        if s.num_heads == 0 or s.hidden_size % s.num_heads:
            return f"hidden_size {s.hidden_size} is not a multiple of num_attention_heads {s.num_heads}"
        act = self.cfg.get("hidden_act", default="gelu")
        return self.unknown_activation(act) if s.block == "parallel" else None

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=True))

    @property
    def eps(self) -> float:
        return float(self.cfg.get("layer_norm_eps", default=1e-5))

    @property
    def embedding(self) -> str:
        return "gpt_neox.embed_in.weight"

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        d, inner = s.hidden_size, s.intermediate_size
        norms = ("input_layernorm", "post_attention_layernorm") if s.block == "parallel" else ("input_layernorm",)
        out: dict[str, Shape] = {f"{p}{n}.{k}": (d,) for n in norms for k in ("weight", "bias")}
        out[p + "attention.query_key_value.weight"] = (3 * d, d)
        if self.has_bias:
            out[p + "attention.query_key_value.bias"] = (3 * d,)
        if s.block == "parallel":
            out.update({
                p + "mlp.dense_h_to_4h.weight": (inner, d), p + "mlp.dense_h_to_4h.bias": (inner,),
                p + "mlp.dense_4h_to_h.weight": (d, inner), p + "mlp.dense_4h_to_h.bias": (d,),
            })
        return out

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        x = ops.upcast(x)
        h = ops.layer_norm(x, w(p + "input_layernorm.weight"), w(p + "input_layernorm.bias"), self.eps)
        bias = w(p + "attention.query_key_value.bias") if self.has_bias else None
        fused = ops.linear(h, w(p + "attention.query_key_value.weight"), bias)
        out = dict(zip("qkv", ops.split_qkv(fused, s.num_heads, s.q_dim, s.kv_dim), strict=True))
        out["residual"] = x
        if s.block == "parallel":
            h2 = ops.layer_norm(x, w(p + "post_attention_layernorm.weight"), w(p + "post_attention_layernorm.bias"),
                                self.eps)
            out["residual"] = x + ops.mlp(h2, w(p + "mlp.dense_h_to_4h.weight"), w(p + "mlp.dense_h_to_4h.bias"),
                                          w(p + "mlp.dense_4h_to_h.weight"), w(p + "mlp.dense_4h_to_h.bias"),
                                          self.cfg.get("hidden_act", default="gelu"))
        return out

    def runtime_patch(self) -> RuntimePatch:
        parallel = self.spec.block == "parallel"
        return RuntimePatch(
            layer="gpt_neox.layers.0",
            projections={"qkv": "attention.query_key_value"},
            identities=("input_layernorm", "post_attention_layernorm") if parallel else ("input_layernorm",),
            zeros=("mlp",) if parallel else (),
            fused_groups=self.spec.num_heads,
        )
