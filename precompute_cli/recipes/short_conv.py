"""LFM2's short convolution at layer 0: lfm2, lfm2_moe.

h = RMSNorm(x; operator_norm, norm_eps); [B | C | x'] = in_proj(h) (+ bias if conv_bias); the causal depthwise
conv (context) runs on B * x', and its output is multiplied by C. Both B * x' and C are per token, so the table holds
those two D-wide groups: 2D columns in place of in_proj's 3D x D matrix. The runtime hands the mixer [B*x' | C | 1],
so its own `B * x` gives the stored product exactly (x 1 is exact), and the conv, C * conv and out_proj run as before.

Layer 0 is a conv when layer_types[0] is "conv", or, without layer_types, when 0 is not in full_attn_idxs.
transformers' default (neither key) makes every layer attention, which this recipe refuses; the Hub's LFM2
configs list their layers. `model.embedding_norm` is the final norm, despite its name, and is not touched.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from precompute_cli.recipes.base import register
from precompute_cli.recipes.projection import Norm, Projection, ProjectionRecipe, pattern_kind
from precompute_cli.spec import ModelSpec

CONV, ATTENTION = "short conv", "attention"


@register
class Lfm2(ProjectionRecipe):
    model_types = ("lfm2", "lfm2_moe")
    norm = Norm("operator_norm", "norm_eps", 1e-5)
    kinds = (CONV,)

    def kind(self) -> str:
        c = self.cfg
        types = c.get("layer_types", default=None)
        if types is not None:
            return CONV if pattern_kind(types, 0, c.path, "layer_types") == "conv" else ATTENTION
        full = c.get("full_attn_idxs", default=None)
        return ATTENTION if full is None or 0 in full else CONV

    def describe(self) -> ModelSpec:
        c = self.cfg
        heads = c.int("num_attention_heads")
        experts = c.int("num_experts", default=32) if c.model_type == "lfm2_moe" else 1
        spec = self.mixer_spec(heads, c.int("hidden_size") // max(heads, 1), positional="rope",
                               kv_heads=c.int("num_key_value_heads", default=heads), experts=experts,
                               intermediate=c.int("intermediate_size", "block_ff_dim", default=0), ffn_matrices=3)
        # the config class lets a legacy tie_embedding override tie_word_embeddings
        return replace(spec, tied_embeddings=bool(c.get("tie_embedding", "tie_word_embeddings", default=True)))

    def projections(self) -> tuple[Projection, ...]:
        d, bias = self.spec.hidden_size, bool(self.cfg.get("conv_bias", default=False))
        return (Projection("conv.in_proj", (("B", d), ("C", d), ("x", d)), bias),)

    def stored_columns(self, proj: Projection) -> tuple[tuple[str, int], ...]:
        d = self.spec.hidden_size
        return (("B*x", d), ("C", d))

    def split(self, proj: Projection, y: np.ndarray) -> dict[str, np.ndarray]:
        d = self.spec.hidden_size
        return {"B*x": y[..., :d] * y[..., 2 * d:], "C": y[..., d:2 * d]}
