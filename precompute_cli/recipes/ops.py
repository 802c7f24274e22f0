"""The building blocks recipes fold with, in numpy: norms, activations, FFNs, MoE routing.

numpy, not torch: converting must not pay torch's import (1.6 s here), and numpy's matmul (OpenBLAS, all cores)
runs the float32 GEMM at least as fast. Each block follows the transformers module it stands for (the equivalence
tests compare against those modules), and keeps its input's precision: float32 for the table, float64 for verify.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from precompute_cli.errors import InputError

Array = np.ndarray


def upcast(x: Array) -> Array:
    """x in float32 to fold with, but float64 stays float64 (verify recomputes table rows in float64)."""
    return x.astype(np.promote_types(x.dtype, np.float32), copy=False)


def mean_square(x: Array) -> Array:
    """Mean of x^2 over the last axis (keepdims), as a batched dot product: one pass over x and no temporary,
    as accurate as np.square(x).mean() and several times faster. The norms are memory-bound passes beside the
    GEMM (numpy runs them on one core), so each pass saved shows in the conversion time."""
    return np.matmul(x[..., None, :], x[..., :, None])[..., 0] / x.shape[-1]


def rms_norm(x: Array, weight: Array | None, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm; `offset=1` gives Gemma's (1 + w) convention."""
    y = x * (1.0 / np.sqrt(mean_square(x) + eps))
    if weight is not None:
        y *= weight + offset
    return y


def l2_norm(x: Array, weight: Array | None, eps: float) -> Array:
    """x / sqrt(sum(x^2) + eps): onto the unit sphere, as nGPT's norms (Dory) put every hidden state."""
    y = x * (1.0 / np.sqrt(np.matmul(x[..., None, :], x[..., :, None])[..., 0] + eps))
    if weight is not None:
        y *= weight
    return y


def per_head_rms_norm(x: Array, weight: Array, eps: float, head_dim: int, offset: float = 0.0) -> Array:
    """RMSNorm of each head of a projection's output with one shared [head_dim] weight (Qwen3, Gemma 3 q/k norms)."""
    return rms_norm(heads(x, head_dim), weight, eps, offset).reshape(x.shape)


def per_head_layer_norm(x: Array, weight: Array | None, bias: Array | None, eps: float, head_dim: int) -> Array:
    """LayerNorm of each head of a projection's output; `weight`/`bias` are [head_dim] or per head [H, head_dim]
    (Phi, StableLM, Cohere q/k norms)."""
    return layer_norm(heads(x, head_dim), weight, bias, eps).reshape(x.shape)


