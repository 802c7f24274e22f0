"""The command line as a user meets it: usage errors, --help, --version, inspect's summary of a converted folder,
the dry run's plan as JSON, and progress (drawn only on a terminal, never with -q; reported through a hook)."""

from __future__ import annotations

import io
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console
from tiny import build, convert, run_cli

from precompute_cli import __version__, cli, conversion
from precompute_cli.check import check
from precompute_cli.st_io import read_header


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    src = build(tmp / "src", "llama", tie_word_embeddings=False)
    assert convert(src, tmp / "out") == 0
    return src, tmp / "out"


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # --help's tables: no option name broken over two lines


@pytest.mark.parametrize("args, says", [
    (["convert", "--bogus", "a", "b"], "No such option: --bogus"),
    (["bogus"], "No such command 'bogus'"),
    (["convert"], "Missing argument 'source'"),
    (["convert", "a", "b", "--table-dtype", "int8"], "Invalid value for '--table-dtype'"),
    (["verify", "a", "b", "--dtype", "float64"], "Invalid value for '--dtype'"),
    (["inspect", "x", "--vocab-size", "many"], "Invalid value for '--vocab-size'"),
])
def test_a_usage_error_exits_2_with_clicks_message(capsys, args, says):
    code, out, err = run_cli(capsys, *args)
    assert code == 2, err
    assert "Usage:" in err and says in err and "--help" in err
    assert "internal error" not in err and out == ""


def test_help_lists_the_choices_the_version_and_debug(capsys, wide):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(o in out for o in ("--version", "--debug", "--quiet", "convert", "inspect"))
    code, out, _ = run_cli(capsys, "convert", "--help")
    assert code == 0 and "float32|bfloat16|float16" in out and "cpu|cuda|cuda:N" in out and "--quiet" in out
    code, out, _ = run_cli(capsys, "verify", "--help")
    assert code == 0 and "float32|bfloat16|float16" in out
    code, out, _ = run_cli(capsys)  # no command at all: the help, as a usage error
    assert code == 2 and "Usage:" in out and "convert" in out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(capsys, flag):
    assert run_cli(capsys, flag)[:2] == (0, f"precompute-cli {__version__}\n")


def test_debug_is_taken_anywhere(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "inspect", tmp_path / "nothing-here")
    assert code == 2 and "Traceback" in err
    code, _, err = run_cli(capsys, "inspect", tmp_path / "nothing-here")
    assert code == 2 and "Traceback" not in err


def test_inspect_summarises_a_converted_folder(capsys, llama, wide):
    src, out = llama
    block = json.loads((out / "config.json").read_text())["precompute"]
    code, stdout, err = run_cli(capsys, "inspect", out)
    assert code == 0 and stdout == ""  # the summary is for people (stderr); JSON only with --json
    assert "precomputed llama checkpoint" in err and "layer 0's Q, K, V (serial block)" in err
    assert "211 tokens x 192 columns, F32" in err
    for name, (first, last) in block["columns"].items():
        assert f"columns {first}:{last}" in err and f"{name}: " in err
    assert f"{len(block['removed'])} tensors" in err
    assert all(name in err for name in block["removed"])
    assert str(src) in err and f"precompute-cli {__version__}" in err
    assert '"format"' not in err  # not the raw block
    code, stdout, _ = run_cli(capsys, "inspect", out, "--json")
    data = json.loads(stdout)
    assert code == 0 and data["converted"] is True and data["precompute"] == block


def test_dry_run_writes_the_plan_as_json(capsys, llama, tmp_path):
    src, _ = llama
    plan = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", "--dry-run", "--json", plan,
                           "--table-dtype", "bfloat16")
    assert code == 0 and "dry run" in err and not (tmp_path / "out").exists()
    data = json.loads(plan.read_text())
    assert data["dry_run"] is True and data["source"] == str(src) and data["out"] == str(tmp_path / "out")
    assert data["precompute"]["dtype"] == "BF16" and "model.embed_tokens.weight" in data["precompute"]["removed"]
    kept = len(read_header(src / "model.safetensors").tensors) - len(data["precompute"]["removed"])
    assert data["files"][0] == {"name": "model.safetensors", "action": "rewrite", "tensors_kept": kept, "table": True}
    assert {"name": "generation_config.json", "action": "copy"} in data["files"]
    assert data["bytes_after"] - data["bytes_before"] == 211 * 192 * 2 - sum(
        n for n in [211 * 64 * 4, 64 * 4, 64 * 64 * 4, 2 * 32 * 64 * 4])  # table in, layer-0 and embedding out
    assert data["download"] is None and data["upload"] is None


