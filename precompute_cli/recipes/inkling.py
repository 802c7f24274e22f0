"""Inkling's text decoder at layer 0: inkling_text (the language model of Thinking Machines' Inkling).

x = RMSNorm(embed_tokens[t]; embed_tokens.embed_norm), inside the embedding module; h = RMSNorm(x; input_layernorm);
then per token: q = q_proj(h) (then a per-head q_norm, kept in the model: the table holds the raw projection), k =
k_proj(h) and v = v_proj(h), each then through a short causal convolution over the sequence (k_sconv, v_sconv: they
mix positions, so they stay, with k_norm after them), and r = r_proj(h), the relative states that weight the bank
of bias-vs-distance profiles (rel_logits_proj). No RoPE: positions enter through those relative logits and the
log-scaled queries, all after the table. So the table holds x, q, k, v and r, and the runtime hands the model's own
convolutions and norms the looked-up projections (none of them reads a masked input: the convolutions mask their own).

A sliding layer ("hybrid_sliding", layer 0 by default: every layer but each sixth) has its own head counts and size
(swa_*). The LM head is never tied to the embedding (the model ties nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import rms
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Projection
from precompute_cli.spec import Config, Key, ModelSpec, Sizes, value

EPS = Key("rms_norm_eps", default=1e-6)
FULL = Sizes(num_heads=Key("num_attention_heads", default=64), num_kv_heads=Key("num_key_value_heads", default=8),
             head_dim=Key("head_dim", default=128), num_experts=Key("n_routed_experts", default=256),
             intermediate_size=Key("moe_intermediate_size", default=3072), tied_embeddings=Key(default=False))
SLIDING = replace(FULL, num_heads=Key("swa_num_attention_heads", default=64),
                  num_kv_heads=Key("swa_num_key_value_heads", default=16), head_dim=Key("swa_head_dim", default=128))


def sliding_first(cfg: Config) -> bool:
    """Whether layer 0 is a sliding layer: layer_types, else local_layer_ids, else the default (all but each 6th)."""
    types = cfg.data.get("layer_types")
    if isinstance(types, list) and types:
        return types[0] == "hybrid_sliding"
    local = cfg.data.get("local_layer_ids")
    return 0 in local if isinstance(local, list) else True


@dataclass(frozen=True)
class ShortConvAttention(Mixer):
    """q, k, v and the relative states r, each a projection of h; the k/v convolutions stay."""

    kind: ClassVar[str] = "attention with short-conv keys and values"
    d_rel: Key = Key("d_rel", default=16)

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        r = spec.num_heads * int(value(cfg, self.d_rel))
        return tuple(Projection(f"self_attn.{n}_proj", ((n, width),), masked=False)
                     for n, width in (("q", spec.q_dim), ("k", spec.kv_dim), ("v", spec.kv_dim), ("r", r)))


@register
class Inkling(Mixed):
    layouts = {
        "inkling_text": MixerLayout(
            ShortConvAttention(), sizes=SLIDING, embedding_norm=rms("model.embed_tokens.embed_norm", eps=EPS),
            input_norm=rms("input_layernorm", eps=EPS), positional="relative"),
    }

    def describe(self) -> ModelSpec:
        if not sliding_first(self.cfg):
            self.layout = replace(self.layout, sizes=FULL)
        return super().describe()
