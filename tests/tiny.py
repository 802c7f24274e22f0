"""Tiny random checkpoints built with transformers (fixed seeds, never downloaded) and the equivalence check
that every supported architecture must pass: converted logits and greedy text equal the original's."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from precompute_cli import load_model
from precompute_cli.cli import main
from precompute_cli.st_io import read_header

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def build(path: Path, model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `model_type` model whose every weight (norms and biases too) is perturbed."""
    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(path)
    return path


def convert(src: Path, out: Path, *args: str) -> int:
    try:
        main(["convert", str(src), str(out), *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read by the safetensors library itself."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def probe_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    """Ids covering the vocabulary's start, end and middle."""
    g = torch.Generator().manual_seed(seed)
    edges = torch.tensor([0, 1, vocab // 2, vocab - 2, vocab - 1])
    return torch.cat([edges, torch.randint(0, vocab, (11,), generator=g)]).reshape(2, 8)


def _logits(model, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits.float()


def assert_equivalent(src: Path, out: Path, dtype: torch.dtype = torch.float32, tol: float = 1e-4,
                      auto_class=AutoModelForCausalLM, ids: torch.Tensor | None = None) -> None:
    """Converted vs original (transformers' own model): logits, a left-padded batch, greedy text, and
    the converted model holds exactly the converted checkpoint's parameters (no eliminated weight in memory).
    `auto_class` loads the original (a multimodal one: AutoModelForImageTextToText); `ids` replace the probe ids.

    float32: logits agree to `tol` relative and greedy generations are identical. Lower precision: the converted
    model is no further from the original's float32 run than the original itself is in that dtype."""
    reference = auto_class.from_pretrained(src, dtype=torch.float32).eval()
    original = auto_class.from_pretrained(src, dtype=dtype).eval()
    converted = load_model(out, dtype=dtype)
    ids = probe_ids(original.config.get_text_config().vocab_size) if ids is None else ids
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row; padded positions are not compared
    for m in (None, mask):
        ref, a, b = (_logits(model, ids, m)[1 if m is not None else slice(None)][..., 3:, :] if m is not None
                     else _logits(model, ids, m) for model in (reference, original, converted))
        scale = max(ref.abs().max().item(), 1.0)
        if dtype == torch.float32:
            assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()
            assert torch.equal(a.argmax(-1), b.argmax(-1))
        else:
            own, ours = (a - ref).abs().mean().item(), (b - ref).abs().mean().item()
            assert ours <= 1.25 * own + 1e-6, (ours, own)
            # greedy choices must agree where the float32 reference is decisive; a near tie (top-2 gap within
            # twice the original's own error in this dtype) may flip either way in a correct conversion
            top2 = ref.topk(2, dim=-1).values
            decisive = (top2[..., 0] - top2[..., 1]) > 2 * (a - ref).abs().max()
            if decisive.any():
                assert (a.argmax(-1) == b.argmax(-1))[decisive].float().mean().item() >= 0.9
    if dtype == torch.float32:
        with torch.no_grad():
            g1 = original.generate(ids[:1, :4], max_new_tokens=12, do_sample=False)
            g2 = converted.generate(ids[:1, :4], max_new_tokens=12, do_sample=False)
        assert g1.tolist() == g2.tolist()
    on_disk = sum(math.prod(t.shape) for t in read_header(out / "model.safetensors").tensors.values()) \
        if (out / "model.safetensors").exists() else None
    if on_disk is not None:
        assert sum(p.numel() for p in converted.parameters()) == on_disk
