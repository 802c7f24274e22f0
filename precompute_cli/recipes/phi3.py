"""Phi-3 (serial; only Q, K, V fold): Llama wiring with one fused projection.

x = embed_tokens[t]; h = RMSNorm(x; input_layernorm, rms_norm_eps default 1e-5); qkv = qkv_proj h, whose rows are
blocked [q; k; v] (H*hd, then KV*hd, then KV*hd) and carry no bias. Partial rotary and longrope act after the fold.
The runtime's stand-in for qkv_proj re-fuses the table's q, k, v columns in the same blocked order.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class Phi3(Recipe):
    model_types = ("phi3",)

    def describe(self) -> ModelSpec:
        return self.hf_spec("serial", ffn_matrices=3, tied_default=False)

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        return {p + "input_layernorm.weight": (s.hidden_size,),
                p + "self_attn.qkv_proj.weight": (s.q_dim + 2 * s.kv_dim, s.hidden_size)}

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        eps = float(self.cfg.get("rms_norm_eps", default=1e-5))
        x = ops.upcast(x)
        h = ops.rms_norm(x, w(p + "input_layernorm.weight"), eps)
        q, k, v = ops.split_qkv(ops.linear(h, w(p + "self_attn.qkv_proj.weight")), 1, s.q_dim, s.kv_dim)
        return {"residual": x, "q": q, "k": k, "v": v}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(layer="model.layers.0", projections={"qkv": "self_attn.qkv_proj"},
                            identities=("input_layernorm",), fused_groups=1)
