"""The serial Llama skeleton: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, granite.

x = embed_tokens[t] (granite: * embedding_multiplier); h = RMSNorm(x; input_layernorm); q, k, v = W h (+ b);
qwen3*: per-head RMSNorm q_norm / k_norm before RoPE. Only Q, K, V fold: the FFN (dense or MoE) reads the
attention output. Per-type differences are the tables below, read from transformers' configuration files.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec

# Where q/k/v biases come from: a config key and its default, or a fixed answer.
_BIAS = {
    "llama": ("attention_bias", False), "qwen3": ("attention_bias", False), "qwen3_moe": ("attention_bias", False),
    "granite": ("attention_bias", False), "qwen2_moe": ("qkv_bias", True),
    "mistral": (None, False), "mixtral": (None, False), "qwen2": (None, True),
}
_KV_DEFAULT = {"mistral": 8, "mixtral": 8, "qwen3_moe": 4}
_EPS_DEFAULT = {"mixtral": 1e-5}
_QK_NORM = {"qwen3", "qwen3_moe"}
_EXPERT_KEYS = {
    "mixtral": ("num_local_experts", "num_experts"),
    "qwen2_moe": ("num_experts", "num_local_experts"),
    "qwen3_moe": ("num_experts", "num_local_experts"),
}


@register
class Llama(Recipe):
    model_types = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "granite")
    def describe(self) -> ModelSpec:
        c, t = self.cfg, self.cfg.model_type
        experts = c.int(*_EXPERT_KEYS[t], default=8 if t == "mixtral" else 0) if t in _EXPERT_KEYS else 1
        moe = experts > 1 and t in ("qwen2_moe", "qwen3_moe")
        return self.hf_spec(
            "serial", ffn_matrices=3, tied_default=False, num_experts=max(experts, 1),
            num_kv_heads_default=_KV_DEFAULT.get(t, c.int("num_attention_heads")),
            head_dim_default=128 if t == "qwen3" else None,
            **({"intermediate_size": c.int("moe_intermediate_size")} if moe else {}),
        )

    @property
    def has_bias(self) -> bool:
        key, default = _BIAS[self.cfg.model_type]
        return bool(self.cfg.get(key, default=default)) if key else default

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        out = {p + "input_layernorm.weight": (s.hidden_size,), **self.qkv_tensors(self.has_bias)}
        if self.cfg.model_type in _QK_NORM:
            out[p + "self_attn.q_norm.weight"] = (s.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (s.head_dim,)
        return out

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        # The residual columns replace the embedding module's output; granite multiplies after that module
        # (in GraniteModel.forward, which still runs), so its residual stays unscaled while q/k/v see the product.
        x = ops.upcast(x)  # before granite's multiplier: the float32 run multiplies in float32
        out = {"residual": x}
        if s.model_type == "granite":
            x = x * float(self.cfg.get("embedding_multiplier", default=1.0))
        eps = float(self.cfg.get("rms_norm_eps", default=_EPS_DEFAULT.get(s.model_type, 1e-6)))
        out.update(self.project_qkv(w, ops.rms_norm(x, w(p + "input_layernorm.weight"), eps), self.has_bias))
        if s.model_type in _QK_NORM:
            for name in "qk":
                out[name] = ops.per_head_rms_norm(out[name], w(f"{p}self_attn.{name}_norm.weight"), eps, s.head_dim)
        return out

    def runtime_patch(self) -> RuntimePatch:
        qk_norms = ("self_attn.q_norm", "self_attn.k_norm") if self.cfg.model_type in _QK_NORM else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections=self.qkv_modules(),
            identities=("input_layernorm", *qk_norms),
        )
