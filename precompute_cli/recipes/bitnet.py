"""BitNet b1.58 (bitnet): Llama's serial skeleton; what makes it BitNet lives in its quantization_config.

x = embed_tokens[t]; h = RMSNorm(x; input_layernorm); q, k, v = W h (+ b). attn_sub_norm (before o_proj) and
ffn_sub_norm act after the table. transformers' BitNet model is plain linear layers: the ternary weights and the
per-token int8 activation quantisation come only with a `quantization_config` (quant_method "bitnet"), whose
integration swaps every linear layer for a BitLinear (packed ternary weights) or an AutoBitLinear. That layer
quantises its input per token (absmax to int8) before the matmul, so it is a function of the token alone too and
would fold exactly; the fold does not compute it yet, and such checkpoints are refused.
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, rms, separate


@register
class BitNet(Declared):
    layouts = {
        "bitnet": Layout(sizes=Sizes(num_kv_heads=Key("num_key_value_heads", default=5)),
                         input_norm=rms("input_layernorm", eps=Key("rms_norm_eps", default=1e-5)),
                         qkv=separate(bias=Key("attention_bias", default=False))),
    }

    def config_refusal(self) -> str | None:
        q = self.cfg.get("quantization_config")
        if isinstance(q, dict) and q.get("quant_method") == "bitnet":
            return ("quant_method 'bitnet': layer 0's q/k/v are BitLinear layers that quantise their input per token "
                    "to int8 before a ternary matmul, which the fold does not compute yet (a token-only function, "
                    "so it could fold exactly)")
        return None
