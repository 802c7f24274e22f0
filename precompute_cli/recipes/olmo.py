"""OLMo and OLMo 2 (serial; only Q, K, V fold).

olmo:  h = LayerNorm(x) without weight or bias, eps fixed at 1e-5 (no norm tensor exists on disk);
       q, k, v = W h (+ b if attention_bias), each clamped to [-clip_qkv, clip_qkv] when set, before RoPE.
       The runtime clamps the table's columns again, which changes nothing (clamping is idempotent).
olmo2: no norm before attention at all: q = RMSNorm(Wq x; q_norm), k = RMSNorm(Wk x; k_norm), each norm over the
       whole projection (H*hd or KV*hd), not per head; v = Wv x. Its post-norms act on attention and FFN outputs.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec

_LN_EPS = 1e-5  # OlmoLayerNorm's hard-coded eps


class _OlmoBase(Recipe):

    def describe(self) -> ModelSpec:
        return self.hf_spec("serial", ffn_matrices=3, tied_default=False)

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("attention_bias", default=False))


@register
class Olmo(_OlmoBase):
    model_types = ("olmo",)

    def refusal(self) -> str | None:
        value = self.cfg.get("clip_qkv")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            return f"clip_qkv must be a positive number or null, got {value!r}"
        return None

    @property
    def clip(self) -> float | None:
        value = self.cfg.get("clip_qkv")
        return None if value is None else float(value)

    def folded(self) -> dict[str, Shape]:
        return self.qkv_tensors(self.has_bias)

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        x = ops.upcast(x)
        out = self.project_qkv(w, ops.layer_norm(x, None, None, _LN_EPS), self.has_bias)
        if self.clip is not None:
            out = {n: np.clip(t, -self.clip, self.clip) for n, t in out.items()}
        return {"residual": x, **out}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(
            layer="model.layers.0",
            projections=self.qkv_modules(),
            identities=("input_layernorm",),
        )


@register
class Olmo2(_OlmoBase):
    model_types = ("olmo2",)

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        return {**self.qkv_tensors(self.has_bias), p + "self_attn.q_norm.weight": (s.q_dim,),
                p + "self_attn.k_norm.weight": (s.kv_dim,)}

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p = self.prefix
        eps = float(self.cfg.get("rms_norm_eps", default=1e-5))
        x = ops.upcast(x)
        out = self.project_qkv(w, x, self.has_bias)
        for n in "qk":
            out[n] = ops.rms_norm(out[n], w(f"{p}self_attn.{n}_norm.weight"), eps)
        return {"residual": x, **out}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(
            layer="model.layers.0",
            projections=self.qkv_modules(),
            identities=("self_attn.q_norm", "self_attn.k_norm"),
        )
