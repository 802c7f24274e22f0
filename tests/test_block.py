"""The converted config's "precompute" block: built from the plan, written as today's bytes, read back only through
PrecomputeBlock.read, which refuses a missing, foreign or malformed block with one sentence (exit 2)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import build, convert, run_cli

from precompute_cli import load_model
from precompute_cli.block import PrecomputeBlock, is_converted, original_config
from precompute_cli.errors import InputError
from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.source import resolve


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[bool, tuple[Path, Path]]:
    """A tiny Qwen2 with tied and with untied embeddings, each converted: {tied: (source, converted)}."""
    root = tmp_path_factory.mktemp("block")
    out = {}
    for tied in (False, True):
        src = build(root / f"src-{tied}", "qwen2", tie_word_embeddings=tied)
        assert convert(src, root / f"out-{tied}") == 0
        out[tied] = (src, root / f"out-{tied}")
    return out


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_byte_identical_and_equals_the_plans_block(converted, tied):
    src, out = converted[tied]
    text = (out / "config.json").read_text()
    config = json.loads(text)
    block = PrecomputeBlock.read(config, out / "config.json")
    assert block.as_dict() == config["precompute"]
    assert json.dumps(block.added_to(original_config(config)), indent=2) + "\n" == text  # key order included
    assert PrecomputeBlock.parse(block.as_dict(), "x") == block
    plan = make_plan(resolve(str(src)), load_recipe(resolve(str(src))))
    assert PrecomputeBlock.of(plan) == block
    assert is_converted(config) and not is_converted(original_config(config))
    assert original_config(config) == _config(src)


@pytest.mark.parametrize("tied", [False, True])
def test_whether_the_table_stores_the_residual_is_the_recipes_decision(converted, tied):
    """Untied: the embedding goes, so x is in the table; tied: the embedding stays and supplies x."""
    src, out = converted[tied]
    block = PrecomputeBlock.read(_config(out), "config.json")
    recipe = load_recipe(resolve(str(src)))
    assert block.stores_residual is recipe.stores_residual is (not tied)
    assert block.residual == recipe.columns()["residual"]
    assert (block.residual is None) is tied


def test_inspect_takes_the_table_width_from_the_plan_and_the_recipe(converted):
    """A tied serial block keeps x out of the table; assumed parallel, the recipe's rule puts it back in."""
    from precompute_cli.report import analysis

    src = resolve(str(converted[True][0]))
    plan = make_plan(src, load_recipe(src))
    spec = plan.recipe.spec
    assert analysis(plan)["table_width"] == plan.table.width == spec.q_dim + 2 * spec.kv_dim
    assert analysis(plan, assume_parallel=True)["table_width"] == spec.hidden_size + spec.q_dim + 2 * spec.kv_dim
    assert plan.recipe.spec.block == "serial" and plan.table.columns["residual"] is None  # the plan is untouched


def _good() -> dict:
    return {
        "format": 1, "layer": 0, "block": "serial", "table": "precompute.table", "dtype": "BF16",
        "columns": {"residual": [0, 64], "q": [64, 128], "k": [128, 160], "v": [160, 192]},
        "removed": ["model.embed_tokens.weight"],
        "source": {"id": "org/m", "revision": "a" * 40}, "tool": {"name": "precompute-cli", "version": "0.1.0"},
    }


def _set(path: str, value):
    def change(block: dict) -> None:
        *outer, last = path.split(".")
        target = block
        for key in outer:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


NOT_CONVERTED = "not a precomputed checkpoint (no 'precompute' block of format 1)"


