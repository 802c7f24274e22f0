"""verify on mixer and MLA tables, whose rows it now checks against transformers' own layer 0 (the oracle), not the
recipe's fold: a correct conversion of a Mamba-2, a Gated DeltaNet, a short-conv and an MLA model (both tables)
verifies; a corrupted row and a recipe bug (the input norm read wrong: its table made by the fold) each fail the
table-row check, with scripts/faults.py's machinery (subject, inject, corrupted_row, altered)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_mixer_families import CASES as MIXERS
from test_mla import CASES as MLA_CASES
from test_mla import MLA

from precompute_cli.cli import main
from precompute_cli.verify import make_probe, sample_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import faults  # noqa: E402

SUBJECTS = {  # name -> (build overrides, the recipe's choices)
    "mamba2": (MIXERS["mamba2"], {}),
    "gated-deltanet": (MIXERS["qwen3_5_text"], {}),
    "short-conv": (MIXERS["lfm2-bias-untied"], {}),
    "mla-latent": ({**MLA, **MLA_CASES["deepseek_v3"]}, {"mla_table": "latent"}),
    "mla-full": ({**MLA, **MLA_CASES["deepseek_v3"]}, {"mla_table": "full"}),
}


def verify(original: Path, converted: Path, tmp: Path, *args: str) -> dict:
    """`precompute verify --json`, in-process: the result, with the exit code."""
    try:
        main(["verify", str(original), str(converted), "--json", str(tmp / "verify.json"), "-q", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return {**json.loads((tmp / "verify.json").read_text()), "exit": code}


def rows_check(result: dict) -> dict:
    return next(c for c in result["checks"] if c["name"] == "table rows")


def input_norm_shifted(s: faults.Subject):
    """A recipe bug: the table folded with the input norm's weight read as 1 + w (the first 1-D norm weight of
    layer 0: input_layernorm, Mamba's norm, LFM2's operator_norm)."""
    norm = next(n for n, shape in s.recipe.folded().items() if len(shape) == 1 and n.endswith("norm.weight"))
    return s.fold(faults.altered(s.weights, {norm: lambda w: w + 1.0}))


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    made: dict = {}

    def get(name: str) -> faults.Subject:
        if name not in made:
            overrides, choices = SUBJECTS[name]
            made[name] = faults.subject(tmp_path_factory.mktemp(name), name, "float32", overrides=overrides,
                                        choices=choices)
        return made[name]
    return get


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_a_correct_conversion_verifies_against_transformers_layer_0(subjects, tmp_path, name):
    s = subjects(name)
    result = verify(s.src, s.out, tmp_path)
    assert result["exit"] == 0 and result["passed"], result["failure"]
    check = rows_check(result)
    assert "vs transformers' layer 0" in check["value"] and check["measured"] <= check["allowed"]


@pytest.mark.parametrize("fault", ["corrupted row", "input norm read as 1 + w"])
@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_a_faulty_table_fails_the_row_check(subjects, tmp_path, name, fault):
    s = subjects(name)
    table = faults.corrupted_row(s) if fault == "corrupted row" else input_norm_shifted(s)
    faulty = faults.inject(s, table, tmp_path / "faulty")
    result = verify(s.src, faulty, tmp_path)
    check = rows_check(result)
    assert result["exit"] == 1 and not result["passed"]
    assert check["passed"] is False and check["measured"] > check["allowed"], check


def test_all_rows_checks_every_row(subjects, tmp_path):
    s = subjects("short-conv")
    vocab = s.recipe.spec.vocab_size
    result = verify(s.src, s.out, tmp_path, "--all-rows")
    assert result["passed"] and result["table_rows_checked"] == vocab
    # a damaged row outside the sample (the edges, 64 random rows) and the probe's tokens
    sampled = sample_rows(vocab, 0, make_probe(vocab, 0).tokens())
    row = next(r for r in range(vocab // 2, vocab) if r not in sampled)
    table = s.stored.copy()
    table[row] *= 1.5
    result = verify(s.src, faults.inject(s, table, tmp_path / "faulty"), tmp_path, "--all-rows")
    assert not result["passed"] and result["table_worst_row"] == row
