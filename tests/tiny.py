"""Tiny random checkpoints built with transformers (fixed seeds, never downloaded) and the equivalence check
that every supported architecture must pass: converted logits and greedy text equal the original's."""

from __future__ import annotations

import json
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
    cls = lm_class(model_type)
    model = cls.from_config(config) if cls is AutoModelForCausalLM else cls(config)
    return save_perturbed(model, path, dtype)


def save_perturbed(model, path: Path, dtype: torch.dtype | None = None) -> Path:
    """Perturb every weight of `model` (norms and biases too: a fold that misreads one then shows) and save it as
    transformers saves it, in `dtype` if given."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    (model if dtype is None else model.to(dtype)).save_pretrained(path)
    return path


def lm_class(model_type: str, architectures: list[str] | None = None) -> type:
    """AutoModelForCausalLM, or the causal-LM class of a type it does not map: mistral4 in transformers 5.24, or a
    checkpoint whose model_type transformers does not know but whose architecture it has (Kimi-K2's kimi_k2)."""
    import transformers

    try:
        config_class = type(AutoConfig.for_model(model_type))
    except ValueError:  # a model type transformers does not know
        config_class = None
    if config_class is not None and config_class in AutoModelForCausalLM._model_mapping:  # registered ones too
        return AutoModelForCausalLM
    if architectures:
        return getattr(transformers, architectures[0])
    name = config_class.__name__  # a text decoder's own config (MllamaTextConfig): its model's causal LM
    return getattr(transformers, name.replace("Config", "ForCausalLM"), None) or getattr(
        transformers, name.replace("TextConfig", "ForCausalLM"))


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
                      auto_class=None, ids: torch.Tensor | None = None) -> None:
    """Converted vs original (transformers' own model): logits, a left-padded batch, greedy text, and
    the converted model holds exactly the converted checkpoint's parameters (no eliminated weight in memory).
    `auto_class` loads the original (a multimodal one: AutoModelForImageTextToText); `ids` replace the probe ids.

    float32: logits agree to `tol` relative and greedy generations are identical. Lower precision, verify's standard
    or stricter: against the original's float32 run, the converted model's mean and largest logit errors are at most
    1.25x and 2x the original's own in that dtype (plus `tol` of the largest logit; each model's worst 5% of
    positions set aside, where verify sets aside 10%, as low precision flips MoE routing by chance), and no position
    where the float32 original is decisive (its choice ahead of the converted model's by more than twice the
    allowed error) picks another token."""
    config = json.loads((Path(src) / "config.json").read_text())
    auto = auto_class or lm_class(config["model_type"], config.get("architectures"))
    reference = auto.from_pretrained(src, dtype=torch.float32).eval()
    original = auto.from_pretrained(src, dtype=dtype).eval()
    converted = load_model(out, dtype=dtype)
    ids = probe_ids(original.config.get_text_config().vocab_size) if ids is None else ids
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row; padded positions are not compared
    for m in (None, mask):
        ref, a, b = (_logits(model, ids, m)[1 if m is not None else slice(None)][..., 3:, :] if m is not None
                     else _logits(model, ids, m) for model in (reference, original, converted))
        ref, a, b = (t.reshape(-1, t.shape[-1]) for t in (ref, a, b))
        scale = max(ref.abs().max().item(), 1.0)
        if dtype == torch.float32:
            assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            continue
        keep = len(ref) - max(1, math.ceil(0.05 * len(ref)))
        own_err, our_err = (a - ref).abs(), (b - ref).abs()
        own = own_err.mean(-1).sort().values[:keep].mean().item(), own_err.amax(-1).sort().values[keep - 1].item()
        ours = our_err.mean(-1).sort().values[:keep].mean().item(), our_err.amax(-1).sort().values[keep - 1].item()
        assert ours[0] <= 1.25 * own[0] + tol * scale, ("mean error", ours[0], own[0])
        assert ours[1] <= 2 * own[1] + tol * scale, ("max error", ours[1], own[1])
        top_ref, top_ours = ref.argmax(-1), b.argmax(-1)
        behind = ref.gather(-1, top_ref[:, None])[:, 0] - ref.gather(-1, top_ours[:, None])[:, 0]
        flips = (top_ref != top_ours) & (behind > 2 * (2 * own[1] + tol * scale))
        assert not flips.any(), ("decisive positions flipped", flips.nonzero().flatten().tolist())
    if dtype == torch.float32:
        with torch.no_grad():
            g1 = original.generate(ids[:1, :4], max_new_tokens=12, do_sample=False)
            g2 = converted.generate(ids[:1, :4], max_new_tokens=12, do_sample=False)
        assert g1.tolist() == g2.tolist()
    shards = sorted(Path(out).glob("*.safetensors"))
    assert shards, f"{out}: no safetensors file"
    on_disk = sum(math.prod(t.shape) for shard in shards for t in read_header(shard).tensors.values())
    if "quantization_config" in config:
        # transformers dequantizes a quantized checkpoint as it loads it (on a CPU), so elements on disk are not
        # parameters in memory: the converted model must hold the original's, less what was removed, plus the table
        block = json.loads((Path(out) / "config.json").read_text())["precompute"]
        header = read_header(Path(src) / "model.safetensors").tensors
        removed = sum(header[n].numel for n in block["removed"] if not n.endswith("_scale_inv"))
        table = math.prod(read_header(Path(out) / "model.safetensors").tensors[block["table"]].shape)
        assert _held(converted) == _held(original) - removed + table
    else:
        assert _held(converted) == on_disk


def _held(model) -> int:
    """Parameters and persistent buffers (deepseek's e_score_correction_bias is on disk too)."""
    saved = model.state_dict().keys()
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers() if n in saved)


def inspect_json(capsys, path) -> dict:
    """`precompute inspect --json PATH`, run in-process: the JSON it prints."""
    code, out, err = run_cli(capsys, "inspect", "--json", path)
    assert code == 0, err
    return json.loads(out)


def assert_case(tmp_path: Path, capsys, overrides: dict, expected: tuple[str, str, int, int]) -> None:
    """One row of an equivalence table: inspect reports (block, attention, q_dim, kv_dim) as `expected`, and the
    converted model equals transformers' own (assert_equivalent, float32)."""
    src = build(tmp_path / "src", **overrides)
    info = inspect_json(capsys, src)
    assert (info["block"], info["attention"], info["q_dim"], info["kv_dim"]) == expected
    assert info["precomputable"] and info["model_type"] == overrides["model_type"]
    assert convert(src, tmp_path / "out") == 0
    assert_equivalent(src, tmp_path / "out")
