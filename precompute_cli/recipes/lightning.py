"""MiniMax's lightning attention at layer 0 (minimax, when its layer_types start with "linear_attention").

h = RMSNorm(x; input_layernorm); the decoder's residual is h itself (not x): h * linear_attn_alpha_factor + attn * beta.
Per token: qkv_proj(h) (silu and the padding mask follow, inside the module's forward, per head [q | k | v]) and
output_gate(h) (sigmoid after the recurrence). The table holds h as the residual columns (so the input norm goes, and
a tied model, which would need x for the head, is refused) and both projections' outputs; the block recurrence, its
slope_rate/decay buffers (on disk, derived from the layer index) and everything after stay in the model.

transformers' default makes layer 0 full (softmax) attention, which this recipe does not fold; MiniMax-Text-01's
converted config lists its layers, and its layer 0 is lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Pattern, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes


@dataclass(frozen=True)
class Lightning(Mixer):
    kind: ClassVar[str] = "lightning attention"

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        return (Projection("self_attn.qkv_proj", (("qkv_proj", 3 * spec.q_dim),), masked=False),
                Projection("self_attn.output_gate", (("output_gate", spec.q_dim),), masked=False))


@register
class MiniMax(Mixed):
    layouts = {"minimax": MixerLayout(
        Lightning(), pattern=Pattern(lists=("layer_types",), default="full_attention"), residual_is_norm=True,
        input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)), positional="rope",
        sizes=Sizes(num_experts=Key("num_local_experts", default=8)),
    )}
