"""StableLM: serial by default, parallel with `use_parallel_residual`.

x = embed_tokens[t]; h = LayerNorm(x; input_layernorm weight and bias, layer_norm_eps); q, k, v = W h (+ b if
use_qkv_bias). qk_layernorm: one bias-free LayerNorm per head (q_layernorm.norms.{i}, k_layernorm.norms.{i}) before
RoPE. Serial: only Q, K, V fold. Parallel: out = x + attn(h) + mlp(h) with the same h, so the FFN folds too and the
residual columns hold x + mlp(h); the runtime's MLP of layer 0 returns zeros. head_dim is always d / heads, and the
partial rotary factor only decides which dims RoPE turns, after the fold.
"""

from __future__ import annotations

import torch

from precompute_cli.recipes import ops
from precompute_cli.recipes.base import Recipe, RuntimePatch, Shape, Weights, register
from precompute_cli.spec import ModelSpec

_MLP = ("gate", "up", "down")


@register
class StableLm(Recipe):
    model_types = ("stablelm",)
    prefix = "model.layers.0."

    def describe(self) -> ModelSpec:
        c = self.cfg
        d, heads = c.int("hidden_size"), c.int("num_attention_heads")
        return ModelSpec(
            model_type=c.model_type, block="parallel" if self.parallel else "serial", positional="rope",
            hidden_size=d, num_heads=heads, num_kv_heads=c.int("num_key_value_heads", default=heads),
            head_dim=d // heads, intermediate_size=c.int("intermediate_size"), ffn_matrices=3, num_experts=1,
            vocab_size=c.int("vocab_size"), num_layers=c.int("num_hidden_layers"),
            tied_embeddings=bool(c.get("tie_word_embeddings", default=False)), dtype=c.dtype,
        )

    def refusal(self) -> str | None:
        act = self.cfg.get("hidden_act", default="silu")
        if self.parallel and act not in ops.ACTIVATIONS:
            return f"hidden_act {act!r} is not an activation this tool can fold into the parallel FFN"
        return None

    @property
    def parallel(self) -> bool:
        return bool(self.cfg.get("use_parallel_residual", default=False))

    @property
    def has_bias(self) -> bool:
        return bool(self.cfg.get("use_qkv_bias", default=False))

    @property
    def qk_norm(self) -> bool:
        return bool(self.cfg.get("qk_layernorm", default=False))

    @property
    def embedding(self) -> str:
        return "model.embed_tokens.weight"

    def folded(self) -> dict[str, Shape]:
        s, p = self.spec, self.prefix
        out: dict[str, Shape] = {p + "input_layernorm.weight": (s.hidden_size,),
                                 p + "input_layernorm.bias": (s.hidden_size,)}
        for name, width in (("q", s.q_dim), ("k", s.kv_dim), ("v", s.kv_dim)):
            out[f"{p}self_attn.{name}_proj.weight"] = (width, s.hidden_size)
            if self.has_bias:
                out[f"{p}self_attn.{name}_proj.bias"] = (width,)
        if self.qk_norm:
            for name, heads in (("q", s.num_heads), ("k", s.num_kv_heads)):
                out.update({f"{p}self_attn.{name}_layernorm.norms.{i}.weight": (s.head_dim,) for i in range(heads)})
        if self.parallel:
            d, i = s.hidden_size, s.intermediate_size
            out.update({f"{p}mlp.{n}_proj.weight": (d, i) if n == "down" else (i, d) for n in _MLP})
        return out

    def fold(self, w: Weights, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p, s = self.prefix, self.spec
        eps = float(self.cfg.get("layer_norm_eps", default=1e-5))
        x = ops.upcast(x)
        h = ops.layer_norm(x, w(p + "input_layernorm.weight"), w(p + "input_layernorm.bias"), eps)
        out = {}
        for name in "qkv":
            bias = w(f"{p}self_attn.{name}_proj.bias") if self.has_bias else None
            out[name] = ops.linear(h, w(f"{p}self_attn.{name}_proj.weight"), bias)
        if self.qk_norm:
            for name, heads in (("q", s.num_heads), ("k", s.num_kv_heads)):
                weight = torch.stack([w(f"{p}self_attn.{name}_layernorm.norms.{i}.weight") for i in range(heads)])
                per_head = ops.layer_norm(out[name].unflatten(-1, (heads, s.head_dim)), None, None, eps)
                out[name] = (per_head * weight).flatten(-2)
        if self.parallel:
            act = str(self.cfg.get("hidden_act", default="silu"))
            x = x + ops.glu(h, *(w(f"{p}mlp.{n}_proj.weight") for n in _MLP), act)
        return {"residual": x, **out}

    def runtime_patch(self) -> RuntimePatch:
        qk_norms = ("self_attn.q_layernorm", "self_attn.k_layernorm") if self.qk_norm else ()
        return RuntimePatch(
            layer="model.layers.0",
            projections={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
            identities=("input_layernorm", *qk_norms),
            zeros=("mlp",) if self.parallel else (),
        )
