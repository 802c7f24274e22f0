"""Cohere (Command-R, Command-R+), Cohere 2 (Command R7B, Command A): a parallel block with one bias-free,
mean-centred LayerNorm.

x = embed_tokens[t]; h = CohereLayerNorm(x) (float32, no bias); q, k, v = W h (+ b if attention_bias);
cohere use_qk_norm: the same norm over head_dim on q and k before RoPE, with one weight row per head ([H, hd],
[KV, hd]); out = x + o_proj(attn) + down(silu(gate h) * up h), so the whole MLP of layer 0 folds into the residual
columns. Tied by default; the LM head's logit_scale comes after the last layer and is left alone.
cohere2 drops the q/k norms and forces head_dim to hidden_size / heads whatever the config says. Its sliding layers
(layer 0 among them) apply RoPE and its full-attention layers none (NoPE): both act after the table.
cohere2_moe is the cohere2 block with a routed MoE in place of the MLP: the paper's "parallel Mixtral". Its whole
output, router, top-k experts and shared experts, folds into the residual columns (recipes.declare.Moe). The norm
is a Llama RMSNorm when rms_norm_eps is set, else the Cohere LayerNorm; layer 0 is a dense MLP of
prefix_dense_intermediate_size instead when mlp_layer_types (or first_k_dense_replace) says so.
"""

from __future__ import annotations

from dataclasses import replace

from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Moe, Sizes, glu, layer_norm, rms, separate
from precompute_cli.spec import TIED, Config, ModelSpec, per_head

COHERE_NORM = layer_norm("input_layernorm", bias=False)
ATTENTION_BIAS = separate(bias=Key("attention_bias", default=False))


@register
class Cohere(Declared):
    layouts = {
        "cohere": Layout(
            sizes=Sizes(tied_embeddings=TIED), parallel=True, input_norm=COHERE_NORM, qkv=ATTENTION_BIAS,
            qk_norm=layer_norm("self_attn.{}_norm", bias=False, scope="head", rows="per_head",
                               when=Key("use_qk_norm", default=False)),
        ),
        "cohere2": Layout(sizes=Sizes(tied_embeddings=TIED, head_dim=Key(default=per_head)), parallel=True,
                          input_norm=COHERE_NORM, qkv=ATTENTION_BIAS),
    }


def shared_width(cfg: Config, spec: ModelSpec) -> int:
    """Cohere2MoeSparseMoeBlock: num_shared_experts experts fused into one GLU that many times as wide."""
    return spec.intermediate_size * cfg.int("num_shared_experts", default=0)


ROUTED = Layout(
    sizes=Sizes(tied_embeddings=TIED, head_dim=Key("head_dim", default=128),
                num_experts=Key("num_experts", default=8)),
    parallel=True, qkv=ATTENTION_BIAS,
    ffn=Moe(shared="shared_experts", shared_width=shared_width,
            average_shared=True),  # the config class's default; declare() reads the key
)
SELECTIONS, COMBINATIONS = ("softmax", "sigmoid"), ("average", "sum")


@register
class Cohere2Moe(Declared):
    layouts = {"cohere2_moe": ROUTED}

    def declare(self) -> Layout:
        cfg = self.cfg
        rms_eps = cfg.get("rms_norm_eps")
        norm = rms("input_layernorm", eps=Key("rms_norm_eps")) if rms_eps is not None else COHERE_NORM
        if self.dense_layer_0():
            sizes = replace(ROUTED.sizes, num_experts=Key(default=1),
                            intermediate_size=Key("prefix_dense_intermediate_size"))
            return replace(ROUTED, sizes=sizes, input_norm=norm, ffn=glu())
        selection = cfg.get("expert_selection_fn", default="softmax")
        moe = replace(ROUTED.ffn, scoring=selection,  # softmax over the top k logits: the renormalised softmax
                      renormalize=True if selection == "softmax" else Key("norm_topk_prob", default=True),
                      average_shared=cfg.get("shared_expert_combination_strategy", default="average") == "average")
        return replace(ROUTED, input_norm=norm, ffn=moe)

    def dense_layer_0(self) -> bool:
        types = self.cfg.get("mlp_layer_types")
        if isinstance(types, list) and types:
            return types[0] == "dense"
        return self.cfg.int("first_k_dense_replace", default=0) > 0

    def config_refusal(self) -> str | None:
        cfg = self.cfg
        selection = cfg.get("expert_selection_fn", default="softmax")
        combination = cfg.get("shared_expert_combination_strategy", default="average")
        if selection not in SELECTIONS:
            return f"expert_selection_fn {selection!r} is not one of {', '.join(SELECTIONS)}"
        if combination not in COMBINATIONS:
            return f"shared_expert_combination_strategy {combination!r} is not one of {', '.join(COMBINATIONS)}"
        return None
