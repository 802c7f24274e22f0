"""`precompute verify` and `convert --verify`: passing conversions pass, a tampered table or a wrong fold fails,
and the converted model samples and counts parameters like the original and the report say."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from tiny import build, convert
from transformers import AutoModelForCausalLM

from precompute_cli import load_model
from precompute_cli.cli import main
from precompute_cli.recipes.llama import Llama
from precompute_cli.st_io import read_header
from precompute_cli.verify import (
    FLOAT32_LOGIT_TOL,
    LOSSY_MEAN_RATIO,
    Run,
    _compare,
    _near_tie,
    criterion_dtype,
    make_probe,
    table_tolerance,
)

PROMPT = "the first layer of a transformer"


def verify(*args: str) -> int:
    try:
        main(["verify", *map(str, args)])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def save_tokenizer(path) -> None:
    """A word-level tokenizer over the tiny model's 211 ids, so verify's --prompt path runs offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", *PROMPT.split()[1:], *(f"w{i}" for i in range(190))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A float32 llama with a tokenizer, converted; and the conversion's JSON report."""
    root = tmp_path_factory.mktemp("llama32")
    src = build(root / "src", "llama")
    save_tokenizer(src)
    assert convert(src, root / "out", "--json", str(root / "report.json")) == 0
    return src, root / "out", json.loads((root / "report.json").read_text())


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_bf16")
    src = build(root / "src", "llama", dtype=torch.bfloat16, seed=1)
    assert convert(src, root / "out") == 0
    return src, root / "out"


def test_verify_float32_passes(llama32, tmp_path):
    src, out, _ = llama32
    assert verify(src, out, "--prompt", PROMPT, "--tokens", "8", "--json", tmp_path / "v.json") == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and v["failure"] is None and v["criterion"] == "float32"
    assert all(c["passed"] for c in v["checks"]) and len(v["checks"]) == 4
    assert v["max_rel_diff"] <= FLOAT32_LOGIT_TOL and v["top1_agreement"] == 1.0
    assert v["table_row_error"] <= v["table_row_tolerance"] == table_tolerance("F32")
    assert v["positions"] == 2 * 16 + 2 * 16 - 4  # two probe batches, four padded positions left out
    # the greedy tokens verify reports are transformers' own, from the tokenized prompt
    assert v["prompt"] == PROMPT and v["greedy_identical"] and len(v["greedy_converted"]) == 8
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])  # [UNK] (no "the" in the vocabulary), then the prompt's words
    expect = original.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert v["greedy_original"] == expect


@pytest.mark.parametrize("run", ["bfloat16", "float32"])
def test_verify_bfloat16_checkpoint_passes(llama_bf16, tmp_path, run):
    """A bf16 table is judged by bf16's own error, whether the model runs in bfloat16 or float32."""
    src, out = llama_bf16
    assert verify(src, out, "--dtype", run, "--tokens", "4", "--json", tmp_path / "v.json") == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["passed"] and v["criterion"] == "bfloat16" and v["table_dtype"] == "BF16" and v["dtype"] == run
    assert 0 < v["own_trimmed_mean_abs_diff"] and v["trimmed_mean_abs_diff"] <= LOSSY_MEAN_RATIO * v[
        "own_trimmed_mean_abs_diff"]
    assert v["table_row_error"] <= table_tolerance("BF16") and v["table_row_error"] > table_tolerance("F32")
    assert [c["passed"] for c in v["checks"] if c["name"] == "greedy generation"] == [None]


def test_tampered_table_row_fails(llama32, tmp_path, capsys):
    src, out, _ = llama32
    tampered = shutil.copytree(out, tmp_path / "tampered")
    shard = tampered / "model.safetensors"
    info = read_header(shard).tensors["precompute.table"]
    row = info.shape[0] // 2
    row_bytes = info.nbytes // info.shape[0]
    with open(shard, "r+b") as f:
        good = torch.frombuffer(bytearray(os.pread(f.fileno(), row_bytes, info.start + row * row_bytes)),
                                dtype=torch.float32)
        os.pwrite(f.fileno(), (good * 3).numpy().tobytes(), info.start + row * row_bytes)
    with safe_open(shard, framework="pt") as f:  # still a valid file: only the values changed
        assert torch.equal(f.get_tensor("precompute.table")[row], good * 3)
    capsys.readouterr()
    assert verify(src, tampered, "--json", tmp_path / "v.json") == 1
    message = " ".join(capsys.readouterr().err.split())
    assert "does not verify against" in message and "table rows (worst row error 2 " in message
    v = json.loads((tmp_path / "v.json").read_text())
    assert not v["passed"] and v["table_worst_row"] == row and v["table_row_error"] == pytest.approx(2, rel=1e-4)


def test_convert_verify_passes_and_joins_the_report(tmp_path):
    src = build(tmp_path / "src", "llama", tie_word_embeddings=True)
    assert convert(src, tmp_path / "out", "--verify", "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params_after"] > 0 and report["verify"]["passed"] and report["verify"]["greedy_identical"]


def test_convert_verify_catches_a_wrong_fold(tmp_path, monkeypatch, capsys):
    """A recipe bug: the runs catch it, and so does the row check, whose reference is transformers' own layer 0
    (it shares nothing with the recipe's fold)."""
    fold = Llama.fold

    def wrong(self, w, x):
        out = fold(self, w, x)
        return {**out, "k": out["k"] * 1.05}

    monkeypatch.setattr(Llama, "fold", wrong)
    src = build(tmp_path / "src", "llama")
    capsys.readouterr()
    assert convert(src, tmp_path / "out", "--verify", "--json", str(tmp_path / "r.json")) == 1
    message = " ".join(capsys.readouterr().err.split())
    assert "logits (max rel diff" in message and "table rows (worst row error 0.05 " in message
    v = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert not v["passed"] and v["table_row_error"] == pytest.approx(0.05, rel=1e-3) and v["max_rel_diff"] > 1e-3