def heads(x: Array, head_dim: int) -> Array:
    """(..., H * hd) -> (..., H, hd), a view when x is contiguous."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


def layer_norm(x: Array, weight: Array | None, bias: Array | None, eps: float) -> Array:
    y = x - x.mean(axis=-1, keepdims=True)
    y *= 1.0 / np.sqrt(mean_square(y) + eps)
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y


def _numpy_matmul(x: Array, weight: Array) -> Array:
    return np.matmul(x, weight.T)  # OpenBLAS reads W^T as a transposed view, no copy


_matmul: Callable[[Array, Array], Array] = _numpy_matmul  # x, W -> x W^T; see gemms_with


@contextmanager
def gemms_with(matmul: Callable[[Array, Array], Array]) -> Iterator[None]:
    """Every linear() in the block computes its product with `matmul` (--device cuda: device.TorchMatmul)."""
    global _matmul
    previous, _matmul = _matmul, matmul
    try:
        yield
    finally:
        _matmul = previous


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """x W^T (+ b) as ONE matmul over all rows."""
    y = _matmul(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y += bias
    return y


def sigmoid(x: Array) -> Array:
    with np.errstate(over="ignore"):  # exp(-x) = inf for x << 0 gives 1 / inf = 0, the right limit
        return 1.0 / (1.0 + np.exp(-x))


def silu(x: Array) -> Array:
    return x * sigmoid(x)


def relu(x: Array) -> Array:
    return np.maximum(x, 0)


def gelu_tanh(x: Array) -> Array:
    """gelu_new, gelu_fast, gelu_pytorch_tanh: the same tanh approximation, spelled three ways in transformers."""
    with np.errstate(over="ignore"):  # x^3 = +-inf for huge |x|: tanh gives +-1, the right limit
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, x * Phi(x), in numpy: torch is not needed to convert. Phi comes from erfc, never from
    1 + erf, so large negative x keeps its tiny value instead of cancelling to 0 (torch's float32 kernel returns
    -0.0 below x = -5.5). Computed in float64 and rounded once to the input's dtype: float32 results are the
    correctly rounded GELU (tested against math.erfc), within torch's own error of F.gelu. Blocks that fit the
    cache, since the float64 temporaries of a whole FFN chunk would make this memory-bound."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    buffers = [np.empty(min(_GELU_BLOCK, flat.size)) for _ in range(5)]
    with np.errstate(invalid="ignore"):  # x = -inf: -inf * 0 is nan, as in torch
        for start in range(0, flat.size, _GELU_BLOCK):
            part = flat[start:start + _GELU_BLOCK]
            out[start:start + part.size] = _gelu_f64(part, *(b[:part.size] for b in buffers))
    return out.reshape(np.shape(x))


# erfc(z) = exp(-z^2) g(z) for z >= 0, where g is smooth and bounded: a Chebyshev series in t = (z - K)/(z + K),
# which maps [0, inf) onto [-1, 1) (the form of Numerical Recipes' erfccheb). Its coefficients are computed here
# from math.erfc rather than copied in: 20 terms reach 1e-13 relative error over all z (tests/test_ops.py).
_ERFC_K, _ERFC_TERMS, _GELU_BLOCK = 2.0, 20, 1 << 13


def _erfc_scaled(z: float) -> float:
    """exp(z^2) erfc(z), by its asymptotic series where erfc underflows."""
    if z < 25:
        return math.erfc(z) * math.exp(z * z)
    total, term = 1.0, 1.0
    for n in range(1, 8):
        term *= -(2 * n - 1) / (2 * z * z)
        total += term
    return total / (z * math.sqrt(math.pi))


def _chebyshev_coefficients(n: int) -> list[float]:
    nodes = [math.cos(math.pi * (k + 0.5) / n) for k in range(n)]
    values = [_erfc_scaled(_ERFC_K * (1 + t) / (1 - t)) for t in nodes]
    return [2.0 / n * sum(v * math.cos(math.pi * j * (k + 0.5) / n) for k, v in enumerate(values)) for j in range(n)]


_ERFC_COEFFICIENTS = _chebyshev_coefficients(_ERFC_TERMS)


def _gelu_f64(x: Array, z: Array, t: Array, b1: Array, b2: Array, tmp: Array) -> Array:
    """GELU of one block, computed in the five float64 buffers given (every step in place: no temporaries)."""
    c = _ERFC_COEFFICIENTS
    np.copyto(z, x)
    np.abs(z, out=z)
    z *= math.sqrt(0.5)
    np.minimum(z, 30.0, out=z)  # erfc(30) underflows to 0: Phi is 0 or 1 from there on, and x = inf stays finite here
    np.add(z, _ERFC_K, out=tmp)
    np.subtract(z, _ERFC_K, out=t)
    t /= tmp
    t *= 2.0
    b1.fill(c[-1])
    b2.fill(0.0)
    for cj in c[-2:0:-1]:  # Clenshaw: b_j = 2t b_(j+1) - b_(j+2) + c_j
        np.multiply(t, b1, out=tmp)
        tmp -= b2
        tmp += cj
        b1, b2, tmp = tmp, b1, b2
    t *= 0.5
    t *= b1
    t -= b2
    t += 0.5 * c[0]  # g(z)
    np.multiply(z, z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    z *= t  # erfc(|x| / sqrt 2) = 2 Phi(-|x|)
    np.copyto(t, x)
    np.subtract(2.0, z, out=b1)  # 2 Phi(|x|)
    np.copyto(b1, z, where=t < 0)
    b1 *= t
    b1 *= 0.5
    return b1


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": silu,
    "swish": silu,
    "gelu": gelu,
    "relu": relu,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python": gelu,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise InputError(f"the config's activation {name!r} is not one precompute knows "
                         f"({', '.join(ACTIVATIONS)})") from None


def glu(x: Array, gate: Array, up: Array, down: Array, act: str) -> Array:
    """down(act(gate x) * up x), the Llama-style gated FFN."""
    y = activation(act)(linear(x, gate))
    y *= linear(x, up)
    return linear(y, down)


def mlp(x: Array, up: Array, up_bias: Array | None, down: Array, down_bias: Array | None, act: str) -> Array:
    """down(act(up x + b_up)) + b_down, the plain two-matrix FFN (GPT-NeoX, GPT-J, Phi)."""
    return linear(activation(act)(linear(x, up, up_bias)), down, down_bias)


def top_k_route(router_logits: Array, k: int, renormalize: bool, scoring: str = "softmax") -> tuple[Array, Array]:
    """The top k experts of each row and their weights. "softmax": softmax over all experts, the top k kept and
    optionally renormalised (Mixtral always, Qwen MoE if asked; Cohere 2 MoE's softmax over the top k logits is the
    renormalised form). "sigmoid": sigmoid of the top k logits, optionally renormalised (Cohere 2 MoE)."""
    experts = np.argsort(-router_logits, axis=-1, kind="stable")[..., :k]  # sorted, as torch.topk; ties: lower index
    if scoring == "sigmoid":
        weights = sigmoid(np.take_along_axis(router_logits, experts, axis=-1))
    else:
        probs = np.exp(router_logits - router_logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        weights = np.take_along_axis(probs, experts, axis=-1)
    if renormalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    return weights, experts


class Rows(Protocol):
    """A [out, in] matrix read a block of rows at a time: a numpy array, or a tensor converted from its stored
    dtype as each block is read (plan.Streamed), so that a big FFN is never held whole in float."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: slice) -> Array: ...


