"""The numpy building blocks against the transformers/torch modules they stand for, in float32 and float64
(verify recomputes rows in float64, so no block may round through float32)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from precompute_cli import st_io
from precompute_cli.recipes import ops

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name", sorted(ops.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_match_transformers(name, dtype):
    x = np.concatenate([RNG.standard_normal(997) * 4, [-1e30, -90.0, 0.0, 90.0, 1e30]]).astype(dtype)
    with torch.no_grad():
        theirs = ACT2FN[name](torch.from_numpy(x)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning escapes for huge inputs either
        ours = ops.activation(name)(x)
    assert ours.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert np.allclose(ours, theirs, rtol=tol, atol=tol), np.abs(ours - theirs).max()


def _exact_gelu(x: np.ndarray) -> np.ndarray:
    """x Phi(x) from math.erfc in float64, element by element: the reference numpy's GELU must round to."""
    import math

    return np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64).tolist()])


GELU_GRID = np.concatenate([np.linspace(-14, 14, 200_001), RNG.standard_normal(50_000) * 3,
                            -np.geomspace(1e-30, 1e3, 2_000), np.geomspace(1e-30, 1e3, 2_000)])


def test_exact_gelu_in_float32_is_the_correctly_rounded_value():
    """Every float32 result is the exact GELU rounded once: at most one float32 rounding away (<= 1 ulp), and
    equal to it almost everywhere (the float64 series is 1e-13 from the truth), also in the far negative tail."""
    x = GELU_GRID.astype(np.float32)
    ours = ops.gelu(x).astype(np.float64)
    exact = _exact_gelu(x)
    rounded = exact.astype(np.float32).astype(np.float64)
    ulp = np.spacing(np.abs(rounded).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(ours - rounded) <= ulp)
    assert np.mean(ours == rounded) > 0.9999
    tail = x < -6  # where 1 + erf would cancel: the tiny negative values are kept
    assert np.all(ours[tail] <= 0) and np.all(np.abs(ours[tail] - rounded[tail]) <= ulp[tail])


def test_exact_gelu_in_float64_matches_math_erfc():
    x = GELU_GRID
    assert np.allclose(ops.gelu(x), _exact_gelu(x), rtol=1e-12, atol=1e-300)


def test_exact_gelu_is_no_further_from_torch_than_torch_is_from_the_exact_value():
    """torch's float32 F.gelu is itself a few ulp off (and returns -0.0 below about -5.5): ours differs from it by
    no more than torch's own error plus one float32 rounding."""
    x = GELU_GRID.astype(np.float32)
    with torch.no_grad():
        theirs = F.gelu(torch.from_numpy(x)).numpy().astype(np.float64)
    ours = ops.gelu(x).astype(np.float64)
    exact = _exact_gelu(x)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(ours - theirs) <= np.abs(theirs - exact) + ulp)
    assert np.abs(ours - theirs).max() < 2e-6


def test_exact_gelu_keeps_shape_and_limits():
    x = np.array([[np.inf, -np.inf, np.nan], [0.0, -0.0, 1e30]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.gelu(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y[0, 0] == np.inf and np.isnan(y[0, 1]) and np.isnan(y[0, 2])
    assert y[1, 0] == 0 and y[1, 2] == np.float32(1e30)
    assert ops.gelu(np.zeros((0, 3), np.float32)).shape == (0, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norms_match_torch(dtype):
    x = (RNG.standard_normal((5, 3, 48)) * 3 + 1).astype(dtype)
    w, b = (RNG.standard_normal(48).astype(dtype) for _ in range(2))
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    with torch.no_grad():  # LlamaRMSNorm's formula (the module itself would compute float64 in float32)
        expected = {"rms": tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-6) * tw,
                    "ln": F.layer_norm(tx, (48,), tw, tb, 1e-5), "ln-bare": F.layer_norm(tx, (48,), None, None, 1e-5)}
    ours = {"rms": ops.rms_norm(x, w, 1e-6), "ln": ops.layer_norm(x, w, b, 1e-5),
            "ln-bare": ops.layer_norm(x, None, None, 1e-5)}
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for key, value in ours.items():
        assert value.dtype == dtype and value.shape == x.shape, key
        assert np.allclose(value, expected[key].numpy(), rtol=tol, atol=tol), key


def test_linear_keeps_leading_axes_and_float64():
    x, w, b = RNG.standard_normal((2, 3, 8)), RNG.standard_normal((5, 8)), RNG.standard_normal(5)
    y = ops.linear(x, w, b)
    assert y.dtype == np.float64 and y.shape == (2, 3, 5)
    assert np.allclose(y, np.einsum("abi,oi->abo", x, w) + b, rtol=1e-13)


@pytest.mark.parametrize("shape", [(1_000,), (300, 70)])
def test_rounding_to_bf16_and_back_matches_torch_bit_for_bit(shape):
    """st_io.from_float/to_float, which store the table: every magnitude, ties, infinities, NaNs and subnormals."""
    rng = np.random.default_rng(0)
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):  # magnitudes past float32's range become infinities, on purpose
        x = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 39, n).astype(np.float64)).astype(np.float32)
    x[:12] = [np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 0.0, -0.0, 1e-40, -1e-45, 1.00390625, 1.01171875]
    x = x.reshape(shape)
    ours = st_io.from_float(x, "BF16")
    ref = torch.from_numpy(x).to(torch.bfloat16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], ref.view(torch.int16).numpy().view(np.uint16)[~nan])
    assert np.isnan(st_io.to_float(ours, "BF16")[nan]).all()
    assert np.array_equal(st_io.to_float(ours, "BF16"), ref.float().numpy(), equal_nan=True)
    into = np.zeros((*shape[:-1], shape[-1] + 4), dtype=np.uint16)
    st_io.from_float(x, "BF16", out=into[..., 2:-2])
    assert np.array_equal(into[..., 2:-2], ours) and not into[..., :2].any() and not into[..., -2:].any()


def test_rounding_to_float16_with_torch_loaded_gives_numpys_bits():
    """from_float(F16) hands the cast to torch when torch is loaded: the same bits as numpy's, into a view too."""
    assert "torch" in sys.modules  # imported by this module
    rng = np.random.default_rng(1)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(4_000) * 10.0 ** rng.integers(-9, 7, 4_000)).astype(np.float32).reshape(100, 40)
    x[0, :8] = [np.inf, -np.inf, 65504.0, 65520.0, -65519.0, 6e-8, -3e-8, 1e-10]  # max, ties to inf, subnormals
    into = np.zeros((100, 44), dtype=np.float16)
    ours = st_io.from_float(x, "F16", out=into[:, 2:-2])
    with np.errstate(over="ignore"):  # past float16's range: infinities, on purpose
        expected = x.astype(np.float16)
    assert np.array_equal(ours.view(np.uint16), expected.view(np.uint16))
    assert not into[:, :2].any() and not into[:, -2:].any()
    assert st_io.from_float(np.float32(3.5), "F16") == np.float16(3.5)  # a scalar goes numpy's way
