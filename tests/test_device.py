"""--device: the GEMMs through torch (the CUDA path, run here on torch's CPU device) give the numpy fold."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import build

from precompute_cli.device import TorchMatmul
from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.recipes import ops
from precompute_cli.source import resolve
from precompute_cli.st_io import read_array


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_gemms_through_torch_match_the_numpy_fold(tmp_path, model_type):
    source = resolve(str(build(tmp_path / "src", model_type)))
    plan = make_plan(source, load_recipe(source))
    weights = plan.weights(np.float32)
    x = read_array(*plan.inputs[plan.recipe.embedding], (0, 64))
    expected = plan.recipe.fold(weights, x)
    calls = []
    matmul = TorchMatmul("cpu")

    def counted(a, w):
        calls.append(w.shape)
        return matmul(a, w)

    with ops.gemms_with(counted):
        got = plan.recipe.fold(weights, x)
    assert calls  # the products really went through torch
    assert ops._matmul is ops._numpy_matmul  # and the numpy product is back after the block
    for name, column in expected.items():
        np.testing.assert_allclose(got[name], column, rtol=1e-5, atol=1e-6)

