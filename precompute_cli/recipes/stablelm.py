"""StableLM: serial by default, parallel with `use_parallel_residual`.

x = embed_tokens[t]; h = LayerNorm(x; input_layernorm weight and bias, layer_norm_eps); q, k, v = W h (+ b if
use_qkv_bias). qk_layernorm: one bias-free LayerNorm per head (q_layernorm.norms.{i}, k_layernorm.norms.{i}) before
RoPE. Serial: only Q, K, V fold. Parallel: out = x + attn(h) + mlp(h) with the same h, so the FFN folds too and the
residual columns hold x + mlp(h); the runtime's MLP of layer 0 returns zeros. head_dim is always d / heads
(StableLmAttention ignores a head_dim key), and the partial rotary factor only decides which dims RoPE turns.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, layer_norm, separate
from precompute_cli.spec import per_head


@register
class StableLm(Declared):
    layouts = {"stablelm": Layout(
        sizes=Sizes(head_dim=Key(default=per_head)),
        parallel=Key("use_parallel_residual", default=False),
        input_norm=layer_norm("input_layernorm"),
        qkv=separate(bias=Key("use_qkv_bias", default=False)),
        qk_norm=layer_norm("self_attn.{}_layernorm", bias=False, scope="head", rows="modules",
                           when=Key("qk_layernorm", default=False)),
    )}
