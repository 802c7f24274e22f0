"""Converting never imports torch: the fold is numpy, and `import torch` alone costs 1.6 s on a 2-core machine,
more than folding a small model. The base install has no torch at all (it is the `runtime` extra's), so every
supported architecture must convert and inspect without it, exact GELU included. Runs in a fresh interpreter,
since this one has torch loaded. `make test-no-torch` does the same in an environment where torch is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny import build, convert

from precompute_cli.recipes import REGISTRY, supported
from precompute_cli.st_io import read_header

# Records who imports torch first (the import itself goes ahead), then fails after `convert` if anyone did.
WATCH = """
import sys, traceback

class Watch:
    stack = None
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Watch.stack is None:
            Watch.stack = "".join(traceback.format_stack()[:-1])

sys.meta_path.insert(0, Watch())
from precompute_cli.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, f"convert exited with {exc.code}"
assert "torch" not in sys.modules, "convert imported torch:\\n" + Watch.stack
"""


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_convert_does_not_import_torch(tmp_path, model_type):
    src = build(tmp_path / "src", model_type, dtype=torch.bfloat16)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", WATCH, "convert", str(src), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "precompute.table" in read_header(out / "model.safetensors").tensors


def test_importing_the_planner_does_not_import_torch():
    code = "import sys, precompute_cli.plan, precompute_cli.recipes; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# As if torch and transformers were not installed: importing either fails, as it would in the base install.
WITHOUT_TORCH = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NotInstalled())
from precompute_cli.cli import main
args = sys.argv[1:]
for i in range(0, len(args), 2):
    for command in (["convert", args[i], args[i + 1]], ["inspect", "--check", args[i + 1]]):
        try:
            main(command)
        except SystemExit as exc:
            assert not exc.code, f"{command} exited with {exc.code}"
"""
def one_model_per_family() -> dict[str, dict]:
    """A tiny model's build arguments for one model type of every recipe module (the fold's code paths are the
    module's; the types of a module differ in their declarations only), taken from the equivalence tests' cases."""
    import test_attention_zoo
    import test_falcon_bloom_mpt
    import test_gemma3n
    import test_gemma4
    import test_gpt_oss
    import test_jetmoe
    import test_llama_family
    import test_mixer_families
    import test_mla
    import test_multimodal_decoders
    import test_odd_attention
    import test_parallel_families
    import test_serial_families

    cases = {}
    for module in (test_llama_family, test_serial_families, test_parallel_families, test_falcon_bloom_mpt,
                   test_attention_zoo, test_mixer_families, test_odd_attention, test_multimodal_decoders):
        for case in module.CASES.values():
            kwargs = case[0] if isinstance(case, tuple) else case
            if isinstance(kwargs, dict) and "model_type" in kwargs:
                cases.setdefault(kwargs["model_type"], kwargs)
    cases["gpt_oss"] = dict(model_type="gpt_oss", **test_gpt_oss.OSS)
    cases["deepseek_v3"] = {**test_mla.MLA, **test_mla.CASES["deepseek_v3"]}
    cases["deepseek_v4"] = test_mla.CASES["deepseek_v4-compressed_sparse_attention"]
    cases["jetmoe"] = dict(model_type="jetmoe", **test_jetmoe.SIZES)
    cases["gemma4_text"] = dict(test_gemma4.TEXT)  # with per-layer inputs: fold_tokens reads their rows
    cases["gemma3n_text"] = dict(model_type="gemma3n_text", **test_gemma3n.TEXT)  # AltUp, LAuReL, per-layer inputs
    cases["dots3_note_text"] = test_multimodal_decoders.DOTS3
    chosen: dict[str, dict] = {}
    for model_type in supported():
        family = REGISTRY[model_type].__module__
        if family not in chosen and model_type in cases:
            chosen[family] = cases[model_type]
    # multimodal checkpoints convert only with --text-only, to their text decoder: the text type's fold
    families = {REGISTRY[t].__module__ for t in supported()} - {"precompute_cli.recipes.multimodal"}
    assert families == set(chosen), f"families without an equivalence case: {sorted(families - set(chosen))}"
    return {kwargs["model_type"]: kwargs for kwargs in chosen.values()}


def test_every_architecture_converts_and_inspects_without_torch_to_the_same_bytes(tmp_path):
    """One interpreter without torch converts a tiny model of every recipe family; the bytes equal a conversion
    made where torch is loaded (exact GELU, for gpt_neox, falcon and phi, is numpy either way)."""
    pairs = []
    for model_type, kwargs in one_model_per_family().items():
        src = build(tmp_path / model_type, **kwargs)
        pairs.append((model_type, src, tmp_path / f"{model_type}-without-torch"))
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *(str(p) for _, src, out in pairs for p in (src, out))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for model_type, src, out in pairs:
        assert convert(src, tmp_path / f"{model_type}-with-torch") == 0
        mine = tmp_path / f"{model_type}-with-torch"
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in mine.iterdir()), model_type
        for path in mine.iterdir():
            assert (out / path.name).read_bytes() == path.read_bytes(), (model_type, path.name)
