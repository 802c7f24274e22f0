"""verify's row oracle (transformers' own layer-0 modules, hooked, float64) reads mixer and MLA tables too: it
agrees with the recipes' folds where both are right, for every mixer case of the equivalence tests and every MLA
case in both tables, and it is what verify checks their rows against."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_attention_zoo import CASES as ZOO
from test_mixer_families import CASES as MIXERS
from test_mla import CASES as MLA_CASES
from test_mla import MLA
from test_parallel_families import CASES as PARALLEL
from tiny import build, lm_class

from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.source import resolve
from precompute_cli.verify import fold_rows, oracle_covers, oracle_rows

CASES = {**{f"mixer/{k}": v for k, v in MIXERS.items()},
         **{f"mla/{k}": {**MLA, **v} for k, v in MLA_CASES.items()},  # each in both tables
         "gated/afmoe": dict(model_type="afmoe", num_experts=4, num_experts_per_tok=2, num_dense_layers=1, head_dim=16),
         # fused outputs the oracle misread before: CodeGen's [q | v | k] groups, Persimmon's per-head q/k
         # LayerNorms of strided parts (verify's row check failed correct conversions of both)
         "fused/codegen": PARALLEL["codegen"], "fused/persimmon": ZOO["persimmon"][0]}


def _original(src, model_type: str) -> torch.nn.Module:
    cls = lm_class(model_type)
    return cls.from_pretrained(src, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_oracle_agrees_with_the_fold(tmp_path, case):
    overrides = CASES[case]
    src = build(tmp_path / "src", **overrides)
    model = _original(src, overrides["model_type"])
    for table in ("latent", "full") if case.startswith("mla/") else (None,):
        recipe = load_recipe(resolve(str(src)), mla_table=table)
        if not recipe.modules_give_columns():  # LongCat-Flash's full table: its rows are checked against the fold
            assert case == "mla/longcat_flash" and table == "full" and not oracle_covers(recipe)
            continue
        assert oracle_covers(recipe)
        plan = make_plan(resolve(str(src)), recipe)
        rows = list(range(0, recipe.spec.vocab_size, 7))
        fold = fold_rows(plan, rows)
        oracle = oracle_rows(model, recipe, rows)
        for name, span in recipe.columns().items():
            if span is not None:
                assert oracle[name].shape == fold[name].shape, (table, name)
                err = np.abs(oracle[name] - fold[name]).max() / np.abs(fold[name]).max()
                assert err < 1e-6, (table, name, err)


def test_a_routed_attention_is_not_covered(tmp_path):
    """jetmoe's experts and gates columns are a router's choice, not a module's output: verify says it checked its
    rows against the recipe's fold."""
    src = build(tmp_path / "src", model_type="jetmoe", kv_channels=16, num_local_experts=4, num_experts_per_tok=2)
    assert not oracle_covers(load_recipe(resolve(str(src))))
