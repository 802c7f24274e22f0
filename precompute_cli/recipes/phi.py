"""Phi (phi-1, phi-1.5, phi-2): a parallel block with one LayerNorm shared by attention and MLP.

x = embed_tokens[t]; h = LN(x; input_layernorm); q, k, v = W h + b (biases always);
qk_layernorm: a LayerNorm over head_dim, shared by all heads, on q and k before RoPE;
out = x + dense(attn) + fc2(act(fc1 h)), so the whole MLP of layer 0 folds into the residual columns.
The LM head has a bias; tying is off by default.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class Phi(Recipe):
    model_types = ("phi",)

    def describe(self) -> ModelSpec:
        return self.hf_spec("parallel", ffn_matrices=2, tied_default=False)

    def refusal(self) -> str | None:
        return self.unknown_activation(self.act)

    @property
    def act(self) -> str:
        return self.cfg.get("hidden_act", default="gelu_new")

    @property
    def qk_layernorm(self) -> bool:
        return bool(self.cfg.get("qk_layernorm", default=False))

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        d, inner = s.hidden_size, s.intermediate_size
        out: dict[str, Shape] = {p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,)}
        out.update(self.qkv_tensors(bias=True))
        if self.qk_layernorm:
            # PhiAttention sizes these LayerNorms hidden_size // num_attention_heads.
            for name in "qk":
                out[f"{p}self_attn.{name}_layernorm.weight"] = (d // s.num_heads,)
                out[f"{p}self_attn.{name}_layernorm.bias"] = (d // s.num_heads,)
        out.update({
            p + "mlp.fc1.weight": (inner, d), p + "mlp.fc1.bias": (inner,),
            p + "mlp.fc2.weight": (d, inner), p + "mlp.fc2.bias": (d,),
        })
        return out

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        x = ops.upcast(x)
        eps = float(self.cfg.get("layer_norm_eps", default=1e-5))
        h = ops.layer_norm(x, w(p + "input_layernorm.weight"), w(p + "input_layernorm.bias"), eps)
        out = self.project_qkv(w, h, bias=True)
        if self.qk_layernorm:
            for n in "qk":
                norm = f"{p}self_attn.{n}_layernorm."
                out[n] = ops.per_head_layer_norm(out[n], w(norm + "weight"), w(norm + "bias"), eps, s.head_dim)
        out["residual"] = x + ops.mlp(h, w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias"),
                                      w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"), self.act)
        return out

    def runtime_patch(self) -> RuntimePatch:
        qk = ("self_attn.q_layernorm", "self_attn.k_layernorm") if self.qk_layernorm else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections=self.qkv_modules(),
            identities=("input_layernorm", *qk),
            zeros=("mlp",),
        )
