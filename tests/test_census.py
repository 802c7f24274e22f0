"""The census: every causal-LM model type of the installed transformers is folded or refused with its own reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny import run_cli
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from precompute_cli.census import census
from precompute_cli.recipes import REGISTRY, supported
from precompute_cli.recipes.unfolded import NOT_WRITTEN, REFUSED

TESTS = Path(__file__).parent


def test_every_causal_lm_type_of_transformers_is_in_the_census():
    rows = {r.model_type: r for r in census()}
    missing = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(rows))
    assert not missing, f"model types with neither a recipe nor a reason: {missing}"


def test_each_type_is_listed_once():
    folded = set(supported())
    assert not folded & set(REFUSED), "a folded type is also refused"
    assert not folded & set(NOT_WRITTEN), "a folded type is also listed as not written"
    assert not set(REFUSED) & set(NOT_WRITTEN)
    # recipes that exist only to explain a refusal (gpt2, opt) take their sentence from REFUSED
    assert {t for t, cls in REGISTRY.items() if not getattr(cls, "foldable", True)} <= set(REFUSED)


def test_every_folded_type_is_named_in_an_equivalence_test():
    """Each folded model_type appears as a literal in a test module that runs tiny.assert_equivalent."""
    named: set[str] = set()
    for path in TESTS.glob("test_*.py"):
        text = path.read_text()
        if "assert_equivalent(" in text:
            named |= set(re.findall(r"[\"']([a-z0-9_\-]+)[\"']", text))
    assert not sorted(set(supported()) - named)


def test_inspect_supported_prints_the_census(capsys):
    code, out, _ = run_cli(capsys, "inspect", "--supported", "--json")
    assert code == 0
    data = json.loads(out)
    rows = data["model_types"]
    assert sum(data["counts"].values()) == len(rows) == len({r["model_type"] for r in rows})
    by_type = {r["model_type"]: r for r in rows}
    assert by_type["llama"]["status"] == "folded"
    assert by_type["gpt2"]["status"] == "refused" and "absolute position" in by_type["gpt2"]["note"]
    code, _, err = run_cli(capsys, "inspect", "--supported")  # the human table goes where all rich output goes
    assert code == 0 and "bert" in err and f"{data['counts']['folded']} folded" in err


@pytest.mark.parametrize("model_type, words", [
    ("bert", "cannot be precomputed: it is a BERT-style encoder"),
    ("whisper", "cannot be precomputed: it is an encoder-decoder's decoder"),
    ("rwkv", "cannot be precomputed: it mixes the previous token"),
])
def test_convert_refuses_an_unfolded_type_with_its_reason(capsys, tmp_path, model_type, words):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 64, "vocab_size": 10}))
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and words in err and model_type in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_not_written_type_with_its_reason(capsys, tmp_path, monkeypatch):
    """NOT_WRITTEN is empty with transformers 5.24 (every token-only type has a recipe); a type listed there later is
    refused as not supported yet, with its reason."""
    monkeypatch.setitem(NOT_WRITTEN, "future_lm", "its layer 0 needs a recipe nobody has written")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "future_lm", "hidden_size": 64, "vocab_size": 10}))
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "'future_lm' is not supported yet: its layer 0 needs a recipe nobody has written" in err
    assert not (tmp_path / "out").exists()


def test_inspect_without_a_checkpoint_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "inspect")
    assert code == 2 and "--supported" in err