# -- progress ---------------------------------------------------------------------------------------------------

class Recorder:
    """A progress hook that keeps every report."""

    def __init__(self):
        self.seen: dict[str, list[tuple[int, int]]] = {}

    def __call__(self, step: str, done: int, total: int) -> None:
        self.seen.setdefault(step, []).append((done, total))

    @contextmanager
    def entered(self):
        yield self


def test_the_conversion_reports_every_step_through_its_hook(llama, tmp_path):
    src, _ = llama
    progress = Recorder()
    done = conversion.convert(str(src), tmp_path / "out", progress=progress.entered())
    seen = progress.seen
    assert list(seen) == ["resolving", "reading", "folding", "copying", "writing"]
    table = done.plan.table.ref.nbytes
    assert seen["folding"][-1] == (211, 211) or max(seen["folding"]) == (211, 211)  # workers may report late
    assert seen["writing"][-1] == (table, table)
    copied = sum(i.nbytes for s in done.plan.shards for i in s.kept)
    assert seen["copying"][-1] == (copied, copied)
    layer0 = sum(info.nbytes for name, (_, info) in done.plan.inputs.items() if name != "model.embed_tokens.weight")
    assert seen["reading"][0] == (0, layer0) and seen["reading"][-1] == (layer0, layer0)
    for step in ("copying", "writing"):  # the sizes only grow
        assert [d for d, _ in seen[step]] == sorted(d for d, _ in seen[step])


def test_inspect_check_reports_hashing(llama):
    _, out = llama
    progress = Recorder()
    check(out, progress)
    total = sum(p.stat().st_size for p in out.iterdir() if p.name != "SHA256SUMS")
    assert progress.seen["hashing"][-1] == (total, total)


def pretend_terminal(monkeypatch, is_terminal: bool = True) -> io.StringIO:
    """stdout is (or is not) a terminal; what the CLI draws on stderr is kept, as a terminal would get it. Called
    in the test itself: pytest gives the test another sys.stdout than its fixtures."""
    drawn = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=drawn, force_terminal=True, width=160))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: is_terminal, raising=False)
    return drawn


@pytest.mark.parametrize("quiet", [None, "-q after the command", "--quiet before it"])
def test_progress_is_drawn_on_a_terminal_unless_quiet(llama, tmp_path, capsys, monkeypatch, quiet):
    src, _ = llama
    terminal = pretend_terminal(monkeypatch)
    args = ["convert", src, tmp_path / "out"]
    if quiet:
        flag, where = quiet.split()[0], quiet.split()[1]
        args.insert(len(args) if where == "after" else 0, flag)
    code, _, _ = run_cli(capsys, *args)
    drawn = terminal.getvalue()
    assert code == 0 and "output files" in drawn  # the report itself is always printed
    steps = ["reading layer 0's weights", "folding layer 0 into the table", "copying the other tensors",
             "writing the table"]
    if quiet:
        assert not any(s in drawn for s in steps)
    else:
        assert [s for s in steps if s not in drawn] == []
        assert "211/211 rows" in drawn and "kB" in drawn


def test_no_progress_when_stdout_is_not_a_terminal(llama, tmp_path, capsys, monkeypatch):
    drawn = pretend_terminal(monkeypatch, is_terminal=False)
    src, _ = llama
    code, _, _ = run_cli(capsys, "convert", src, tmp_path / "out")
    assert code == 0 and "output files" in drawn.getvalue() and "folding" not in drawn.getvalue()


@pytest.mark.parametrize("quiet", [False, True])
def test_inspect_check_draws_hashing_on_a_terminal(llama, capsys, monkeypatch, quiet):
    _, out = llama
    terminal = pretend_terminal(monkeypatch)
    code, _, _ = run_cli(capsys, "inspect", out, "--check", *(["-q"] if quiet else []))
    assert code == 0 and "every file listed" in terminal.getvalue()
    assert ("hashing" in terminal.getvalue()) is not quiet
