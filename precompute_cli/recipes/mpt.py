"""MPT (serial, ALiBi; only Q, K, V fold): one blocked fused projection, clamped before the split.

x = wte[t]; h = LayerNorm(x; norm_1) with a weight and no bias; qkv = Wqkv h (no bias), rows blocked [q; k; v];
attn_config.clip_qkv (when set and non-zero) clamps the fused output to [-c, c] before the split. The clamp is
applied in the fold, and the runtime's stand-in for Wqkv feeds the clamp values already inside [-c, c], where
it is the identity. transformers' MPT always uses ALiBi and ignores several MosaicML flags; the ones that would
change layer 0 in the original model (no ALiBi, a q/k LayerNorm, biases, multi-query) are refused.
MptMLP hard-codes 4 * d_model (expansion_ratio is ignored).
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Clamp, Declared, Key, Layout, fused, layer_norm, mlp
from precompute_cli.spec import TIED, four_d, mha


@register
class Mpt(Declared):
    layouts = {"mpt": Layout(
        prefix="transformer.blocks.0.", embedding="transformer.wte.weight",
        sizes=mha(hidden_size=Key("d_model", "hidden_size"), num_heads=Key("n_heads", "num_attention_heads"),
                  intermediate_size=Key(default=four_d), num_layers=Key("n_layers", "num_hidden_layers"),
                  tied_embeddings=TIED),
        positional="alibi",
        input_norm=layer_norm("norm_1", bias=False, eps=Key("layer_norm_epsilon", default=1e-5)),
        qkv=fused("attn.Wqkv", "blocked"),
        clamp=Clamp("attn_config.clip_qkv", zero_is_off=True),
        ffn=mlp("up_proj", "down_proj", act=Key(default="gelu")),
    )}

    def config_refusal(self) -> str | None:
        c = self.cfg
        if not c.get("attn_config.alibi", default=True):
            return ("attn_config.alibi is false: the original MPT then adds learned position embeddings before "
                    "layer 0 (which transformers' MPT ignores), so layer 0 cannot be precomputed per token")
        if c.get("attn_config.qk_ln", default=False):
            return "attn_config.qk_ln is set: a q/k LayerNorm that transformers' MPT does not implement"
        if c.get("attn_config.attn_type", default="multihead_attention") != "multihead_attention":
            return f"attn_config.attn_type {c.get('attn_config.attn_type')!r}: transformers' MPT has multi-head only"
        if not c.get("no_bias", default=True):
            return "no_bias is false: the checkpoint's biases are ignored by transformers' MPT"
        return None
