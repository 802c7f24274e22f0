"""The serial Llama skeleton: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, granite, llama4_text.

x = embed_tokens[t] (granite: * embedding_multiplier); h = RMSNorm(x; input_layernorm); q, k, v = W h (+ b);
qwen3*: per-head RMSNorm q_norm / k_norm before RoPE. Only Q, K, V fold: the FFN (dense or MoE) reads the
attention output. Each type's differences from Llama, read from transformers' configuration files, are its Layout.
llama4_text: use_qk_norm applies a weightless L2 (RMS) norm per head after RoPE, on RoPE layers only; it has no
tensor, so the table stores the raw q, k and the model keeps normalising them. Its NoPE layers (every 4th, with
attention temperature tuning) and chunked attention act after the table too.
"""

from __future__ import annotations

from typing import Any

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate
from precompute_cli.spec import Config

ATTENTION_BIAS = separate(bias=Key("attention_bias", default=False))
QK_NORM = rms("self_attn.{}_norm", scope="head")
QWEN_EXPERTS = Key("num_experts", "num_local_experts", default=0)


def moe_width(cfg: Config, known: dict[str, Any]) -> int:
    """Qwen MoE's experts are moe_intermediate_size wide; a config with no experts is a dense Qwen2."""
    return cfg.int("moe_intermediate_size" if known["num_experts"] > 1 else "intermediate_size")


@register
class Llama(Declared):
    layouts = {
        "llama": Layout(qkv=ATTENTION_BIAS),
        "granite": Layout(qkv=ATTENTION_BIAS, embedding_multiplier=Key("embedding_multiplier", default=1.0)),
        "mistral": Layout(sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8))),
        "mixtral": Layout(
            sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8),
                        num_experts=Key("num_local_experts", "num_experts", default=8)),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
        ),
        "qwen2": Layout(qkv=separate(bias=True)),
        "qwen2_moe": Layout(qkv=separate(bias=Key("qkv_bias", default=True)),
                            sizes=Sizes(num_experts=QWEN_EXPERTS, intermediate_size=moe_width)),
        "qwen3": Layout(qkv=ATTENTION_BIAS, qk_norm=QK_NORM, sizes=Sizes(head_dim=Key("head_dim", default=128))),
        "llama4_text": Layout(
            qkv=ATTENTION_BIAS,
            sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=8), head_dim=Key("head_dim", default=128),
                        num_experts=Key("num_local_experts", default=16)),
            input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
            qk_norm=rms("self_attn.qk_norm", weight=False, scope="head", after_rope=True,
                        when=Key("use_qk_norm", default=True)),
        ),
        "qwen3_moe": Layout(qkv=ATTENTION_BIAS, qk_norm=QK_NORM, sizes=Sizes(
            num_kv_heads=Key("num_key_value_heads", default=4), num_experts=QWEN_EXPERTS, intermediate_size=moe_width)),
    }
