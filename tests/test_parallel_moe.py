"""A parallel MoE block folds whole: router, top-k, experts and shared expert all land in the residual columns.

The shipped parallel MoE is cohere2_moe (tests/test_parallel_families.py). This file adds a second wiring that no
public architecture has: Qwen2-MoE (softmax over all experts, optional renormalisation, a sigmoid-gated shared
expert, a second norm for the FFN) with its decoder layer rewired as out = x + attn(LN1 x) + moe(LN2 x), registered
under a test-only model_type, with a test-only recipe (a declaration,
recipes.declare.Moe). The product's part is ops.moe, which is also checked here
against transformers' own MoE modules, and the streaming of the experts (never held whole in float).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import assert_equivalent, build, convert
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Cohere2MoeConfig, MixtralConfig, Qwen2MoeConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.cohere2_moe.modeling_cohere2_moe import Cohere2MoeSparseMoeBlock
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeDecoderLayer,
    Qwen2MoeForCausalLM,
    Qwen2MoeSparseMoeBlock,
)

from precompute_cli.cli import main
from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.recipes import REGISTRY, ops
from precompute_cli.recipes.base import register
from precompute_cli.recipes.declare import Declared, Key, Layout, Moe, Sizes, rms, separate
from precompute_cli.source import resolve
from precompute_cli.spec import per_head

MODEL_TYPE = "test_parallel_qwen2_moe"
SIZES = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)


class ParallelMoeConfig(Qwen2MoeConfig):
    model_type = MODEL_TYPE


class ParallelMoeLayer(Qwen2MoeDecoderLayer):
    """Both branches read the same x, each through its own RMSNorm (the GPT-NeoX wiring)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        return hidden_states + attn + self.mlp(self.post_attention_layernorm(hidden_states))


class ParallelMoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = ParallelMoeConfig
    config: ParallelMoeConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.layers = nn.ModuleList(ParallelMoeLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class ParallelMoeRecipe(Declared):
    """The test-only recipe: Qwen2-MoE names, parallel wiring, the whole MoE folded (a Moe declaration)."""

    layouts = {MODEL_TYPE: Layout(
        sizes=Sizes(head_dim=Key(default=per_head), num_experts=Key("num_experts"),
                    intermediate_size=Key("moe_intermediate_size")),
        parallel=True,
        qkv=separate(bias=True),
        ffn=Moe(shared="shared_expert", shared_width=Key("shared_expert_intermediate_size"),
                shared_gate="shared_expert_gate", norm=rms("post_attention_layernorm")),
    )}


@pytest.fixture(scope="module", autouse=True)
def parallel_moe():
    AutoConfig.register(MODEL_TYPE, ParallelMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(ParallelMoeConfig, ParallelMoeForCausalLM, exist_ok=True)
    # on disk, per-expert tensors exactly as Qwen2-MoE checkpoints store them
    register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping("qwen2_moe"), overwrite=True)
    register(ParallelMoeRecipe)
    yield
    REGISTRY.pop(MODEL_TYPE, None)


@pytest.mark.parametrize("renormalize", [False, True])
def test_parallel_moe_equivalent(tmp_path, renormalize):
    src = build(tmp_path / "src", MODEL_TYPE, norm_topk_prob=renormalize, **SIZES)
    assert convert(src, tmp_path / "out") == 0
    removed = set(json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["removed"])
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.3.down_proj.weight",
            "model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.embed_tokens.weight"} <= removed
    assert not any(".layers.1." in n for n in removed)
    assert_equivalent(src, tmp_path / "out")


def test_parallel_moe_bfloat16(tmp_path):
    src = build(tmp_path / "src", MODEL_TYPE, dtype=torch.bfloat16, norm_topk_prob=True, **SIZES)
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out", dtype=torch.bfloat16)


def test_parallel_moe_inspect(tmp_path, capsys):
    src = build(tmp_path / "src", MODEL_TYPE, **SIZES)
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(src), "--json"])
    assert exit_.value.code == 0
    data = json.loads(capsys.readouterr().out)
    d, inner, experts, shared, vocab, q, kv = 64, 32, 4, 48, 211, 64, 32
    assert data["block"] == "parallel" and data["ffn"] == "moe"
    assert data["eliminated_linear_params"] == d * (q + 2 * kv) + 3 * d * inner * experts
    # every tensor removed: 2 norms, q/k/v with biases, router, experts, shared expert and its gate, the embedding
    assert data["eliminated_params"] == (2 * d + d * (q + 2 * kv) + q + 2 * kv + experts * d
                                         + 3 * d * inner * experts + 3 * d * shared + d + vocab * d)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.eval()


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_matches_qwen2_moe_block(renormalize):
    cfg = Qwen2MoeConfig(hidden_size=24, norm_topk_prob=renormalize, **{**SIZES, "moe_intermediate_size": 8,
                                                                        "shared_expert_intermediate_size": 12})
    block = _perturbed(Qwen2MoeSparseMoeBlock(cfg), 0)
    x = torch.randn(3, 7, 24)
    ex = block.experts
    expert = lambda e: (*_np(ex.gate_up_proj[e]).reshape(2, -1, 24), _np(ex.down_proj[e]))  # noqa: E731
    shared = block.shared_expert
    ours = ops.moe(x.numpy(), _np(block.gate.weight), expert, 4, 2, renormalize, "silu",
                   shared=(_np(shared.gate_proj.weight), _np(shared.up_proj.weight), _np(shared.down_proj.weight)),
                   shared_gate=_np(block.shared_expert_gate.weight))
    with torch.no_grad():
        theirs = block(x).numpy()
    assert np.allclose(ours, theirs, atol=1e-5), np.abs(ours - theirs).max()


