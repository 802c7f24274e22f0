"""MPT (serial, ALiBi; only Q, K, V fold): one blocked fused projection, clamped before the split.

x = wte[t]; h = LayerNorm(x; norm_1) with a weight and no bias; qkv = Wqkv h (no bias), rows blocked [q; k; v];
attn_config.clip_qkv (when set and non-zero) clamps the fused output to [-c, c] before the split. The clamp is
applied in the fold, and the runtime's stand-in for Wqkv feeds the clamp values already inside [-c, c], where
it is the identity. transformers' MPT always uses ALiBi and ignores several MosaicML flags; the ones that would
change layer 0 in the original model (no ALiBi, a q/k LayerNorm, biases, multi-query) are refused.
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class Mpt(Recipe):
    model_types = ("mpt",)
    prefix = "transformer.blocks.0."

    def describe(self) -> ModelSpec:
        c = self.cfg
        d = c.int("d_model", "hidden_size")
        heads = c.int("n_heads", "num_attention_heads")
        return ModelSpec(
            model_type="mpt", block="serial", positional="alibi",
            hidden_size=d, num_heads=heads, num_kv_heads=heads, head_dim=d // max(heads, 1),
            intermediate_size=4 * d,  # MptMLP hard-codes 4 * d_model (expansion_ratio is ignored)
            ffn_matrices=2, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("n_layers", "num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=True)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        c, s = self.cfg, self.spec
        if s.num_heads == 0 or s.hidden_size % s.num_heads:
            return f"d_model {s.hidden_size} is not a multiple of n_heads {s.num_heads}"
        if not c.get("attn_config.alibi", default=True):
            return ("attn_config.alibi is false: the original MPT then adds learned position embeddings before "
                    "layer 0 (which transformers' MPT ignores), so layer 0 cannot be precomputed per token")
        if c.get("attn_config.qk_ln", default=False):
            return "attn_config.qk_ln is set: a q/k LayerNorm that transformers' MPT does not implement"
        if c.get("attn_config.attn_type", default="multihead_attention") != "multihead_attention":
            return f"attn_config.attn_type {c.get('attn_config.attn_type')!r}: transformers' MPT has multi-head only"
        if not c.get("no_bias", default=True):
            return "no_bias is false: the checkpoint's biases are ignored by transformers' MPT"
        clip = c.get("attn_config.clip_qkv")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
            return f"attn_config.clip_qkv must be a non-negative number, got {clip!r}"
        return None

    @property
    def clip(self) -> float | None:
        """clip_qkv as MptAttention applies it: only when set and non-zero."""
        value = self.cfg.get("attn_config.clip_qkv")
        return float(value) if value else None

    @property
    def embedding(self) -> str:
        return "transformer.wte.weight"

    def folded(self) -> dict[str, Shape]:
        d, p = self.spec.hidden_size, self.prefix
        return {p + "norm_1.weight": (d,), p + "attn.Wqkv.weight": (3 * d, d)}

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        eps = float(self.cfg.get("layer_norm_epsilon", default=1e-5))
        x = ops.upcast(x)
        h = ops.layer_norm(x, w(p + "norm_1.weight"), None, eps)
        fused = ops.linear(h, w(p + "attn.Wqkv.weight"))
        if self.clip is not None:
            fused = np.clip(fused, -self.clip, self.clip)
        q, k, v = ops.split_qkv(fused, 1, s.q_dim, s.kv_dim)
        return {"residual": x, "q": q, "k": k, "v": v}

    def runtime_patch(self) -> RuntimePatch:
        return RuntimePatch(layer="transformer.blocks.0", projections={"qkv": "attn.Wqkv"},
                            identities=("norm_1",), fused_groups=1)