def test_sampled_generation_matches_the_original(llama32):
    src, out, _ = llama32
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    converted = load_model(out, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 200, 105]])
    runs = []
    for model in (original, converted, original):
        torch.manual_seed(1234)
        kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0) if len(runs) < 2 else dict(do_sample=False)
        runs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, pad_token_id=0,
                                   **kwargs)[0].tolist())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # it really sampled: not the greedy continuation


@pytest.mark.parametrize("tied", [False, True])
def test_loaded_parameters_equal_the_report(tmp_path, tied):
    src = build(tmp_path / "src", "qwen2", tie_word_embeddings=tied)
    assert convert(src, tmp_path / "out", "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    model = load_model(tmp_path / "out")
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_criterion_is_the_lowest_precision_in_play():
    assert criterion_dtype("float32", "F32") == "float32"
    assert criterion_dtype("float32", "F64") == "float32"
    assert criterion_dtype("float32", "BF16") == "bfloat16"
    assert criterion_dtype("float16", "F32") == "float16"
    assert criterion_dtype("float16", "BF16") == "bfloat16"  # bf16 has the larger rounding unit
    assert table_tolerance("BF16") > table_tolerance("F16") > table_tolerance("F32") > 0


def test_probe_covers_the_vocabulary_and_pads_on_the_left():
    probe = make_probe(211, seed=0)
    assert {0, 1, 2, 104, 105, 106, 208, 209, 210} <= set(probe.ids.flatten().tolist())
    assert probe.mask[:-1].all() and probe.mask[-1].tolist() == [0] * 4 + [1] * 12
    assert (probe.padded[probe.mask == 0] == probe.pad_id).all() and probe.prompt_ids.shape == (1, 6)


class _LastLogits(torch.nn.Module):
    """A stand-in model whose last position always has the given logits."""

    def __init__(self, last: torch.Tensor):
        super().__init__()
        self.last = last

    def forward(self, ids):
        logits = torch.zeros(1, ids.shape[1], len(self.last))
        logits[0, -1] = self.last
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(("runner_up", "excused"), [(10.0 - 1e-5, True), (9.0, False)])
def test_greedy_divergence_is_excused_only_at_a_near_tie(runner_up, excused):
    last = torch.zeros(211)
    last[5], last[6] = 10.0, runner_up
    model, probe = _LastLogits(last), make_probe(211, seed=0)
    assert _near_tie(model, probe, [3, 4, 5], [3, 4, 5]) is None  # nothing to excuse
    assert _near_tie(model, probe, [3, 4, 5], [3, 4, 6]) == (2 if excused else None)


def test_verify_refuses_bad_arguments(llama32, llama_bf16, capsys):
    src, out, _ = llama32
    assert verify(out, src) == 2
    assert "pass the original first" in capsys.readouterr().err
    assert verify(src, src) == 2
    assert "not a precomputed checkpoint" in capsys.readouterr().err
    assert verify(llama_bf16[0], llama_bf16[1], "--prompt", "hello") == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert verify(src, out, "--dtype", "float64") == 2
    assert "--dtype" in capsys.readouterr().err


def _runs_with_a_jump(routed_apart: bool) -> tuple[Run, Run, Run]:
    """Two rows of 20 positions: the own run is noise, the converted run the same noise with a jump at position 5
    and a carried-over one at 6-9 (a routing flip and what attention makes of it); its routing differs from the
    own run's at 5 or nowhere."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 32, generator=g)
    noise = 0.01 * torch.randn(40, 32, generator=g)
    own_logits, conv_logits = ref + noise, ref + noise.roll(1, 0)
    conv_logits[5] += 1.0
    conv_logits[6:10] += 0.2
    sequence = torch.arange(2).repeat_interleave(20)
    routing = torch.zeros(40, 2, dtype=torch.long)
    conv_routing = routing.clone()
    if routed_apart:
        conv_routing[5] = torch.tensor([0, 1])
    return (Run(ref, [], routing, sequence), Run(conv_logits, [], conv_routing, sequence),
            Run(own_logits, [], routing, sequence))


@pytest.mark.parametrize("routed_apart", [True, False])
def test_lossy_criteria_leave_out_a_routing_flip_and_its_row_after_it(routed_apart):
    ref, conv, own = _runs_with_a_jump(routed_apart)
    numbers, checks = _compare(ref, conv, own, "bfloat16")
    by_name = {c.name: c for c in checks}
    assert numbers["routing_differs"] == (15 if routed_apart else 0)  # position 5 to the row's end
    # five jumping positions are more than the 10% set aside: only the routing explains them away
    assert by_name["logits, max error"].passed is routed_apart
    assert all(c.passed for c in checks) is routed_apart


def test_routing_apart_at_most_positions_is_judged_everywhere():
    ref, conv, own = _runs_with_a_jump(True)
    conv.routing[:] = 1  # every position routed unlike the own run: no rounding accident
    numbers, checks = _compare(ref, conv, own, "bfloat16")
    assert numbers["routing_differs"] == 0
    assert not all(c.passed for c in checks)
