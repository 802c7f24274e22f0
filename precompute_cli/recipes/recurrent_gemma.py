"""RecurrentGemma (Griffin) at layer 0: a recurrent block.

x = embed_tokens[t] * normalizer, where the model's normalizer is sqrt(hidden_size) stored in bfloat16 (so 8.9375,
not 8.944, for d = 80); h = (1 + w) RMSNorm(x; temporal_pre_norm); then per token linear_y(h) (the gate branch,
through GeLU later) and linear_x(h) (into the causal conv1d, then the RG-LRU: context), both with biases. The table
holds both outputs; the conv, the RG-LRU, the GeLU gate and linear_out stay in the model. The recurrent block does
not multiply its input by the attention mask, so a padded position's projections are those of the pad token's row,
exactly what the table gives (the biases are folded in).

Layer types: block_types, a cycle repeated over the layers ("recurrent" / "attention"); transformers' default
(recurrent, recurrent, attention) starts with a recurrent block. The residual is x before the normalizer: the model
multiplies the looked-up row itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Pattern, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes


def bfloat16(v: float) -> float:
    """v rounded to bfloat16 (to nearest, ties to even), as torch does."""
    bits = int(np.array(v, dtype=np.float32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def normalizer(cfg: Config, spec: ModelSpec) -> float:
    return bfloat16(spec.hidden_size ** 0.5)


@dataclass(frozen=True)
class RecurrentBlock(Mixer):
    """linear_x and linear_y, lru_width wide each, with biases; their inputs are not masked."""

    kind: ClassVar[str] = "RG-LRU recurrent block"

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        width = Key("lru_width", default=spec.hidden_size).int(cfg, {})
        return tuple(Projection(f"temporal_block.linear_{n}", ((n, width),), bias=True, masked=False) for n in "xy")


@register
class RecurrentGemma(Mixed):
    layouts = {"recurrent_gemma": MixerLayout(
        RecurrentBlock(),
        pattern=Pattern(mixer=("recurrent",), lists=("block_types",), default="recurrent"),
        input_norm=rms("temporal_pre_norm", offset=1.0), embedding_multiplier=normalizer, positional="rope",
        sizes=Sizes(tied_embeddings=Key("tie_word_embeddings", default=True)),
    )}
