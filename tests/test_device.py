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



def test_convert_on_a_device_sends_every_gemm_there(tmp_path, monkeypatch):
    """`convert --device cuda` wiring, with "cuda" played by torch's CPU device (no GPU here): every product of
    the fold goes through TorchMatmul, and the table comes out as the numpy conversion's."""
    from safetensors.numpy import load_file
    from tiny import convert

    import precompute_cli.device
    import precompute_cli.execute

    products = []

    class OnCpu(TorchMatmul):
        def __init__(self, device):
            super().__init__("cpu")

        def __call__(self, x, weight):
            products.append(weight.shape)
            return super().__call__(x, weight)

    src = build(tmp_path / "src", "llama")
    assert convert(src, tmp_path / "numpy") == 0
    monkeypatch.setattr(precompute_cli.execute, "_check_device", lambda name: None)
    monkeypatch.setattr(precompute_cli.device, "TorchMatmul", OnCpu)
    assert convert(src, tmp_path / "device", "--device", "cuda") == 0
    assert len(products) >= 3  # q, k, v of at least one chunk
    got = load_file(tmp_path / "device" / "model.safetensors")["precompute.table"]
    expected = load_file(tmp_path / "numpy" / "model.safetensors")["precompute.table"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
