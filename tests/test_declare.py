"""The declaration API (recipes/declare.py): its guide's example works, the skeleton computes what the Layout says,
tensors declared kept are checked and stay, recipes are discovered, and config defaults of 0 or False hold."""

from __future__ import annotations

import json
import math
import pkgutil
import textwrap

import numpy as np
import pytest
from tiny import build, convert, tensors

import precompute_cli.recipes as recipes
from precompute_cli.recipes import REGISTRY, declare
from precompute_cli.recipes.declare import Declared, Key, Layout, fused, glu, rms
from precompute_cli.recipes.llama import Llama
from precompute_cli.spec import Config, Sizes

EXAMPLE = dict(model_type="example", hidden_size=16, num_attention_heads=4, intermediate_size=24, vocab_size=11,
               num_hidden_layers=2, attention_bias=True)


@pytest.fixture
def example():
    """The worked example of declare.py's guide, run as written."""
    doc = declare.__doc__
    block = doc[doc.index("would be:") + len("would be:"):doc.index("   Names under")]
    namespace: dict = {}
    exec(textwrap.dedent(block), namespace)  # noqa: S102 - our own docstring
    yield namespace["Example"]
    REGISTRY.pop("example", None)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def test_the_guides_example_folds_what_it_declares(example):
    recipe = recipes.recipe_for(Config(dict(EXAMPLE)))
    assert type(recipe) is example and recipe.spec.num_kv_heads == 3 and recipe.spec.block == "parallel"
    p = "model.layers.0."
    shapes = recipe.folded()
    assert shapes[p + "self_attn.k_proj.bias"] == (12,) and shapes[p + "self_attn.q_norm.weight"] == (4,)
    assert shapes[p + "mlp.fc2.weight"] == (16, 24) and shapes[p + "post_attention_layernorm.bias"] == (16,)
    patch = recipe.runtime_patch()
    assert patch.identities == ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")
    assert patch.zeros == ("mlp",) and patch.projections["k"] == "self_attn.k_proj"

    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s) for n, s in shapes.items()}
    x = rng.standard_normal((5, 16))
    out = recipe.fold(weights.__getitem__, x)
    w = {n.removeprefix(p): v for n, v in weights.items()}  # an independent computation, in float64
    h = _rms(x, w["input_layernorm.weight"], 1e-5)
    k = h @ w["self_attn.k_proj.weight"].T + w["self_attn.k_proj.bias"]
    k = _rms(k.reshape(5, 3, 4), w["self_attn.k_norm.weight"], 1e-5).reshape(5, 12)
    h2 = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    h2 = h2 * w["post_attention_layernorm.weight"] + w["post_attention_layernorm.bias"]
    up = h2 @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]
    gelu = 0.5 * up * (1 + np.vectorize(math.erf)(up / math.sqrt(2)))
    residual = x + gelu @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
    np.testing.assert_allclose(out["k"], k, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["residual"], residual, rtol=1e-10, atol=1e-10)
    assert out["q"].shape == (5, 16) and out["v"].shape == (5, 12)


def test_a_qk_norm_after_rope_stays_and_changes_nothing_in_the_table():
    class AfterRope(Declared):
        layouts = {"after": Layout(qk_norm=rms("self_attn.{}_norm", scope="head", after_rope=True))}

    recipe = AfterRope(Config(dict(EXAMPLE, model_type="after")))
    assert not any("_norm" in n for n in recipe.folded() if "layernorm" not in n)
    assert recipe.kept() == ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight")
    assert recipe.runtime_patch().identities == ("input_layernorm",)
    shapes = recipe.folded()
    rng = np.random.default_rng(1)
    weights = {n: rng.standard_normal(s) for n, s in shapes.items()}
    x = rng.standard_normal((3, 16))
    h = _rms(x, weights["model.layers.0.input_layernorm.weight"], 1e-6)
    q = recipe.fold(weights.__getitem__, x)["q"]
    np.testing.assert_allclose(q, h @ weights["model.layers.0.self_attn.q_proj.weight"].T, rtol=1e-12)


@pytest.mark.parametrize("keep, ok", [("self_attn.o_proj.weight", True), ("self_attn.sinks", False)])
def test_kept_tensors_must_exist_and_stay(tmp_path, monkeypatch, capsys, keep, ok):
    class Kept(Llama):
        layouts = {"llama": Layout(keep=(keep,))}

    monkeypatch.setitem(REGISTRY, "llama", Kept)
    src = build(tmp_path / "src", "llama")
    capsys.readouterr()
    assert convert(src, tmp_path / "out") == (0 if ok else 2)
    if ok:
        assert "model.layers.0." + keep in tensors(tmp_path / "out" / "model.safetensors")
        removed = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]["removed"]
        assert "model.layers.0.self_attn.q_proj.weight" in removed and "model.layers.0." + keep not in removed
    else:
        assert "has no tensor model.layers.0.self_attn.sinks" in capsys.readouterr().err


def test_every_family_module_is_discovered():
    # unfolded: the census of types without a recipe; projection: the mixer kinds' machinery; per_layer: Gemma's
    # per-layer inputs (gemma4, gemma3n)
    helpers = {"base", "declare", "ops", "unfolded", "projection", "per_layer"}
    families = {m.name for m in pkgutil.iter_modules(recipes.__path__)} - helpers
    registered = {cls.__module__.rsplit(".", 1)[1] for cls in REGISTRY.values()}
    assert families <= registered and len(families) >= 13


def test_config_defaults_of_zero_and_false_are_kept():
    """hf_spec's `or default` used to replace a declared default of 0 by the common one."""
    cfg = Config({"hidden_size": 16, "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 5,
                  "num_hidden_layers": 1})
    spec = Sizes(num_kv_heads=Key("num_key_value_heads", default=0)).read(
        cfg, model_type="t", block="serial", positional="rope", ffn_matrices=3)
    assert spec.num_kv_heads == 0 and spec.head_dim == 4
    assert Key("attention_bias", default=False).read(cfg) is False
    assert Key(default=7).read(Config({"x": 1})) == 7  # no names: the model ignores the config's value


@pytest.mark.parametrize("make", [lambda: fused("attn.qkv", "interleaved"), lambda: glu(bias=True),
                                  lambda: rms("q_norm", scope="channel")])
def test_a_declaration_that_means_nothing_is_refused_when_written(make):
    with pytest.raises(ValueError):
        make()
