"""Cohere (Command-R, Command-R+): a parallel block with one bias-free, mean-centred LayerNorm.

x = embed_tokens[t]; h = CohereLayerNorm(x) (float32, no bias); q, k, v = W h (+ b if attention_bias);
use_qk_norm: the same norm over head_dim on q and k before RoPE, with one weight row per head ([H, hd], [KV, hd]);
out = x + o_proj(attn) + down(silu(gate h) * up h), so the whole MLP of layer 0 folds into the residual columns.
Tied by default; the LM head's logit_scale comes after the last layer and is left alone.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class Cohere(Recipe):
    model_types = ("cohere",)

    def describe(self) -> ModelSpec:
        return self.hf_spec("parallel", ffn_matrices=3, tied_default=True)

    def refusal(self) -> str | None:
        return self.unknown_activation(self.act)

    @property
    def act(self) -> str:
        return self.cfg.get("hidden_act", default="silu")

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))

    @property
    def qk_norm(self) -> bool:
        return bool(self.cfg.get("use_qk_norm", default=False))

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        d, inner = s.hidden_size, s.intermediate_size
        out = {p + "input_layernorm.weight": (d,), **self.qkv_tensors(self.has_bias)}
        if self.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (s.num_heads, s.head_dim)
            out[p + "self_attn.k_norm.weight"] = (s.num_kv_heads, s.head_dim)
        out.update({p + "mlp.gate_proj.weight": (inner, d), p + "mlp.up_proj.weight": (inner, d),
                    p + "mlp.down_proj.weight": (d, inner)})
        return out

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        x = ops.upcast(x)
        eps = float(self.cfg.get("layer_norm_eps", default=1e-5))
        h = ops.layer_norm(x, w(p + "input_layernorm.weight"), None, eps)  # CohereLayerNorm: no bias
        out = self.project_qkv(w, h, self.has_bias)
        if self.qk_norm:
            for n in "qk":
                out[n] = ops.per_head_layer_norm(out[n], w(f"{p}self_attn.{n}_norm.weight"), None, eps, s.head_dim)
        out["residual"] = x + ops.glu(h, w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight"),
                                      w(p + "mlp.down_proj.weight"), self.act)
        return out

    def runtime_patch(self) -> RuntimePatch:
        qk = ("self_attn.q_norm", "self_attn.k_norm") if self.qk_norm else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections=self.qkv_modules(),
            identities=("input_layernorm", *qk),
            zeros=("mlp",),
        )
