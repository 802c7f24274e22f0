"""Phi (phi-1, phi-1.5, phi-2): a parallel block with one LayerNorm shared by attention and MLP.

x = embed_tokens[t]; h = LN(x; input_layernorm); q, k, v = W h + b (biases always);
qk_layernorm: a LayerNorm over head_dim, shared by all heads, on q and k before RoPE;
out = x + dense(attn) + fc2(act(fc1 h)), so the whole MLP of layer 0 folds into the residual columns.
The LM head has a bias; tying is off by default.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, layer_norm, mlp, separate


@register
class Phi(Declared):
    layouts = {"phi": Layout(
        parallel=True,
        input_norm=layer_norm("input_layernorm"),
        qkv=separate(bias=True),
        qk_norm=layer_norm("self_attn.{}_layernorm", scope="head", when=Key("qk_layernorm", default=False)),
        ffn=mlp("fc1", "fc2", bias=True, act=Key("hidden_act", default="gelu_new")),
    )}
