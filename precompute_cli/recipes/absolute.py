"""Architectures that add absolute position embeddings before layer 0 (GPT-2, OPT): detected, never folded.

With x = wte[t] + wpe[pos], layer 0's inputs depend on the position as well as the token, so no per-token
table can replace them (the paper's figure 2a). The recipe exists so `inspect` can explain that.
"""

from __future__ import annotations

from precompute_cli.recipes.base import Recipe, register
from precompute_cli.recipes.unfolded import REFUSED
from precompute_cli.spec import ModelSpec


@register
class AbsolutePositions(Recipe):
    model_types = ("gpt2", "opt")
    foldable = False

    def describe(self) -> ModelSpec:
        c = self.cfg
        d = c.int("n_embd", "hidden_size")
        heads = c.int("n_head", "num_attention_heads")
        return ModelSpec(
            model_type=c.model_type, block="serial", positional="absolute",
            hidden_size=d, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
            intermediate_size=c.int("n_inner", "ffn_dim", default=4 * d), ffn_matrices=2, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("n_layer", "num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=True)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        return f"{self.cfg.model_type} {REFUSED[self.cfg.model_type]}"
