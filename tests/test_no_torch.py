"""Converting a serial model never imports torch: the fold is numpy, and `import torch` alone costs 1.6 s on a
2-core machine, more than folding a small model. Runs in a fresh interpreter, since this one has torch loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny import build

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