def test_moe_matches_mixtral_block():
    cfg = MixtralConfig(hidden_size=24, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    block = _perturbed(MixtralSparseMoeBlock(cfg), 1)
    x = torch.randn(2, 9, 24)
    ex = block.experts
    ours = ops.moe(x.numpy(), _np(block.gate.weight),
                   lambda e: (*_np(ex.gate_up_proj[e]).reshape(2, -1, 24), _np(ex.down_proj[e])), 4, 2, True, "silu")
    with torch.no_grad():
        theirs = block(x).numpy()
    assert np.allclose(ours, theirs, atol=1e-5), np.abs(ours - theirs).max()


@pytest.mark.parametrize("selection, normalise, shared, combination", [
    ("softmax", True, 0, "average"), ("softmax", True, 2, "average"), ("sigmoid", True, 1, "sum"),
    ("sigmoid", False, 1, "average")])
def test_moe_matches_cohere2_moe_block(selection, normalise, shared, combination):
    cfg = Cohere2MoeConfig(hidden_size=24, intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                           expert_selection_fn=selection, norm_topk_prob=normalise, num_shared_experts=shared,
                           shared_expert_combination_strategy=combination)
    block = _perturbed(Cohere2MoeSparseMoeBlock(cfg), 2)
    x = torch.randn(2, 9, 24)
    ex = block.experts
    glu = (_np(block.shared_experts.gate_proj.weight), _np(block.shared_experts.up_proj.weight),
           _np(block.shared_experts.down_proj.weight)) if shared else None
    ours = ops.moe(x.numpy(), _np(block.gate.weight), lambda e: (*_np(ex.gate_up_proj[e]).reshape(2, -1, 24),
                                                                  _np(ex.down_proj[e])), 4, 2,
                   selection == "softmax" or normalise, "silu", shared=glu, scoring=selection,
                   average_shared=combination == "average")
    with torch.no_grad():
        theirs = block(x).numpy()
    assert np.allclose(ours, theirs, atol=1e-5), np.abs(ours - theirs).max()


def test_glu_tiled_equals_glu():
    """Blocks of weight rows (as streamed experts are read) give the GLU of the whole matrices."""
    rng = np.random.default_rng(0)
    x, gate, up, down = (rng.standard_normal(s) * 0.3 for s in ((7, 24), (40, 24), (40, 24), (24, 40)))  # float64
    whole = ops.glu(x, gate, up, down, "silu")
    for tile in (4 * 24, 4 * 24 * 3, 1 << 20):  # one row, three rows, all at once
        assert np.allclose(ops.glu_tiled(x, gate, up, down, "silu", tile), whole, rtol=1e-12, atol=1e-12)


def test_experts_are_streamed_not_held(tmp_path):
    """The fold reads each expert from its file a block at a time: none is kept in the weight cache (in float32,
    all experts would cost twice their bfloat16 size for the whole conversion), and the columns are the same as
    with every weight loaded whole."""
    src = build(tmp_path / "src", "cohere2_moe", dtype=torch.bfloat16, num_experts=4, num_experts_per_tok=2,
                head_dim=16, num_shared_experts=1)
    source = resolve(str(src))
    plan = make_plan(source, load_recipe(source))
    streamed = set(plan.recipe.streamed())
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in streamed
    assert "model.layers.0.mlp.shared_experts.gate_proj.weight" in streamed
    assert "model.layers.0.mlp.gate.weight" not in streamed  # the router is small: read once
    reader = plan.weights(np.float32)
    x = reader(plan.recipe.embedding)[:50]
    got = plan.recipe.fold(reader, x)
    assert not streamed & set(reader.cache)
    whole = plan.weights(np.float32)
    expected = plan.recipe.fold(lambda name: whole(name), x)  # a plain accessor: every weight whole
    for name in got:
        assert np.allclose(got[name], expected[name], atol=1e-6), name
