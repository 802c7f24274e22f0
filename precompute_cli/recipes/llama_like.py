"""Serial attention on the Llama skeleton, the 2025-26 types (only Q, K, V fold; the FFN, dense or MoE, is serial).

x = embed_tokens[t] (granitemoe*, granite_swa, hyperclovax: * embedding_multiplier); h = RMSNorm(x; input_layernorm)
(apertus: named attention_layernorm; jais2: a LayerNorm with bias; exaone4: no norm before attention at all);
q, k, v = W h (+ b); then, by type:
  per-head q_norm/k_norm with one shared [hd] weight before RoPE (apertus, exaone4, dots1, glm4_moe with
  use_qk_norm, mellum, exaone_moe, hy_v3, flint); q_norm/k_norm over the whole projection (minimax_m2);
  hunyuan_v1_*: query_layernorm/key_layernorm act AFTER RoPE, so the table holds the raw q, k and their weights
  stay in the model, which applies RoPE then the norm to the table's columns.
Gated attention (afmoe, beam, laguna): the gate's projection of h is a table column of its own; the sigmoid or
softplus, beam's gate_bias and the product with the attention output act after the table.
Doge's dynamic mask (dt_proj over the values, A) and its learnt residual scales act after the table and stay.
Attention sinks (granite_swa, granitemoe_swa; flint's softmax_offset) are read after the table: they stay.
What differs and needs no table work: NoPE layers (smollm3, exaone4's full layers), interleaved or partial RoPE
(glm*, ernie4_5*, helium), ministral3's position scale after RoPE, sandwich and post norms (glm4, exaone4), fp32-weight
RMSNorm (helium; the fold computes in float32 anyway), a relu2 or xIELU MLP (arcee, apertus).
Keys and defaults are those of each type's configuration class in transformers 5.24: eps defaults of 1e-8 (helium)
and 1.5625e-7 (glm, glm4) are real; head_dim is read where the attention reads it, else hidden_size / heads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Gate, Key, Layout, Norm, Sizes, fused, layer_norm, rms, separate
from precompute_cli.spec import Config, heads

BIAS = Key("attention_bias", default=False)


def eps(default: float) -> Key:
    return Key("rms_norm_eps", default=default)


def kv(default: int | None) -> Key:
    """num_key_value_heads with the config class's default (a number, or None: one per attention head)."""
    return Key("num_key_value_heads", default=heads if default is None else default)


def hunyuan_experts(cfg: Config, known: dict[str, Any]) -> int:
    """num_experts is a count, or a list of one count per layer (then layer 0's)."""
    n = cfg.data.get("num_experts")
    if isinstance(n, list) and n:
        return Config({"num_experts": n[0]}, cfg.path).int("num_experts")
    return cfg.int("num_experts", default=1)


def doge_experts(cfg: Config, known: dict[str, Any]) -> int:
    """Doge's FFN is a mixture of num_experts only with is_moe."""
    return cfg.int("num_experts", default=16384) if cfg.get("is_moe", default=False) else 1


def laguna_heads(cfg: Config, known: dict[str, Any]) -> int:
    """Laguna's heads may differ by layer (num_attention_heads_per_layer): layer 0's."""
    per_layer = cfg.data.get("num_attention_heads_per_layer")
    if isinstance(per_layer, list) and per_layer:
        return Config({"num_attention_heads_per_layer": per_layer[0]}, cfg.path).int("num_attention_heads_per_layer")
    return cfg.int("num_attention_heads")


def head_norm(e: Key, **kind: Any) -> Norm:
    """Per-head q/k RMSNorm with one shared [head_dim] weight."""
    return rms("self_attn.{}_norm", eps=e, scope="head", **kind)


def projection_norm(e: Key) -> Norm:
    """q/k RMSNorm over the whole projection (H*hd, KV*hd)."""
    return rms("self_attn.{}_norm", eps=e, scope="projection")


# Hunyuan's q/k norms act after RoPE: declared so that they stay (kept), never folded
HUNYUAN_QK = rms("self_attn.{}_layernorm", eps=eps(1e-5), scope="head", after_rope=True, fill=("query", "key"))
MOE_WIDTH = Key("moe_intermediate_size", "intermediate_size")


