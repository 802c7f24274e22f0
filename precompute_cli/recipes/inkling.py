"""The Inkling text decoders at layer 0: inkling_text (Thinking Machines' Inkling), inkling2_text, inkling2_loop_text.

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
from precompute_cli.recipes.projection import Mixed, Mixer, MixerLayout, Pattern, Projection
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


# -- Inkling 2 ----------------------------------------------------------------------------------------------------
# x = RMSNorm(embed[t]; embed_norm) inside the embedding module. A sliding layer 0 (the default: every layer but
# each sixth) reads h = RMSNorm(x; attn_norm) in six per-token projections: the query's linear (then a scaled L2
# clip, kept), the key's and value's linears (then their short convolutions over the sequence and norms, kept), the
# output gate's gate_attn, the sink logits' attn_sink_proj and the relative states' wr_du (then a scaled L2 clip and
# the bias-vs-distance bank, kept). A full layer 0 reads three norms of x (q/k/v_input_norm) and its key and value
# convolutions are dynamic (taps projected from their input): not folded. The block attention residuals act after
# layer 0 (layer 0 has no attention_input). On disk the model is `model.llm.*` with the original short names, which
# transformers renames on loading (conversion_mapping's inkling2_text); the LM head is the unembedding, never tied.
# inkling2_loop_text: the same layer 0 (its loop section starts at loop_layer_index_start, above 0).

INKLING2_SLIDING = Sizes(num_heads=Key("swa_num_attention_heads", default=48),
                         num_kv_heads=Key("swa_num_key_value_heads", default=8),
                         head_dim=Key("swa_head_dim", default=128),
                         num_experts=Key("n_routed_experts", default=384),
                         intermediate_size=Key("moe_intermediate_size", "intermediate_size", default=2304),
                         tied_embeddings=Key(default=False))


@dataclass(frozen=True)
class Inkling2Sliding(Mixer):
    """A sliding layer 0's six per-token projections of h, by their names in memory and on disk."""

    kind: ClassVar[str] = "sliding attention with short-conv keys and values"
    d_rel: Key = Key("d_rel", default=16)

    def projections(self, cfg: Config, spec: ModelSpec) -> tuple[Projection, ...]:
        heads, r = spec.num_heads, spec.num_heads * int(value(cfg, self.d_rel))
        return tuple(Projection(f"self_attn.{module}", ((name, width),), masked=False, on_disk=f"attn.{disk}")
                     for name, module, disk, width in (
                         ("q", "q_proj.linear", "wq_du", spec.q_dim), ("k", "k_proj.linear", "wk_dv", spec.kv_dim),
                         ("v", "v_proj.linear", "wv_dv", spec.kv_dim), ("gate", "o_proj.gate_proj", "gate_attn",
                                                                        spec.q_dim),
                         ("sink", "sink_proj", "attn_sink_proj", heads),
                         ("r", "relative_position_bias.linear", "wr_du", r)))


INKLING2 = MixerLayout(
    Inkling2Sliding(), sizes=INKLING2_SLIDING,
    pattern=Pattern(mixer=("hybrid_sliding",), lists=("layer_types",), default="hybrid_sliding"),
    prefix="model.llm.layers.0.", layer="model.layers.0", embedding="model.llm.embed.weight",
    embedding_norm=rms("model.llm.embed_norm", eps=EPS), input_norm=rms("attn_norm", eps=EPS),
    norm_in_memory="input_layernorm", positional="relative")


@register
class Inkling2(Mixed):
    layouts = {"inkling2_text": INKLING2, "inkling2_loop_text": INKLING2}

    def config_refusal(self) -> str | None:
        start = self.cfg.get("loop_config.core_start", "loop_layer_index_start", default=6)
        if self.cfg.model_type == "inkling2_loop_text" and start == 0:
            return ("this inkling2_loop_text config loops from layer 0 (loop_layer_index_start 0), so layer 0 reruns "
                    "on messages from the previous pass, which depend on the context")
        return None

    def refusal(self) -> str | None:
        return super().refusal() or self.config_refusal()
