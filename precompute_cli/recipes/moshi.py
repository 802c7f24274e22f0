"""Moshi's text decoder (MoshiForCausalLM, model_type moshi): serial, only Q, K, V fold.

x = embed_tokens[t] (vocab_size + 1 rows); h = RMSNorm(x; input_layernorm, float32 weight, eps default 1e-8);
q, k, v = W h with no bias, each nn.Linear wrapped in a MoshiLinear (`self_attn.q_proj.linear`); RoPE follows.
MoshiForCausalLM is the text decoder transformers offers alone ("only usable for text"). The speech model
(MoshiForConditionalGeneration, the same model_type) adds the embeddings of the user's and Moshi's audio codebooks
to the text token's before layer 0, so there layer 0's input is a sum over 17 tokens, not the token alone: refused.
The depth decoder (per-codebook MoshiFlexibleLinear weights, no RoPE) is the speech model's and not read here.
"""

from __future__ import annotations

from typing import Any

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate
from precompute_cli.spec import Config, heads

SPEECH = "MoshiForConditionalGeneration"


def embedding_rows(cfg: Config, known: dict[str, Any]) -> int:
    """MoshiModel's embedding has vocab_size + 1 rows (the last is the padding/initial token)."""
    return cfg.int("vocab_size", default=32000) + 1


def gating_width(cfg: Config, known: dict[str, Any]) -> int:
    """MoshiGatingMLP: fc1 makes ffn_dim, split into gate and up halves, so the GLU is ffn_dim / 2 wide."""
    return cfg.int("ffn_dim", default=22528) // 2


@register
class Moshi(Declared):
    layouts = {"moshi": Layout(
        sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=heads), vocab_size=embedding_rows,
                    intermediate_size=gating_width),
        input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-8)),
        qkv=separate("self_attn.{}_proj.linear"),
    )}

    def config_refusal(self) -> str | None:
        if SPEECH in (self.cfg.get("architectures", default=None) or []):
            return (f"this is Moshi's speech model ({SPEECH}): layer 0 reads the text token's embedding plus those "
                    "of every audio codebook at that position, not the token alone, so a table of tokens cannot "
                    "hold it (a MoshiForCausalLM checkpoint, the text decoder alone, converts)")
        return None
