"""inspect's figures pinned: `inspect --json` on every config in configs/ (copied into the pins, so that replacing a
config there does not move them) and on transformers' default config of every folded type, each also with
--assume-parallel, must print what tests/data/inspect_figures.json holds.

The pins were written by this module's `--write` before the report consulted the recipes' paper_counts hook, so the
hook could not move a figure unnoticed. Where a figure was wrong and changed on purpose, the pin was changed with it
and a test below derives the new value by hand (jetmoe: its routed attention counted as a dense layer 0).
Regenerate after a deliberate change: `python tests/test_inspect_figures.py --write`, and say why in the commit.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).resolve().parent / "data" / "inspect_figures.json"
MODES = {"": [], "assume-parallel": ["--assume-parallel"]}
UNPINNED = ("supported_model_types",)  # grows with every recipe added


def default_config(model_type: str) -> dict | None:
    """transformers' default config of `model_type` (None for a type transformers does not know)."""
    from transformers import AutoConfig

    try:
        return json.loads(AutoConfig.for_model(model_type).to_json_string())
    except ValueError:
        return None


def figures(config: dict, args: list[str], folder: Path) -> dict:
    """`precompute inspect --json config.json ARGS`, run in-process, less what changes with unrelated work."""
    from precompute_cli.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
            pytest.raises(SystemExit) as exited:
        main(["inspect", "--json", str(folder / "config.json"), *args])
    if exited.value.code != 0:
        return {"exit": exited.value.code}
    return {k: v for k, v in json.loads(out.getvalue()).items() if k not in UNPINNED}


def cases() -> dict[str, dict]:
    """name -> config: configs/*.json, then the default config of every folded type."""
    from precompute_cli.recipes import supported

    out = {f"configs/{p.name}": json.loads(p.read_text()) for p in sorted((ROOT / "configs").glob("*.json"))}
    for model_type in supported():
        config = default_config(model_type)
        if config is not None:
            out[f"default/{model_type}"] = config
    return out


def write(folder: Path) -> None:
    pins = {}
    for name, config in cases().items():
        for mode, args in MODES.items():
            pins[f"{name} {mode}".strip()] = {"config": config if name.startswith("configs/") else None,
                                              "args": args,
                                              "figures": figures(config, args, folder / name.replace("/", "_"))}
    lines = (f"{json.dumps(name)}: {json.dumps(pin, sort_keys=True)}" for name, pin in sorted(pins.items()))
    PINS.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one case a line: a moved figure is a one-line diff


@functools.cache
def pinned() -> dict[str, dict]:
    return json.loads(PINS.read_text())


@pytest.mark.parametrize("name", sorted(pinned()) if PINS.exists() else ["(no pins: run --write)"])
def test_inspect_prints_the_pinned_figures(tmp_path, name):
    pin = pinned()[name]
    source = name.split(" ")[0]
    config = pin["config"] if pin["config"] is not None else default_config(source.removeprefix("default/"))
    assert config is not None, f"{source}: transformers no longer has this type's config"
    got = figures(config, pin["args"], tmp_path)
    moved = {k: (pin["figures"].get(k), got.get(k)) for k in set(pin["figures"]) | set(got)
             if pin["figures"].get(k) != got.get(k)}
    assert not moved, f"{name}: inspect's figures moved (pinned, now): {moved}"


def test_every_pinned_analysis_reads_x_and_its_folded_columns():
    """reads per token = hidden_size + the table's columns besides the residual, for every pinned analysis: the
    paper's count and the table the recipe plans agree (jetmoe's experts and gates columns were left out before)."""
    for name, pin in pinned().items():
        f = pin["figures"]
        if f.get("precomputable"):
            assert f["reads_per_token"] == f["hidden_size"] + sum(f["folds"].values()), name


def test_jetmoe_counts_its_routed_attention(tmp_path):
    """The figures that changed on purpose: jetmoe's layer 0 eliminates its router, every attention expert's
    input_linear and kv_proj, and its table holds q for the top_k slots, k, v, and the experts and gates chosen.
    Before the recipe said so, inspect counted Q, K, V of a dense layer (16,777,216 weights, 10,240 reads)."""
    config = default_config("jetmoe")
    d, experts, top_k = config["hidden_size"], config["num_local_experts"], config["num_experts_per_tok"]
    kv = config["kv_channels"] * config["num_key_value_heads"]
    got = figures(config, [], tmp_path)
    eliminated = experts * d + experts * kv * d + 2 * kv * d
    assert got["layer0"] == "routed attention"
    assert got["eliminated_linear_params"] == eliminated == 41_959_424
    assert got["reads_per_token"] == d + top_k * kv + 2 * kv + 2 * top_k == 10_244
    assert got["reads_without_precompute"]["1"] == d + eliminated
    assert got["memory_increase_paper"] == (top_k * kv + 2 * kv + 2 * top_k) * config["vocab_size"] - eliminated
    assert got == pinned()["default/jetmoe"]["figures"]


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    sys.path.insert(0, str(ROOT))  # this checkout's precompute_cli, not an installed one

    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
    print(f"wrote {PINS} ({len(pinned())} cases)")
