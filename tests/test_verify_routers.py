"""verify reads MoE routing where the recipe says the routers are (Recipe.routers): the converted model and the
original record the same routers, so their records line up position by position."""

from __future__ import annotations

import pytest
import torch
from tiny import build, convert

from precompute_cli.plan import load_recipe
from precompute_cli.recipes.base import Routers
from precompute_cli.source import resolve
from precompute_cli.verify import _load_converted, _load_original, make_probe, run_model

CASES = {
    # serial MoE, transformers' *TopKRouter: the default
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    # parallel MoE: layer 0's router folds into the table, the converted model never runs it
    "cohere2_moe": dict(model_type="cohere2_moe", num_experts=4, num_experts_per_tok=2, head_dim=16),
    # JetMoeTopKGating returns tokens sorted by expert: the recipe names its Linear and the top k of its logits
    "jetmoe": dict(model_type="jetmoe", kv_channels=16, num_local_experts=4, num_experts_per_tok=2),
}
# routers recorded per position: (layers whose routers both models run) x top_k
CHOICES = {"mixtral": 2 * 2, "cohere2_moe": 1 * 2, "jetmoe": (2 + 1) * 2}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (original, converted), each built and converted once."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            src = build(root / "src", **CASES[name])
            assert convert(src, root / "out") == 0
            made[name] = resolve(str(src)), resolve(str(root / "out"))
        return made[name]
    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_models_record_the_routers_the_recipe_names_alike(converted, name):
    src, out = converted(name)
    routers = load_recipe(src).routers()
    probe = make_probe(211, 0)
    ref = run_model(_load_original(src, "float32"), probe, 2, routers)
    conv = run_model(_load_converted(out, "float32"), probe, 2, routers)
    positions = ref.logits.shape[0]
    assert ref.routing is not None and ref.routing.shape == (positions, CHOICES[name])
    assert torch.equal(conv.routing, ref.routing)  # float32: the same experts everywhere
    assert int(ref.routing.max()) < 4 and len(ref.routing.unique()) > 1


def test_a_folded_router_left_in_would_not_line_up(converted):
    """The exclusion is what makes a parallel MoE's records comparable (before, verify judged it everywhere)."""
    src, out = converted("cohere2_moe")
    probe = make_probe(211, 0)
    everything = Routers()
    ref = run_model(_load_original(src, "float32"), probe, 2, everything)
    conv = run_model(_load_converted(out, "float32"), probe, 2, everything)
    assert ref.routing.shape[1] == conv.routing.shape[1] + 2


def test_routers_match_by_class_or_path_less_the_excluded():
    default = Routers()
    assert default.matches("model.layers.1.mlp.gate", "MixtralTopKRouter")
    assert not default.matches("model.layers.1.mlp.router", "JetMoeTopKGating")
    jet = Routers(classes=None, paths=("*.mlp.router.layer",), exclude=("model.layers.0.*",), top_k=2)
    assert jet.matches("model.layers.1.mlp.router.layer", "Linear")
    assert not jet.matches("model.layers.0.mlp.router.layer", "Linear")
    assert not jet.matches("model.layers.1.mlp.router", "JetMoeTopKGating")