@pytest.mark.parametrize("change, message", [
    (lambda b: b.clear(), NOT_CONVERTED),
    (_set("format", 2), NOT_CONVERTED),
    (_set("format", True), "format must be 1, not True"),
    (_set("layer", 1), "layer must be 0, not 1"),
    (_set("layer", KeyError), "layer must be 0, not None"),
    (_set("block", "hybrid"), "block must be 'serial' or 'parallel', not 'hybrid'"),
    (_set("table", ""), "table must be a tensor name, not ''"),
    (_set("table", ["precompute.table"]), "table must be a tensor name"),
    (_set("dtype", "I8"), "dtype must be one of F64, F32, F16, BF16, not 'I8'"),
    (_set("columns", [[0, 64]]), "columns must be an object of [start, stop) column ranges"),
    (_set("columns.residual", KeyError), "with a 'residual' entry"),
    (_set("columns.q", [128, 64]), "columns must be"),
    (_set("columns.q", [64, 128.5]), "columns must be"),
    (_set("columns.q", [-1, 128]), "columns must be"),
    (_set("columns.q", [64, True]), "columns must be"),
    (_set("columns.q", [60, 128]), "that do not overlap"),
    (_set("columns", {"residual": None, "q": None}), "columns must be"),
    (_set("removed", "model.embed_tokens.weight"), "removed must be a list of tensor names"),
    (_set("removed", [None]), "removed must be a list of tensor names"),
    (_set("source", "org/m"), 'source must be an object {"id"'),
    (_set("source.id", KeyError), 'source must be an object {"id"'),
    (_set("source.revision", 5), "source.revision must be a commit or null, not 5"),
    (_set("tool.version", KeyError), 'tool must be an object {"name": ..., "version": ...}'),
])
def test_a_malformed_block_is_refused_in_one_sentence(change, message):
    block = _good()
    change(block)
    config = {"model_type": "llama", "precompute": block}
    with pytest.raises(InputError) as caught:
        PrecomputeBlock.read(config, "out/config.json")
    text = str(caught.value)
    assert text.startswith("out/config.json: ") and message in text
    assert "\n" not in text and text.count(". ") == 0
    assert caught.value.exit_code == 2


def test_the_block_is_written_in_the_key_order_converted_checkpoints_already_have():
    """Checkpoints converted before block.py have this text; a rerun must still give the same bytes."""
    good = _good()
    assert json.dumps(PrecomputeBlock.read({"precompute": good}, "config.json").as_dict(), indent=2) == \
        json.dumps(good, indent=2)


def test_no_block_at_all_is_not_a_converted_checkpoint():
    with pytest.raises(InputError, match="config.json: not a precomputed checkpoint"):
        PrecomputeBlock.read({"model_type": "llama"}, "config.json")
    assert not is_converted({"model_type": "llama"})


def test_a_well_formed_block_parses_with_a_local_source_and_no_residual():
    good = _good()
    good["columns"] = {"residual": None, "q": [0, 64], "k": [64, 96], "v": [96, 128]}
    good["source"] = {"id": "/models/llama", "revision": None}
    block = PrecomputeBlock.read({"precompute": good}, "config.json")
    assert block.revision is None and not block.stores_residual and block.columns["k"] == (64, 96)
    assert block.as_dict() == good


def test_inspect_and_load_model_refuse_a_damaged_block(converted, tmp_path, capsys):
    """A converted folder whose block was edited by hand: every reader refuses it the same way, with exit 2."""
    _, out = converted[False]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in out.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    config = _config(out)
    broken = copy.deepcopy(config)
    broken["precompute"]["columns"]["q"] = [0, 10**9]  # overlaps the residual
    (damaged / "config.json").write_text(json.dumps(broken))
    code, _, err = run_cli(capsys, "inspect", str(damaged))
    assert code == 2 and "the 'precompute' block is malformed: columns must be" in " ".join(err.split())
    with pytest.raises(InputError, match="the 'precompute' block is malformed: columns must be"):
        load_model(damaged)
    code, shown, _ = run_cli(capsys, "inspect", "--json", str(out))  # the undamaged one, as written
    assert code == 0 and json.loads(shown)["precompute"] == config["precompute"]


def test_hub_does_not_import_source():
    """hub.py answers with paths, commits and headers; only source.py builds a Source (no import cycle)."""
    code = "import sys, precompute_cli.hub; sys.exit('precompute_cli.source' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
