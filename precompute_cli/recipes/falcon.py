"""Falcon (7B, 40B/180B, Falcon2-11B, Falcon-RW): one fused QKV in three layouts, parallel or serial blocks.

x = word_embeddings[t] (nothing else happens before layer 0, so RoPE and ALiBi both fold).
Fused `query_key_value` output, by layout (FalconAttention._split_heads):
  multi_query (not new arch): [q_0 .. q_{H-1}, k, v], one KV head whatever num_kv_heads says;
  new_decoder_architecture:   per KV group g, [q_{g,0} .. q_{g,r-1}, k_g, v_g] with r = H / KV;
  neither (MHA, Falcon-RW):   per head h, [q_h, k_h, v_h].
Blocks: new_decoder_architecture is always parallel, with ln_attn and ln_mlp on x (num_ln_in_parallel_attn None
or 2) or one shared input_layernorm (1); otherwise parallel_attn chooses parallel with one shared input_layernorm,
or serial with input_layernorm + post_attention_layernorm. Parallel: out = x + attn(h) + mlp(h'), so the MLP
folds into the residual columns. Linear biases follow `bias`; the LayerNorms always carry one.
The layout depends on these flags, so this recipe builds its Layout from the config (declare).
"""

from __future__ import annotations

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Sizes, fused, layer_norm, mlp
from precompute_cli.spec import TIED, four_d, heads, per_head

EPS = Key("layer_norm_epsilon", default=1e-5)
BIAS = Key("bias", default=False)
DECLARED_KV = Key("num_kv_heads", "n_head_kv", default=heads)


@register
class Falcon(Declared):
    model_types = ("falcon",)

    @property
    def new_arch(self) -> bool:
        return bool(self.cfg.get("new_decoder_architecture", default=False))

    @property
    def multi_query(self) -> bool:
        return not self.new_arch and bool(self.cfg.get("multi_query", default=True))

    def declare(self) -> Layout:
        c, new_arch = self.cfg, self.new_arch
        # ln_attn + ln_mlp: FalconDecoderLayer sets num_ln_in_parallel_attn = 2 when it is None with the new arch
        two_norms = new_arch and c.get("num_ln_in_parallel_attn", default=2) == 2
        return Layout(
            prefix="transformer.h.0.", embedding="transformer.word_embeddings.weight",
            sizes=Sizes(hidden_size=Key("hidden_size", "n_embed"), num_heads=Key("num_attention_heads", "n_head"),
                        num_kv_heads=DECLARED_KV if new_arch else Key(default=1 if self.multi_query else heads),
                        head_dim=Key(default=per_head), intermediate_size=Key("ffn_hidden_size", default=four_d),
                        num_layers=Key("num_hidden_layers", "n_layer"),
                        tied_embeddings=TIED),
            parallel=new_arch or bool(c.get("parallel_attn", default=True)),
            positional="alibi" if c.get("alibi", default=False) else "rope",
            input_norm=layer_norm("ln_attn" if two_norms else "input_layernorm", eps=EPS),
            qkv=fused("self_attention.query_key_value",
                      "per_kv_group" if new_arch else "blocked" if self.multi_query else "per_head", bias=BIAS),
            ffn=mlp("dense_h_to_4h", "dense_4h_to_h", bias=BIAS, act=Key("activation", default="gelu"),
                    norm=layer_norm("ln_mlp", eps=EPS) if two_norms else None),
        )

    def config_refusal(self) -> str | None:
        c, s, new_arch = self.cfg, self.spec, self.new_arch
        if new_arch and (s.num_kv_heads == 0 or s.num_heads % s.num_kv_heads):
            return f"num_attention_heads {s.num_heads} is not a multiple of num_kv_heads {s.num_kv_heads}"
        if new_arch and not c.get("parallel_attn", default=True):
            return ("new_decoder_architecture with parallel_attn=false has no working layer in transformers "
                    "(FalconDecoderLayer builds serial norms but runs the parallel path)")
        n_ln = c.get("num_ln_in_parallel_attn")
        if not new_arch and self.parallel and n_ln not in (None, 1):
            return f"num_ln_in_parallel_attn={n_ln} without new_decoder_architecture does not run in transformers"
        if new_arch and n_ln not in (None, 1, 2):
            return f"num_ln_in_parallel_attn={n_ln} is not 1 or 2"
        declared_kv = DECLARED_KV.int(c, {"num_heads": s.num_heads})
        if not new_arch and not self.multi_query and declared_kv != s.num_heads:
            return (f"num_kv_heads={declared_kv} with multi_query=false and no new_decoder_architecture: the fused "
                    f"QKV then holds {s.num_heads} KV heads, which transformers cannot run")
        return None
