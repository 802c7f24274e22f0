"""StableLM: serial by default, parallel with `use_parallel_residual`.

x = embed_tokens[t]; h = LayerNorm(x; input_layernorm weight and bias, layer_norm_eps); q, k, v = W h (+ b if
use_qkv_bias). qk_layernorm: one bias-free LayerNorm per head (q_layernorm.norms.{i}, k_layernorm.norms.{i}) before
RoPE. Serial: only Q, K, V fold. Parallel: out = x + attn(h) + mlp(h) with the same h, so the FFN folds too and the
residual columns hold x + mlp(h); the runtime's MLP of layer 0 returns zeros. head_dim is always d / heads, and the
partial rotary factor only decides which dims RoPE turns, after the fold.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec

_MLP = ("gate", "up", "down")


@register
class StableLm(Recipe):
    model_types = ("stablelm",)

    def describe(self) -> ModelSpec:
        d, heads = self.cfg.int("hidden_size"), self.cfg.int("num_attention_heads")
        # StableLmAttention always uses hidden_size // num_attention_heads, whatever head_dim says.
        return self.hf_spec("parallel" if self.parallel else "serial", ffn_matrices=3, tied_default=False,
                            head_dim=d // max(heads, 1))

    def refusal(self) -> str | None:
        return self.unknown_activation(self.cfg.get("hidden_act", default="silu")) if self.parallel else None

    @property
    def parallel(self) -> bool:
        return bool(self.cfg.get("use_parallel_residual", default=False))

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("use_qkv_bias", default=False))

    @property
    def qk_norm(self) -> bool:
        return bool(self.cfg.get("qk_layernorm", default=False))

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        out = {p + "input_layernorm.weight": (s.hidden_size,), p + "input_layernorm.bias": (s.hidden_size,),
               **self.qkv_tensors(self.has_bias)}
        if self.qk_norm:
            for name, heads in (("q", s.num_heads), ("k", s.num_kv_heads)):
                out.update({f"{p}self_attn.{name}_layernorm.norms.{i}.weight": (s.head_dim,) for i in range(heads)})
        if self.parallel:
            d, i = s.hidden_size, s.intermediate_size
            out.update({f"{p}mlp.{n}_proj.weight": (d, i) if n == "down" else (i, d) for n in _MLP})
        return out

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        eps = float(self.cfg.get("layer_norm_eps", default=1e-5))
        x = ops.upcast(x)
        h = ops.layer_norm(x, w(p + "input_layernorm.weight"), w(p + "input_layernorm.bias"), eps)
        out = self.project_qkv(w, h, self.has_bias)
        if self.qk_norm:
            for name, heads in (("q", s.num_heads), ("k", s.num_kv_heads)):
                weight = np.stack([w(f"{p}self_attn.{name}_layernorm.norms.{i}.weight") for i in range(heads)])
                out[name] = ops.per_head_layer_norm(out[name], weight, None, eps, s.head_dim)
        if self.parallel:
            act = str(self.cfg.get("hidden_act", default="silu"))
            x = x + ops.glu(h, *(w(f"{p}mlp.{n}_proj.weight") for n in _MLP), act)
        return {"residual": x, **out}

    def runtime_patch(self) -> RuntimePatch:
        qk_norms = ("self_attn.q_layernorm", "self_attn.k_layernorm") if self.qk_norm else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections=self.qkv_modules(),
            identities=("input_layernorm", *qk_norms),
            zeros=("mlp",) if self.parallel else (),
        )
