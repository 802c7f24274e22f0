"""GPT-J and CodeGen: a parallel block with one LayerNorm shared by attention and MLP.

x = wte[t]; h = LN(x; ln_1); q, k, v = W h (no biases); out = x + out_proj(attn) + fc_out(act(fc_in h)).
Both branches read the same h, so the whole MLP of layer 0 folds into the residual columns. The LM head has a
bias and is untied by default. Sizes use the GPT-2 spellings (n_embd, n_head, n_layer, n_inner); the blocks read
n_inner (None -> 4 d), and an `intermediate_size` key, if present, is not used by the model.
CodeGen fuses Q, K, V in one qkv_proj cut into the 4 model-parallel shards it was trained on (hard-coded in the
model): each shard is [q | v | k], V before K, with the heads contiguous across shards.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, fused, layer_norm, mlp, separate
from precompute_cli.spec import four_d, mha

GPT2_SIZES = mha(hidden_size=Key("n_embd", "hidden_size"), num_heads=Key("n_head", "num_attention_heads"),
                 intermediate_size=Key("n_inner", default=four_d), num_layers=Key("n_layer", "num_hidden_layers"))
CODEGEN_SHARDS = 4  # CodeGenAttention.mp_num


def gptj(qkv) -> Layout:
    return Layout(
        prefix="transformer.h.0.", embedding="transformer.wte.weight", sizes=GPT2_SIZES, parallel=True,
        input_norm=layer_norm("ln_1", eps=Key("layer_norm_epsilon", "layer_norm_eps", default=1e-5)),
        qkv=qkv, ffn=mlp("fc_in", "fc_out", bias=True, act=Key("activation_function", default="gelu_new")),
    )


@register
class GPTJ(Declared):
    layouts = {"gptj": gptj(separate("attn.{}_proj")),
               "codegen": gptj(fused("attn.qkv_proj", CODEGEN_SHARDS, order="qvk"))}

    def config_refusal(self) -> str | None:
        d = self.spec.hidden_size
        if self.cfg.model_type == "codegen" and d % CODEGEN_SHARDS:
            return f"n_embd {d} is not a multiple of CodeGen's {CODEGEN_SHARDS} model-parallel shards"
        return None
