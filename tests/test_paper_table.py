"""Section 3 of the paper as an acceptance test: `precompute inspect configs/<model>.json` reproduces its numbers.

The paper used a Pythia vocabulary of 50,400; the Hub config says 50,432. The paper's figures are checked with
--vocab-size 50400; the Hub figures are checked against the same formulas by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import build

from precompute_cli.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# model, extra inspect args -> the paper's row values
PAPER = {
    "pythia": (["pythia-6.9b.json", "--vocab-size", "50400"], dict(
        eliminated=184_549_376, reads_without=184_553_472, reads_with=16_384,
        factors={"1": 11_264, "16": 704, "256": 44, "1024": 11},
        memory_increase=434_765_824, memory_pct=6)),
    "mistral": (["mistral-7b.json"], dict(
        eliminated=25_165_824, reads_without=25_169_920, reads_with=10_240,
        factors={"1": 2_458, "16": 154, "256": 10, "1024": 3},
        memory_increase=171_442_176, memory_pct=2)),
    "mixtral-parallel": (["mixtral-8x7b.json", "--assume-parallel"], dict(
        eliminated=1_434_451_968, reads_without=1_434_456_064, reads_with=10_240,
        factors={"1": 140_084, "16": 8_756, "256": 548, "1024": 137},
        memory_increase=-1_237_843_968, memory_pct=-3)),
}


def inspect_json(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--json", *args])
    assert exit_info.value.code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model", sorted(PAPER))
def test_inspect_reproduces_paper(capsys, model):
    args, paper = PAPER[model]
    data = inspect_json(capsys, str(CONFIGS / args[0]), *args[1:])
    assert data["precomputable"] is True and data["reason"] is None
    assert data["eliminated_linear_params"] == paper["eliminated"]
    assert data["reads_without_precompute"]["1"] == paper["reads_without"]
    assert data["reads_with_precompute"]["1"] == paper["reads_with"] == data["reads_per_token"]
    assert {b: round(f) for b, f in data["reduction_factor"].items()} == paper["factors"]
    assert data["memory_increase_paper"] == paper["memory_increase"]
    assert round(data["memory_increase_paper_pct"]) == paper["memory_pct"]


def test_detected_architectures(capsys):
    pythia = inspect_json(capsys, str(CONFIGS / "pythia-6.9b.json"))
    mistral = inspect_json(capsys, str(CONFIGS / "mistral-7b.json"))
    mixtral = inspect_json(capsys, str(CONFIGS / "mixtral-8x7b.json"))
    assert (pythia["block"], pythia["attention"], pythia["ffn"], pythia["kv_dim"]) == ("parallel", "MHA", "dense", 4096)
    assert (mistral["block"], mistral["attention"], mistral["kv_dim"]) == ("serial", "GQA", 1024)
    assert (mixtral["block"], mixtral["ffn"], mixtral["num_experts"]) == ("serial", "moe", 8)
    # Serial Mixtral folds only Q, K, V: the same eliminated weights and reads as Mistral.
    assert mixtral["eliminated_linear_params"] == mistral["eliminated_linear_params"] == 25_165_824
    assert mixtral["reads_per_token"] == 10_240


def test_pythia_hub_vocabulary(capsys):
    """With the Hub's 50,432 rows the table grows by (2e + d) * 32 values; the eliminated weights do not change."""
    hub = inspect_json(capsys, str(CONFIGS / "pythia-6.9b.json"))
    assert hub["vocab_size"] == 50_432
    assert hub["eliminated_linear_params"] == 184_549_376
    assert hub["memory_increase_paper"] == (2 * 4096 + 4096) * 50_432 - 184_549_376 == 435_159_040
    # exact count: besides the paper's matrices we remove both LayerNorms (weight + bias), the QKV and FFN biases
    # and the untied input embedding, whose values the table's residual columns now hold
    norms, biases, embedding = 4 * 4096, 3 * 4096 + 16_384 + 4096, 50_432 * 4096
    assert hub["eliminated_params"] == 184_549_376 + norms + biases + embedding
    assert hub["param_delta"] == hub["table_params"] - hub["eliminated_params"]
    assert hub["table_params"] == 16_384 * 50_432


def test_absolute_positions_are_explained_not_converted(capsys, tmp_path):
    cfg = {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "vocab_size": 50257}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = inspect_json(capsys, str(tmp_path / "config.json"))
    assert data["precomputable"] is False
    assert data["positional"] == "absolute"
    assert "position" in data["reason"]


def test_the_printed_table_shows_the_papers_factors(capsys):
    """The rich table prints the factors as the paper does (2,458x ... 10x), and one below 10 with a decimal
    (2.8x, which the paper rounds to 3; a tiny model's 0.4x would otherwise read 0x)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(CONFIGS / "mistral-7b.json")])
    assert exit_info.value.code == 0
    text = capsys.readouterr().err  # the rich tables go to stderr, keeping stdout for --json
    assert all(f in text for f in ("(2,458x)", "(154x)", "(10x)", "(2.8x)")), text


def test_vocab_size_on_a_checkpoint_with_weights_analyses_its_config(tmp_path, capsys):
    """--vocab-size asks about a vocabulary the tensors do not have: the analysis comes from the config alone,
    rather than failing on the embedding's shape."""
    folder = build(tmp_path / "llama", "llama")
    counted = inspect_json(capsys, str(folder))
    asked = inspect_json(capsys, str(folder), "--vocab-size", str(2 * counted["vocab_size"]))
    assert counted["total_params_exact"] and not asked["total_params_exact"]
    assert asked["vocab_size"] == 2 * counted["vocab_size"]
    assert asked["table_params"] == 2 * counted["table_params"]
    assert asked["eliminated_linear_params"] == counted["eliminated_linear_params"]
