"""Architectures that add absolute position embeddings before layer 0 (GPT-2, OPT): detected, never folded.

With x = wte[t] + wpe[pos], layer 0's inputs depend on the position as well as the token, so no per-token
table can replace them (the paper's figure 2a). The recipe exists so `inspect` can explain that.
"""

from __future__ import annotations

from precompute_cli.recipes.base import Recipe, register
from precompute_cli.recipes.unfolded import REFUSED
from precompute_cli.spec import TIED, Key, ModelSpec, four_d, mha

SIZES = mha(hidden_size=Key("n_embd", "hidden_size"), num_heads=Key("n_head", "num_attention_heads"),
            intermediate_size=Key("n_inner", "ffn_dim", default=four_d), num_layers=Key("n_layer", "num_hidden_layers"),
            tied_embeddings=TIED)


@register
class AbsolutePositions(Recipe):
    model_types = ("gpt2", "opt")
    foldable = False

    def describe(self) -> ModelSpec:
        return SIZES.read(self.cfg, model_type=self.cfg.model_type, block="serial", positional="absolute",
                          ffn_matrices=2)

    def refusal(self) -> str | None:
        return f"{self.cfg.model_type} {REFUSED[self.cfg.model_type]}"