TILE_BYTES = 64 << 20  # float32 bytes of one block of weight rows in glu_tiled


def glu_tiled(x: Array, gate: Rows, up: Rows, down: Rows, act: str, tile_bytes: int = TILE_BYTES) -> Array:
    """glu() with the weights taken a block of rows at a time: the hidden activations of the rows x are built
    block by block of gate/up rows, then the output block by block of down rows. Memory: one block of each matrix
    (tile_bytes), plus x's hidden activations."""
    inner, d = gate.shape
    hidden = np.empty((*x.shape[:-1], inner), dtype=x.dtype)
    step = max(1, tile_bytes // (4 * d))
    for i in range(0, inner, step):
        y = activation(act)(linear(x, gate[i:i + step]))
        y *= linear(x, up[i:i + step])
        hidden[..., i:i + step] = y
    out = np.empty((*x.shape[:-1], down.shape[0]), dtype=x.dtype)
    step = max(1, tile_bytes // (4 * inner))
    for j in range(0, down.shape[0], step):
        out[..., j:j + step] = linear(hidden, down[j:j + step])
    return out


Expert = Callable[[int], tuple[Rows, Rows, Rows]]  # e -> (gate, up, down) weights


def moe(x: Array, router: Array, expert: Expert, num_experts: int, k: int, renormalize: bool, act: str,
        shared: tuple[Rows, Rows, Rows] | None = None, shared_gate: Array | None = None, scoring: str = "softmax",
        average_shared: bool = False) -> Array:
    """A routed GLU FFN over rows `x` (..., d): the top k experts of router x (top_k_route), each chosen expert's
    GLU weighted by its score, plus an optional shared expert, scaled by sigmoid(shared_gate x) (Qwen MoE), added
    or averaged with the routed sum (Cohere 2 MoE's "sum" or "average").

    Parallel MoE blocks fold this whole output into the residual columns. Each expert runs only on the rows
    routed to it, as in transformers' experts modules, so the cost is k/E of a dense evaluation, and its weights
    are taken a block at a time (glu_tiled): an expert given as plan.Streamed is converted from its stored dtype
    as it is used and never held whole in float. A row picks an expert at most once, so `out[rows] +=` never adds
    twice to one row."""
    flat = x.reshape(-1, x.shape[-1])
    weights, chosen = top_k_route(linear(flat, router), k, renormalize, scoring)
    out = np.zeros_like(flat)
    for e in range(num_experts):
        rows, slot = np.nonzero(chosen == e)
        if rows.size:
            gate, up, down = expert(e)
            out[rows] += glu_tiled(flat[rows], gate, up, down, act) * weights[rows, slot, None]
    if shared is not None:
        y = glu_tiled(flat, *shared, act)
        y = y if shared_gate is None else sigmoid(linear(flat, shared_gate)) * y
        out += y
        if average_shared:
            out *= 0.5
    return out.reshape(x.shape)


def split_qkv(fused: Array, groups: int, q_dim: int, kv_dim: int) -> tuple[Array, Array, Array]:
    """Split a fused QKV output laid out as `groups` blocks of [q part, k part, v part].

    groups=1 is blocked [q; k; v] (MPT, Phi-3, Falcon multi-query), groups=H is per-head interleaved
    [q_h, k_h, v_h] (BLOOM, GPT-NeoX, Falcon MHA), groups=KV is Falcon's new-architecture [q x r, k, v].
    The runtime joins the table's columns back with the inverse (runtime.TableFusedQKV), given the same groups."""
    lead = fused.shape[:-1]
    per_group = fused.reshape(*lead, groups, -1)
    q, kv = q_dim // groups, kv_dim // groups
    parts = per_group[..., :q], per_group[..., q:q + kv], per_group[..., q + kv:]
    return tuple(part.reshape(*lead, -1) for part in parts)
