"""LFM2's short convolution at layer 0: lfm2, lfm2_moe, lfm3.

h = RMSNorm(x; operator_norm, norm_eps); [B | C | x'] = in_proj(h) (+ bias if conv_bias); the causal depthwise
conv (context) runs on B * x', and its output is multiplied by C. Both B * x' and C are per token, so the table holds
those two D-wide groups: 2D columns in place of in_proj's 3D x D matrix. The runtime hands the mixer [B*x' | C | 1],
so its own `B * x` gives the stored product exactly (x 1 is exact), and the conv, C * conv and out_proj run as before.

Layer 0 is a conv when layer_types[0] is "conv", or, without layer_types, when 0 is not in full_attn_idxs.
transformers' default (neither key) makes every layer attention, which is refused; the Hub's LFM2 configs list
their layers. LFM3 is the same conv (its attention layers gain a sandwich norm, an output gate and a sliding
window); transformers' default pattern starts with a conv ("conv" unless i % 4 == 2, or i % 4 == 0 past layer 0),
and its config has no full_attn_idxs. `model.embedding_norm` is the final norm, despite its name, and is not touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Pattern, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value


@dataclass(frozen=True)
class ShortConv(Mixer):
    """in_proj -> [B | C | x], each D wide; stored as [B*x | C]."""

    kind: ClassVar[str] = "short conv"
    bias: Key = Key("conv_bias", default=False)

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        d = spec.hidden_size
        return (Projection("conv.in_proj", (("B", d), ("C", d), ("x", d)), bool(value(cfg, self.bias))),)

    def stored(self, proj: Projection, spec: ModelSpec) -> tuple[tuple[str, int], ...]:
        return (("B*x", spec.hidden_size), ("C", spec.hidden_size))

    def split(self, proj: Projection, y: np.ndarray, spec: ModelSpec) -> dict[str, np.ndarray]:
        d = spec.hidden_size
        return {"B*x": y[..., :d] * y[..., 2 * d:], "C": y[..., d:2 * d]}


LFM2 = MixerLayout(
    ShortConv(),
    # full_attn_idxs lists the attention layers; without it or layer_types, every layer is attention
    pattern=Pattern(mixer=("conv",), lists=("layer_types",), attention_at="full_attn_idxs", default="full_attention"),
    input_norm=rms("operator_norm", eps=Key("norm_eps", default=1e-5)), positional="rope",
    # the config class lets a legacy tie_embedding override tie_word_embeddings
    sizes=Sizes(tied_embeddings=Key("tie_embedding", "tie_word_embeddings", default=True),
                intermediate_size=Key("intermediate_size", "block_ff_dim", default=0)),
)


@register
class Lfm2(Mixed):
    layouts = {
        "lfm2": LFM2,
        "lfm2_moe": replace(LFM2, sizes=replace(LFM2.sizes, num_experts=Key("num_experts", default=32))),
        "lfm3": replace(LFM2, pattern=Pattern(mixer=("conv",), lists=("layer_types",), default="conv")),
    }