@register
class LlamaLike(Declared):
    layouts = {
        "smollm3": Layout(
            sizes=Sizes(num_kv_heads=kv(4), tied_embeddings=Key("tie_word_embeddings", default=True)),
            input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS)),
        "arcee": Layout(sizes=Sizes(num_kv_heads=kv(None)), input_norm=rms("input_layernorm", eps=eps(1e-5)),
                        qkv=separate(bias=BIAS)),
        "ministral": Layout(sizes=Sizes(num_kv_heads=kv(8)), input_norm=rms("input_layernorm", eps=eps(1e-6))),
        "ministral3": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128)),
                             input_norm=rms("input_layernorm", eps=eps(1e-5))),
        "seed_oss": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128)),
                           input_norm=rms("input_layernorm", eps=eps(1e-6)),
                           qkv=separate(bias=Key("attention_bias", default=True))),
        "ernie4_5": Layout(sizes=Sizes(num_kv_heads=kv(2), head_dim=Key("head_dim", default=128),
                                       tied_embeddings=Key("tie_word_embeddings", default=True)),
                           input_norm=rms("input_layernorm", eps=eps(1e-5)),
                           qkv=separate(bias=Key("use_bias", default=False))),
        "ernie4_5_moe": Layout(sizes=Sizes(num_kv_heads=kv(4), num_experts=Key("moe_num_experts", default=64),
                                           intermediate_size=MOE_WIDTH,
                                           tied_embeddings=Key("tie_word_embeddings", default=True)),
                               input_norm=rms("input_layernorm", eps=eps(1e-5)),
                               qkv=separate(bias=Key("use_bias", default=False))),
        "helium": Layout(sizes=Sizes(num_kv_heads=kv(20), head_dim=Key("head_dim", default=128)),
                         input_norm=rms("input_layernorm", eps=eps(1e-8)), qkv=separate(bias=BIAS)),
        "glm": Layout(sizes=Sizes(num_kv_heads=kv(2), head_dim=Key("head_dim", default=128)),
                      input_norm=rms("input_layernorm", eps=eps(1.5625e-7)),
                      qkv=separate(bias=Key("attention_bias", default=True))),
        "glm4": Layout(sizes=Sizes(num_kv_heads=kv(2), head_dim=Key("head_dim", default=128)),
                       input_norm=rms("input_layernorm", eps=eps(1.5625e-7)),
                       qkv=separate(bias=Key("attention_bias", default=True))),
        "glm4_moe": Layout(sizes=Sizes(num_kv_heads=kv(8), num_experts=Key("n_routed_experts", default=128),
                                       intermediate_size=MOE_WIDTH),
                           input_norm=rms("input_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS),
                           qk_norm=head_norm(eps(1e-5), when=Key("use_qk_norm", default=False))),
        "granitemoe": Layout(sizes=Sizes(num_kv_heads=kv(None), num_experts=Key("num_local_experts", default=8)),
                             embedding_multiplier=Key("embedding_multiplier", default=1.0),
                             input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS)),
        "granitemoeshared": Layout(
            sizes=Sizes(num_kv_heads=kv(None), num_experts=Key("num_local_experts", default=8)),
            embedding_multiplier=Key("embedding_multiplier", default=1.0),
            input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS)),
        "dots1": Layout(sizes=Sizes(num_kv_heads=kv(32), num_experts=Key("n_routed_experts", default=1),
                                    intermediate_size=MOE_WIDTH),
                        input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS),
                        qk_norm=head_norm(eps(1e-6))),
        "apertus": Layout(sizes=Sizes(num_kv_heads=kv(None)), input_norm=rms("attention_layernorm", eps=eps(1e-5)),
                          qkv=separate(bias=BIAS), qk_norm=head_norm(eps(1e-5))),
        "exaone4": Layout(sizes=Sizes(num_kv_heads=kv(32)), input_norm=None, qk_norm=head_norm(eps(1e-5))),
        "minimax_m2": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128),
                                         num_experts=Key("num_local_experts", default=256)),
                             input_norm=rms("input_layernorm", eps=eps(1e-6)), qk_norm=projection_norm(eps(1e-6))),
        "hunyuan_v1_dense": Layout(sizes=Sizes(num_kv_heads=kv(None)), input_norm=rms("input_layernorm", eps=eps(1e-5)),
                                   qkv=separate(bias=BIAS),
                                   qk_norm=HUNYUAN_QK),
        "hunyuan_v1_moe": Layout(sizes=Sizes(num_kv_heads=kv(None), num_experts=hunyuan_experts),
                                 input_norm=rms("input_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS),
                                 qk_norm=HUNYUAN_QK),
        "internlm3": Layout(sizes=Sizes(num_kv_heads=kv(2), head_dim=Key("head_dim", default=128)),
                            input_norm=rms("input_layernorm", eps=eps(1e-5)),
                            qkv=separate(bias=Key("attention_bias", "qkv_bias", default=False))),
        "iquestcoder": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128)),
                              input_norm=rms("input_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS)),
        "cwm": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128)),
                      input_norm=rms("input_layernorm", eps=eps(1e-5))),
        "hyperclovax": Layout(sizes=Sizes(num_kv_heads=kv(None)),
                              embedding_multiplier=Key("embedding_multiplier", default=1.0),
                              input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS)),
        "jais2": Layout(sizes=Sizes(num_kv_heads=kv(None)), input_norm=layer_norm("input_layernorm"),
                        qkv=separate(bias=Key("attention_bias", default=True))),
        "solar_open": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128),
                                         num_experts=Key("n_routed_experts", "num_local_experts", default=128),
                                         intermediate_size=MOE_WIDTH),
                             input_norm=rms("input_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS)),
        "mellum": Layout(sizes=Sizes(num_kv_heads=kv(4), head_dim=Key("head_dim", default=128),
                                     num_experts=Key("num_experts", "num_local_experts", default=64),
                                     intermediate_size=MOE_WIDTH),
                         input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS),
                         qk_norm=head_norm(eps(1e-6))),
        "exaone_moe": Layout(sizes=Sizes(num_kv_heads=kv(32), num_experts=Key("num_experts", default=64),
                                         intermediate_size=MOE_WIDTH),
                             input_norm=rms("input_layernorm", eps=eps(1e-5)), qk_norm=head_norm(eps(1e-5))),
        "hy_v3": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128),
                                    num_experts=Key("num_experts", "num_local_experts", default=192),
                                    intermediate_size=MOE_WIDTH),
                        input_norm=rms("input_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS),
                        qk_norm=head_norm(eps(1e-5))),
        "flint": Layout(sizes=Sizes(num_kv_heads=kv(4), head_dim=Key("head_dim", default=128),
                                    num_experts=Key("num_experts", default=256), intermediate_size=MOE_WIDTH),
                        input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS),
                        qk_norm=head_norm(eps(1e-6)), keep=("self_attn.softmax_offset",)),
        "granite_swa": Layout(sizes=Sizes(num_kv_heads=kv(4), tied_embeddings=Key("tie_word_embeddings", default=True)),
                              embedding_multiplier=Key("embedding_multiplier", default=1.0),
                              input_norm=rms("input_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS),
                              keep=("self_attn.sinks",)),
        "granitemoe_swa": Layout(
            sizes=Sizes(num_kv_heads=kv(None), num_experts=Key("num_local_experts", default=8)),
            embedding_multiplier=Key("embedding_multiplier", default=1.0),
            input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS), keep=("self_attn.sinks",)),
        "diffllama": Layout(sizes=Sizes(num_kv_heads=kv(None)), input_norm=rms("input_layernorm", eps=eps(1e-5)),
                            qkv=separate(bias=BIAS)),
        # LlamaForCausalLM; the checkpoints keep EXAONE-3's own names, which transformers renames on loading
        "exaone": Layout(prefix="transformer.h.0.", embedding="transformer.wte.weight",
                         sizes=Sizes(num_kv_heads=kv(8), num_layers=Key("num_hidden_layers", "num_layers")),
                         input_norm=rms("ln_1", eps=Key("rms_norm_eps", "layer_norm_epsilon", default=1e-5)),
                         qkv=separate("attn.attention.{}_proj", bias=BIAS), memory=Layout()),
        # Glm4MoeForCausalLM; on disk q, k, v are one blocked query_key_value, split by transformers on loading
        "sarvam_moe": Layout(
            embedding="model.word_embeddings.weight",
            sizes=Sizes(num_kv_heads=kv(4), head_dim=Key("head_dim", default=64),
                        num_experts=Key("n_routed_experts", "num_experts", "num_local_experts", default=128),
                        intermediate_size=MOE_WIDTH),
            input_norm=rms("input_layernorm", eps=eps(1e-6)),
            qkv=fused("attention.query_key_value", "blocked",
                      bias=Key("attention_bias", "use_qkv_bias", default=False)),
            qk_norm=rms("attention.{}_layernorm", eps=eps(1e-6), scope="head", fill=("query", "key"),
                        when=Key("use_qk_norm", default=True)),
            memory=Layout(qk_norm=head_norm(eps(1e-6), when=Key("use_qk_norm", default=True)))),
        "aria_text": Layout(sizes=Sizes(num_kv_heads=kv(None), num_experts=Key("moe_num_experts", default=8)),
                            input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS)),
        "apertus1p5_text": Layout(sizes=Sizes(num_kv_heads=kv(None)),
                                  input_norm=rms("attention_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS),
                                  qk_norm=head_norm(eps(1e-5))),
        "kolibri1": Layout(sizes=Sizes(num_kv_heads=kv(4), head_dim=Key("head_dim", default=128),
                                       num_experts=Key("num_experts", "num_local_experts", default=384),
                                       intermediate_size=MOE_WIDTH),
                           input_norm=rms("input_layernorm", eps=eps(1e-6)), qk_norm=head_norm(eps(1e-6))),
        "doge": Layout(sizes=Sizes(num_kv_heads=kv(None), num_experts=doge_experts),
                       input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS),
                       qk_norm=head_norm(eps(1e-6))),
        # weightless RMSNorms: model.norm over the embedding (also the final norm, so the model keeps applying it),
        # input_layernorm, and q/k norms after RoPE (nothing to keep)
        "nanochat": Layout(sizes=Sizes(num_kv_heads=kv(None)),
                           embedding_norm=rms("model.norm", eps=eps(1e-6), weight=False), embedding_norm_in_model=True,
                           input_norm=rms("input_layernorm", eps=eps(1e-6), weight=False), qkv=separate(bias=BIAS)),
        # gated attention: the output gate's projection of h is one more table column
        "afmoe": Layout(sizes=Sizes(num_kv_heads=kv(None), head_dim=Key("head_dim", default=128),
                                    num_experts=Key("num_experts", default=64), intermediate_size=MOE_WIDTH),
                        input_norm=rms("input_layernorm", eps=eps(1e-5)), qkv=separate(bias=BIAS),
                        qk_norm=head_norm(eps(1e-5)), gate=Gate("self_attn.gate_proj")),
        "beam": Layout(sizes=Sizes(num_kv_heads=kv(8), head_dim=Key("head_dim", default=128),
                                   num_experts=Key("num_experts", default=256), intermediate_size=MOE_WIDTH),
                       input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS),
                       qk_norm=head_norm(eps(1e-6)), gate=Gate("self_attn.gate_proj"), keep=("self_attn.gate_bias",)),
        "laguna": Layout(sizes=Sizes(num_heads=laguna_heads, num_kv_heads=kv(8), head_dim=Key("head_dim", default=128),
                                     num_experts=Key("num_experts", default=256), intermediate_size=MOE_WIDTH),
                         input_norm=rms("input_layernorm", eps=eps(1e-6)), qkv=separate(bias=BIAS),
                         qk_norm=head_norm(eps(1e-6)), gate=Gate("self_attn.g_proj", per="head")),
    }

    def declare(self) -> Layout:
        """afmoe with mup_enabled multiplies the looked-up embedding by sqrt(hidden_size), outside the module;
        laguna's gating says whether its gate is one per head (true, "per-head") or one per channel."""
        layout = super().declare()
        if self.cfg.model_type == "afmoe" and self.cfg.get("mup_enabled", default=False):
            return replace(layout, embedding_multiplier=Key(default=self.cfg.int("hidden_size") ** 0.5))
        if self.cfg.model_type == "laguna" and self.cfg.data.get("gating", True) not in (True, "per-head"):
            return replace(layout, gate=Gate("self_attn.g_proj", per="channel"))  # "per-element" (or false)
        return layout
