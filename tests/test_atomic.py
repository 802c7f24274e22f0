"""Output is all or nothing: a complete, checked OUT, or no trace of the run (and an older OUT left as it was).

Failures are provoked where they hurt: inside the fold after some rows are written, in the middle of the disk
filling up, by Ctrl-C and SIGTERM sent to a real `python -m precompute_cli convert` process, and during the final
rename. After each, the test folder must hold exactly what it held before.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import write_llama
from tiny import run_cli as run

import precompute_cli
import precompute_cli.commit as commit_module
import precompute_cli.execute as execute_module
from precompute_cli import writer
from precompute_cli.check import MANIFEST
from precompute_cli.recipes import REGISTRY

ROOT = Path(precompute_cli.__file__).resolve().parent.parent


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root, with the size and sha256 of files: equal trees mean equal bytes."""
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                                       else "dir") for p in sorted(root.rglob("*"))}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".precompute-" in p.name]


def one_line(err: str, label: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(label + ": "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def src(tmp_path) -> Path:
    return write_llama(tmp_path / "src", vocab=64, hidden=16)


@pytest.fixture
def fold_fails(monkeypatch):
    """Make the fold raise `error` on its third chunk (one row per chunk), recording what was on disk then."""
    seen: dict[str, object] = {}

    def arm(error: BaseException, watch: Path):
        cls = REGISTRY["llama"]
        real = cls.fold
        calls = []

        def fold(self, w, x):
            calls.append(1)
            if len(calls) == 3:
                seen["staging"] = leftovers(watch)
                raise error
            return real(self, w, x)

        monkeypatch.setattr(cls, "fold", fold)
        monkeypatch.setattr(execute_module, "CHUNK_BYTES", 1)  # one vocabulary row per chunk
        return seen

    return arm


# -- refusing and replacing an existing OUT ------------------------------------------------------------------------

def test_existing_non_empty_out_is_refused(capsys, tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    code, _, err = run(capsys, "convert", src, out)
    assert code == 2
    assert "--overwrite" in one_line(err, "error") and str(out) in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["the source itself", "a folder holding the source"])
def test_out_that_holds_the_source_is_refused_even_with_overwrite(capsys, tmp_path, src, where):
    out = src if where == "the source itself" else src.parent
    before = tree(tmp_path)
    code, _, err = run(capsys, "convert", src, out, "--overwrite")
    assert code == 2
    assert "would replace the source" in one_line(err, "error")
    assert tree(tmp_path) == before


def test_staging_left_by_a_killed_run_is_reaped_but_a_live_one_is_not(capsys, tmp_path, src):
    """kill -9 leaves a staging folder named by its pid; the next run deletes it once that process is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".out.precompute-tmp-{dead.pid}"
    live = tmp_path / f".out.precompute-tmp-{os.getppid()}"  # another conversion still running
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    assert run(capsys, "convert", src, tmp_path / "out")[0] == 0
    assert not abandoned.exists()
    assert live.exists()


def test_existing_empty_out_is_used(capsys, tmp_path, src):
    (tmp_path / "out").mkdir()
    assert run(capsys, "convert", src, tmp_path / "out")[0] == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_overwrite_replaces_the_whole_folder(capsys, tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    assert run(capsys, "convert", src, out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_output(capsys, tmp_path, src, fold_fails):
    out = tmp_path / "out"
    assert run(capsys, "convert", src, out)[0] == 0
    newer = write_llama(tmp_path / "newer", vocab=64, hidden=16, seed=1)
    before = tree(tmp_path)
    seen = fold_fails(RuntimeError("boom"), tmp_path)
    code, _, err = run(capsys, "convert", newer, out, "--overwrite")
    assert code == 1
    assert one_line(err, "internal error") == "internal error: RuntimeError: boom (run with --debug for a traceback)"
    assert seen["staging"] == [f".out.precompute-tmp-{os.getpid()}"]  # it failed midway, inside the staging folder
    assert tree(tmp_path) == before  # the old OUT byte for byte, and no temporary folder
    assert run(capsys, "inspect", out, "--check")[0] == 0


# -- failures midway leave nothing ---------------------------------------------------------------------------------

def test_exception_midway_leaves_nothing(capsys, tmp_path, src, fold_fails):
    out = tmp_path / "new" / "deeper" / "out"  # the folders made for OUT go too
    before = tree(tmp_path)
    seen = fold_fails(RuntimeError("boom"), out.parent)
    code, _, err = run(capsys, "convert", src, out)
    assert code == 1 and "RuntimeError: boom" in one_line(err, "internal error")
    assert seen["staging"]
    assert tree(tmp_path) == before


def test_debug_prints_the_traceback_of_an_internal_error(capsys, tmp_path, src, fold_fails):
    fold_fails(RuntimeError("boom"), tmp_path)
    code, _, err = run(capsys, "convert", src, tmp_path / "out", "--debug")
    assert code == 1 and "Traceback" in err and "RuntimeError: boom" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_ctrl_c_midway_leaves_nothing(capsys, tmp_path, src, fold_fails):
    before = tree(tmp_path)
    seen = fold_fails(KeyboardInterrupt(), tmp_path)
    code, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert code == 130
    assert "no partial output" in one_line(err, "interrupted")
    assert seen["staging"] and tree(tmp_path) == before


def test_full_disk_midway_is_one_sentence_and_leaves_nothing(capsys, tmp_path, src, monkeypatch):
    """ENOSPC is exit 1: the input is fine, the machine is not (README: exit codes). The disk fills halfway through
    the output (every output byte goes through os.write, in blocks of writer.BUFFER bytes)."""
    assert (src / "model.safetensors").stat().st_size > writer.ALIGN
    budget = [writer.ALIGN]  # one block fits, the next does not
    real_write = os.write

    def write(fd, data):
        if len(data) > budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget[0] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(writer, "BUFFER", writer.ALIGN)
    monkeypatch.setattr(execute_module, "CHUNK_BYTES", 1)
    before = tree(tmp_path)
    code, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert budget[0] < writer.ALIGN  # some bytes were written before it filled
    assert code == 1
    line = one_line(err, "error")
    assert line == f"error: {tmp_path / 'out'}: no space left on the device while writing the output; " \
                   "nothing was written"
    assert tree(tmp_path) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_signal_during_the_commit_leaves_the_complete_output(capsys, tmp_path, src, monkeypatch, exchange):
    """Ctrl-C arriving during the commit (between the two renames, where RENAME_EXCHANGE is not available) is held
    until the commit is done: OUT is whole."""
    out = tmp_path / "out"
    assert run(capsys, "convert", src, out)[0] == 0
    expected = tree(out)
    calls = []

    def signalled(real):
        def call(*args):
            calls.append(args)
            os.kill(os.getpid(), signal.SIGINT)
            return real(*args)
        return call

    if exchange:
        monkeypatch.setattr(commit_module, "_exchange", signalled(commit_module._exchange))
    else:
        monkeypatch.setattr(commit_module, "_renameat2", lambda: None)
        monkeypatch.setattr(os, "rename", signalled(os.rename))
    code, _, err = run(capsys, "convert", src, out, "--overwrite")
    monkeypatch.undo()
    assert calls and (len(calls) == 1) == exchange  # the swap: one exchange, or a rename aside and one into place
    assert code == 130 and "interrupted" in err
    assert tree(out) == expected and leftovers(tmp_path) == []


# -- checksums: recorded at conversion, re-checked by inspect --check ----------------------------------------------

def test_manifest_matches_the_files_and_the_report(capsys, tmp_path, src):
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    assert run(capsys, "convert", src, out, "--json", report)[0] == 0
    files = {f["name"]: f for f in json.loads(report.read_text())["files"]}
    listed = dict(reversed(line.split("  ")) for line in (out / MANIFEST).read_text().splitlines())
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.name != MANIFEST}
    assert listed == on_disk
    assert {n: f["sha256"] for n, f in files.items() if n != MANIFEST} == on_disk
    assert files[MANIFEST]["sha256"] == hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest()
    assert all(f["bytes"] == (out / n).stat().st_size for n, f in files.items())
    # same input, same manifest: nothing in it depends on time or on where OUT is
    assert run(capsys, "convert", src, tmp_path / "again")[0] == 0
    assert (tmp_path / "again" / MANIFEST).read_bytes() == (out / MANIFEST).read_bytes()


def test_inspect_check(capsys, tmp_path, src):
    out = tmp_path / "out"
    assert run(capsys, "convert", src, out)[0] == 0
    code, stdout, err = run(capsys, "inspect", out, "--check", "--json")
    assert code == 0 and json.loads(stdout)["ok"] is True
    assert {f["name"]: f["status"] for f in json.loads(stdout)["files"]} == {"config.json": "ok",
                                                                             "model.safetensors": "ok"}
    (out / "README.md").write_text("added later")  # not written by convert: listed, not failed (as sha256sum -c)
    code, stdout, _ = run(capsys, "inspect", out, "--check", "--json")
    assert code == 0 and {"name": "README.md", "status": "unlisted", "expected": None, "actual": None} in \
        json.loads(stdout)["files"]
    table = out / "model.safetensors"
    raw = bytearray(table.read_bytes())
    raw[-3] ^= 0x01  # one bit of the last table row
    table.write_bytes(bytes(raw))
    code, _, err = run(capsys, "inspect", out, "--check")
    assert code == 2
    assert "model.safetensors (changed)" in err.strip().splitlines()[-1] and str(out / MANIFEST) in err
    (out / "config.json").unlink()
    code, _, err = run(capsys, "inspect", out, "--check")
    assert code == 2 and "config.json (missing)" in err and "model.safetensors (changed)" in err


@pytest.mark.parametrize("manifest, problem", [
    (None, "missing; only folders written by `precompute convert` can be checked"),
    ("not a checksum line\n", "line 1 is not a `<sha256>  <file name>` entry"),
    ("0" * 64 + "  ../../etc/passwd\n", "line 1 is not"),
    ("", "lists no files"),
])
def test_inspect_check_refuses_a_bad_manifest(capsys, tmp_path, src, manifest, problem):
    out = tmp_path / "out"
    assert run(capsys, "convert", src, out)[0] == 0
    if manifest is None:
        (out / MANIFEST).unlink()
    else:
        (out / MANIFEST).write_text(manifest)
    code, _, err = run(capsys, "inspect", out, "--check")
    assert code == 2 and problem in one_line(err, "error") and str(out / MANIFEST) in err


# -- a real process, really signalled ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_src(tmp_path_factory) -> Path:
    """32000 x 1024 float16, Llama-7B's vocabulary at a seventh of its width: a few seconds of folding."""
    return write_llama(tmp_path_factory.mktemp("big") / "src", vocab=32000, hidden=1024, heads=16, kv_heads=4)


@pytest.mark.parametrize("signum, old_output", [
    (signal.SIGTERM, False),  # CI cancelling a job: no OUT, no temporary folder
    (signal.SIGINT, True),  # Ctrl-C during --overwrite: the previous OUT as it was, no temporary folder
], ids=["sigterm", "sigint-overwrite"])
def test_signal_midway_leaves_nothing(tmp_path, big_src, signum, old_output):
    out = tmp_path / "out"
    if old_output:
        out.mkdir()
        (out / "previous.txt").write_text("the last good conversion")
    before = tree(tmp_path)
    args = [sys.executable, "-m", "precompute_cli", "convert", str(big_src), str(out), "--overwrite"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        staging = tmp_path / f".out.precompute-tmp-{proc.pid}"
        while not (staging / "model.safetensors").exists():  # the table's file is open: folding has begun
            assert proc.poll() is None, proc.communicate()[1].decode()
            time.sleep(0.01)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: " in err
    assert tree(tmp_path) == before  # no OUT (or the old one, untouched) and no temporary folder


def test_ctrl_c_between_starting_the_threads_leaves_no_thread_waiting(tmp_path, src):
    """Ctrl-C can land after the writers started and before the GEMM workers did: the writer waiting for table rows
    must be released, or the thread pools are never joined and the process hangs instead of exiting 130."""
    out = tmp_path / "out"
    script = f"""
import concurrent.futures, sys
import precompute_cli.execute as execute

class Interrupted(concurrent.futures.ThreadPoolExecutor):
    def submit(self, fn, *args, **kwargs):
        if self._thread_name_prefix == "fold":
            raise KeyboardInterrupt
        return super().submit(fn, *args, **kwargs)

execute.ThreadPoolExecutor = Interrupted
execute._cores = lambda: 2
from precompute_cli.cli import main
main(["convert", {str(src)!r}, {str(out)!r}])
"""
    before = tree(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 130, proc.stderr.decode()
    assert tree(tmp_path) == before
