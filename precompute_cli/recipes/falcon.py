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
"""

from __future__ import annotations

import numpy as np

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec


@register
class Falcon(Recipe):
    model_types = ("falcon",)
    prefix = "transformer.h.0."

    # -- config --------------------------------------------------------------------------------------------------
    @property
    def new_arch(self) -> bool:
        return bool(self.cfg.get("new_decoder_architecture", default=False))

    @property
    def multi_query(self) -> bool:
        return not self.new_arch and bool(self.cfg.get("multi_query", default=True))

    @property
    def parallel(self) -> bool:
        return self.new_arch or bool(self.cfg.get("parallel_attn", default=True))

    @property
    def two_norms(self) -> bool:
        """ln_attn + ln_mlp; FalconDecoderLayer sets num_ln_in_parallel_attn = 2 when it is None with the new arch."""
        return self.new_arch and self.cfg.get("num_ln_in_parallel_attn", default=2) == 2

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("bias", default=False))

    @property
    def eps(self) -> float:
        return float(self.cfg.get("layer_norm_epsilon", default=1e-5))

    @property
    def groups(self) -> int:
        """Blocks of [q part, k part, v part] in the fused output (see ops.split_qkv)."""
        s = self.spec
        return s.num_kv_heads if self.new_arch else (1 if self.multi_query else s.num_heads)

    def describe(self) -> ModelSpec:
        c = self.cfg
        d = c.int("hidden_size", "n_embed")
        heads = c.int("num_attention_heads", "n_head")
        declared_kv = c.int("num_kv_heads", "n_head_kv", default=heads)
        kv = declared_kv if self.new_arch else (1 if self.multi_query else heads)
        return ModelSpec(
            model_type="falcon", block="parallel" if self.parallel else "serial",
            positional="alibi" if c.get("alibi", default=False) else "rope",
            hidden_size=d, num_heads=heads, num_kv_heads=kv, head_dim=d // max(heads, 1),
            intermediate_size=c.int("ffn_hidden_size", default=4 * d), ffn_matrices=2, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("num_hidden_layers", "n_layer"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=True)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        c, s = self.cfg, self.spec
        if s.num_heads == 0 or s.hidden_size % s.num_heads:
            return f"hidden_size {s.hidden_size} is not a multiple of num_attention_heads {s.num_heads}"
        if self.new_arch and (s.num_kv_heads == 0 or s.num_heads % s.num_kv_heads):
            return f"num_attention_heads {s.num_heads} is not a multiple of num_kv_heads {s.num_kv_heads}"
        if self.new_arch and not c.get("parallel_attn", default=True):
            return ("new_decoder_architecture with parallel_attn=false has no working layer in transformers "
                    "(FalconDecoderLayer builds serial norms but runs the parallel path)")
        n_ln = c.get("num_ln_in_parallel_attn")
        if not self.new_arch and self.parallel and n_ln not in (None, 1):
            return f"num_ln_in_parallel_attn={n_ln} without new_decoder_architecture does not run in transformers"
        if self.new_arch and n_ln not in (None, 1, 2):
            return f"num_ln_in_parallel_attn={n_ln} is not 1 or 2"
        declared_kv = c.int("num_kv_heads", "n_head_kv", default=s.num_heads)
        if not self.new_arch and not self.multi_query and declared_kv != s.num_heads:
            return (f"num_kv_heads={declared_kv} with multi_query=false and no new_decoder_architecture: the fused "
                    f"QKV then holds {s.num_heads} KV heads, which transformers cannot run")
        act = c.get("activation", default="gelu")
        return self.unknown_activation(act, "activation") if self.parallel else None

    # -- tensors -------------------------------------------------------------------------------------------------
    @property
    def embedding(self) -> str:
        return "transformer.word_embeddings.weight"

    @property
    def attn_norm(self) -> str:
        return "ln_attn" if self.two_norms else "input_layernorm"

    @property
    def mlp_norm(self) -> str:
        return "ln_mlp" if self.two_norms else "input_layernorm"

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        d, inner = s.hidden_size, s.intermediate_size
        norms = {self.attn_norm, self.mlp_norm} if self.parallel else {self.attn_norm}
        out: dict[str, Shape] = {f"{p}{n}.{k}": (d,) for n in sorted(norms) for k in ("weight", "bias")}
        fused = s.q_dim + 2 * s.kv_dim
        out[p + "self_attention.query_key_value.weight"] = (fused, d)
        if self.has_bias:
            out[p + "self_attention.query_key_value.bias"] = (fused,)
        if self.parallel:
            out[p + "mlp.dense_h_to_4h.weight"] = (inner, d)
            out[p + "mlp.dense_4h_to_h.weight"] = (d, inner)
            if self.has_bias:
                out[p + "mlp.dense_h_to_4h.bias"] = (inner,)
                out[p + "mlp.dense_4h_to_h.bias"] = (d,)
        return out

    def fold(self, w: Weights, x: np.ndarray) -> dict[str, np.ndarray]:
        p, s = self.prefix, self.spec
        x = ops.upcast(x)

        def norm(name: str) -> np.ndarray:
            return ops.layer_norm(x, w(f"{p}{name}.weight"), w(f"{p}{name}.bias"), self.eps)

        def bias(name: str) -> np.ndarray | None:
            return w(p + name) if self.has_bias else None

        h = norm(self.attn_norm)
        qkv = "self_attention.query_key_value."
        fused = ops.linear(h, w(p + qkv + "weight"), bias(qkv + "bias"))
        q, k, v = ops.split_qkv(fused, self.groups, s.q_dim, s.kv_dim)
        out = {"residual": x, "q": q, "k": k, "v": v}
        if self.parallel:
            h_mlp = h if self.mlp_norm == self.attn_norm else norm(self.mlp_norm)
            out["residual"] = x + ops.mlp(h_mlp, w(p + "mlp.dense_h_to_4h.weight"), bias("mlp.dense_h_to_4h.bias"),
                                          w(p + "mlp.dense_4h_to_h.weight"), bias("mlp.dense_4h_to_h.bias"),
                                          self.cfg.get("activation", default="gelu"))
        return out

    def runtime_patch(self) -> RuntimePatch:
        norms = (self.attn_norm, self.mlp_norm) if self.parallel and self.two_norms else (self.attn_norm,)
        return RuntimePatch(
            layer="transformer.h.0",
            projections={"qkv": "self_attention.query_key_value"},
            identities=norms,
            zeros=("mlp",) if self.parallel else (),
            fused_groups=self.groups,
        )
