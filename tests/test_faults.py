"""What verify catches: a representative subset of scripts/faults.py's catalogue (every fault once, each dtype and
each kind of model at least once; the whole catalogue is the script's), fault-free conversions over other seeds
(false alarms), and the table-row check's oracle (transformers' own layer 0) against the recipes' folds where the
hooks have the most to get right."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import build
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import faults  # noqa: E402

from precompute_cli.plan import make_plan  # noqa: E402
from precompute_cli.recipes import recipe_for  # noqa: E402
from precompute_cli.source import resolve  # noqa: E402
from precompute_cli.spec import Config  # noqa: E402
from precompute_cli.st_io import read_array  # noqa: E402
from precompute_cli.verify import oracle_rows, verify_checkpoint  # noqa: E402

SUBSET = {
    ("qwen2", "float32"): ["eps 1e-6 instead of the config's", "q/k/v bias missing", "table shifted by one token",
                           "q heads in the wrong order"],
    ("gpt_neox", "float16"): ["residual columns zeroed (parallel)", "FFN folded from the attention's norm (parallel)",
                              "k and v columns swapped", "one common token's row corrupted"],
    ("gemma3_text", "bfloat16"): ["norm read as w / (1 + w)", "embedding scale applied twice",
                                  "embedding scale not applied", "table rounded below its dtype"],
}
CASES = [(m, d, f) for (m, d), names in SUBSET.items() for f in names]


def test_the_subset_covers_every_fault_dtype_and_model():
    assert {f for _, _, f in CASES} == set(faults.FAULT_BY_NAME)
    assert {d for _, d, _ in CASES} == set(faults.DTYPES) and {m for m, _, _ in CASES} == set(faults.MODELS)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    made: dict[tuple[str, str], faults.Subject] = {}

    def get(model: str, dtype: str) -> faults.Subject:
        if (model, dtype) not in made:
            made[model, dtype] = faults.subject(tmp_path_factory.mktemp(f"{model}-{dtype}"), model, dtype)
        return made[model, dtype]

    return get


@pytest.mark.parametrize(("model", "dtype", "fault"), CASES)
def test_verify_fails_a_fault_above_the_noise(subjects, tmp_path, model, dtype, fault):
    s = subjects(model, dtype)
    table = faults.FAULT_BY_NAME[fault].make(s)
    assert table is not None and not np.array_equal(table, s.stored)
    faulty = faults.inject(s, table, tmp_path / "faulty")
    change, units = faults.effect(s, faulty)
    assert units > 1, f"{fault} changes the logits by {change:.3g}, within {dtype}'s own noise: not a test of verify"
    result = verify_checkpoint(resolve(str(s.src)), resolve(str(faulty)), dtype=dtype, tokens=4)
    assert not result.passed, f"{fault} ({units:.3g} noise units) passes verify"
    rows, runs = faults.margins(result)
    assert rows > 1  # the oracle's row check catches each of them on its own
    assert "table rows" in result.failure


@pytest.mark.parametrize(("model", "dtype", "seed"), [("qwen2", "bfloat16", 3), ("gemma3_text", "float16", 5)])
def test_no_false_alarm(tmp_path, model, dtype, seed):
    """A fault-free conversion passes (scripts/faults.py false-alarms runs every equivalence model over seeds)."""
    s = faults.subject(tmp_path, model, dtype, seed=seed)
    result = verify_checkpoint(resolve(str(s.src)), resolve(str(s.out)), dtype=dtype, tokens=4, seed=seed)
    assert result.passed, result.failure
    rows, runs = faults.margins(result)
    assert rows < 0.6 and runs < 1


ORACLE_CASES = {  # where the hooks have the most to get right
    "bloom-post-ln-untied": (dict(model_type="bloom", n_head=4, n_layer=2, tie_word_embeddings=False,
                                  apply_residual_connection_post_layernorm=True), torch.float32),  # residual = LN(x)
    "falcon-40b": (dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, bias=True),
                   torch.float32),  # the MLP's output is added to in place
    "mpt-clip": (dict(model_type="mpt", d_model=64, n_heads=4, n_layers=2, attn_config={"clip_qkv": 0.5}),
                 torch.float32),  # a functional clamp of the fused output
    "olmo-clip": (dict(model_type="olmo", clip_qkv=0.3, attention_bias=True), torch.float32),  # an in-place clamp
    "qwen3": (dict(model_type="qwen3", head_dim=16), torch.float32),  # per-head norms of a view
    "gemma-untied": (dict(model_type="gemma", tie_word_embeddings=False, head_dim=16, hidden_size=48),
                     torch.bfloat16),  # sqrt(48) rounds in bfloat16
    "mixtral": (dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2), torch.float32),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_oracle_agrees_with_the_fold(tmp_path, case):
    overrides, dtype = ORACLE_CASES[case]
    src = build(tmp_path / "src", dtype=dtype, **overrides)
    recipe = recipe_for(Config.load(src / "config.json"))
    plan = make_plan(resolve(str(src)), recipe)
    rows = list(range(0, recipe.spec.vocab_size, 5))
    x = np.concatenate([read_array(*plan.inputs[recipe.embedding], (r, r + 1), np.float64) for r in rows])
    fold = recipe.fold(plan.weights(np.float64), x)
    oracle = oracle_rows(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), recipe, rows)
    for name, span in recipe.columns().items():
        if span is not None:
            err = np.abs(oracle[name] - fold[name]).max() / np.abs(fold[name]).max()
            assert err < 1e-6, (name, err)


def test_round_mantissa_is_bfloat16_at_7_bits():
    x = torch.randn(4096) * 10
    assert np.array_equal(faults.round_mantissa(x.numpy(), 7), x.bfloat16().float().numpy())
    coarse = faults.round_mantissa(x.numpy(), 3)
    assert np.abs(coarse / x.numpy() - 1).max() <= 2.0**-4 and not np.array_equal(coarse, x.bfloat16().float().numpy())
