"""BLOOM (serial, ALiBi; only Q, K, V fold), with a LayerNorm on the embedding before layer 0.

x = LN(word_embeddings[t]; word_embeddings_layernorm) is layer 0's input; h = LN(x; input_layernorm);
the fused `query_key_value` (bias always) is laid out per head as [q_h, k_h, v_h]. ALiBi acts on the attention
logits only, so nothing position-dependent reaches the table.
apply_residual_connection_post_layernorm: the attention's residual is h instead of x. When the table holds the
residual, it then holds h (input_layernorm passes through either way, since h is what the block sees); when it
does not (tied embeddings), input_layernorm stays in the model so that the residual is recomputed.
BLOOM checkpoints saved from BloomModel name tensors without "transformer." ("h.0...."): base_prefix.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, fused, layer_norm, mlp
from precompute_cli.spec import TIED, four_d, mha

EPS = Key("layer_norm_epsilon", default=1e-5)


@register
class Bloom(Declared):
    layouts = {"bloom": Layout(
        prefix="transformer.h.0.", embedding="transformer.word_embeddings.weight", base_prefix="transformer.",
        sizes=mha(hidden_size=Key("hidden_size", "n_embed"), num_heads=Key("n_head", "num_attention_heads"),
                  intermediate_size=Key(default=four_d), num_layers=Key("n_layer", "num_hidden_layers"),
                  tied_embeddings=TIED),
        positional="alibi",
        embedding_norm=layer_norm("transformer.word_embeddings_layernorm", eps=EPS),
        input_norm=layer_norm("input_layernorm", eps=EPS),
        norm_is_residual=Key("apply_residual_connection_post_layernorm", default=False),
        qkv=fused("self_attention.query_key_value", "per_head", bias=True),
        ffn=mlp("dense_h_to_4h", "dense_4h_to_h", bias=True, act=Key(default="gelu_new")),  # BloomGelu: tanh
    )}
