"""gpt-oss (gpt_oss; serial, only Q, K, V fold).

x = embed_tokens[t]; h = RMSNorm(x; input_layernorm, rms_norm_eps) with the weight applied in float32 before the cast
back (GptOssRMSNorm: `(w * x_normed).to(dtype)`; the table computes in float32 and rounds once, as that does);
q, k, v = W h + b (attention_bias, default true). RoPE, the per-head attention sinks (`self_attn.sinks`, which stay
in the model), sliding windows and the MoE FFN (router and experts, MXFP4 on the Hub) all act after the table.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class GptOss(Recipe):
    model_types = ("gpt_oss",)

    def describe(self) -> ModelSpec:
        # configuration_gpt_oss.py defaults (the 20b/120b sizes) for keys a config leaves out
        return self.hf_spec("serial", ffn_matrices=3, tied_default=False,
                            num_experts=max(self.cfg.int("num_local_experts", default=128), 1),
                            num_kv_heads_default=8, head_dim_default=64, intermediate_size_default=2880)

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=True))

    def folded(self) -> dict[str, Shape]:
        return {self.prefix + "input_layernorm.weight": (self.spec.hidden_size,), **self.qkv_tensors(self.has_bias)}

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        x = ops.upcast(x)
        eps = float(self.cfg.get("rms_norm_eps", default=1e-5))
        h = ops.rms_norm(x, w(self.prefix + "input_layernorm.weight"), eps)
        return {"residual": x, **self.project_qkv(w, h, self.has_bias)}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(layer="model.layers.0", projections=self.qkv_modules(), identities=("input_layernorm",))
