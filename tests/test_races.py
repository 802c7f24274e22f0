"""Conversions that race for the same OUT, and convert-all runs that race for the same OUT_ROOT, lose nothing.

The races are made deterministic with a barrier: a real `precompute` process is stopped between its check of OUT
and its commit (its `execute.commit` waits for a file the test creates) while another run commits, then let go.
Every race runs twice: with renameat2's RENAME_EXCHANGE, and with it unavailable (the two renames under a lock
that other systems and file systems get).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from synthetic import write_llama
from test_atomic import leftovers, one_line, tree
from tiny import run_cli as run

import precompute_cli
import precompute_cli.commit as commit_module
from precompute_cli import release
from precompute_cli.release import LOCK_NAME, STATE_NAME, SUMMARY_NAME

ROOT = Path(precompute_cli.__file__).resolve().parent.parent
MODES = ["renameat2", "two-renames"]

# A `precompute` process whose commit first waits at a barrier: it touches `reached`, then waits for `go`.
STOPPED = """
import sys, time
from pathlib import Path

import precompute_cli.commit as commit
import precompute_cli.execute as execute
import precompute_cli.release as release
from precompute_cli.cli import main

reached, go, mode, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
real = execute.commit

def stopped(tmp, out, overwrite):
    reached.touch()
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the test never let this run go")
        time.sleep(0.01)
    return real(tmp, out, overwrite)

execute.commit = stopped
if mode == "two-renames":
    commit._renameat2 = lambda: None
release.default_verify = lambda: (lambda original, converted: {"passed": True})  # the proof is not the point here
main(args)
"""


@dataclass
class Stopped:
    proc: subprocess.Popen
    go: Path
    code: int | None = None
    err: str = ""

    def release(self) -> None:
        self.go.touch()

    def finish(self) -> None:
        _, err = self.proc.communicate(timeout=120)
        self.code, self.err = self.proc.returncode, err.decode()


@contextmanager
def stopped_run(barrier: Path, mode: str, *args) -> Iterator[Stopped]:
    """A real process held at its commit until the test calls `release` (or the block ends)."""
    barrier.mkdir(parents=True)
    reached = barrier / "reached"
    proc = subprocess.Popen([sys.executable, "-c", STOPPED, str(reached), str(barrier / "go"), mode,
                             *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run = Stopped(proc, barrier / "go")
    try:
        deadline = time.monotonic() + 120
        while not reached.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its commit: {proc.communicate()[1].decode()}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach its commit in 120 s")
            time.sleep(0.01)
        yield run
        run.release()
        run.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    """Two different checkpoints, and what each converts to (for comparing OUT with, byte for byte)."""
    found = {}
    for name, seed in (("a", 0), ("b", 1)):
        found[name] = write_llama(tmp_path / "sources" / name, vocab=64, hidden=16, seed=seed)
    return found


@pytest.fixture
def expected(tmp_path, sources, capsys) -> dict[str, dict]:
    trees = {}
    for name, src in sources.items():
        assert run(capsys, "convert", src, tmp_path / "expected" / name)[0] == 0
        trees[name] = tree(tmp_path / "expected" / name)
    return trees


@pytest.fixture(params=MODES)
def mode(request, monkeypatch) -> str:
    """How this process and the stopped one commit an --overwrite."""
    if request.param == "renameat2" and commit_module._renameat2() is None:
        pytest.skip("renameat2 is Linux's (glibc 2.28 and later)")
    if request.param == "two-renames":
        monkeypatch.setattr(commit_module, "_renameat2", lambda: None)
    return request.param


def overwriting(flag: bool) -> list[str]:
    return ["--overwrite"] if flag else []


# -- convert against convert ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stopped_overwrites", [False, True], ids=["stopped", "stopped-overwrite"])
@pytest.mark.parametrize("other_overwrites", [False, True], ids=["other", "other-overwrite"])
def test_a_run_stopped_before_its_commit_while_another_commits(capsys, tmp_path, sources, expected, mode,
                                                               stopped_overwrites, other_overwrites):
    """Run A checked that OUT was free and stopped before its commit; run B then converted another checkpoint into
    OUT. Without --overwrite A must not replace B's OUT: it exits 2 with the usual sentence and deletes its staging.
    With --overwrite, A's OUT replaces B's whole. Either way OUT is one complete conversion, and nothing is left."""
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    with stopped_run(tmp_path / "barrier", mode, "convert", sources["a"], out,
                     *overwriting(stopped_overwrites)) as a:
        assert not out.exists()
        code, _, err = run(capsys, "convert", sources["b"], out, *overwriting(other_overwrites))
        assert code == 0, err
        assert tree(out) == expected["b"]
    if stopped_overwrites:
        assert a.code == 0, a.err
        assert tree(out) == expected["a"]
    else:
        assert a.code == 2, a.err
        assert one_line(a.err, "error") == f"error: {out}: already exists and is not empty (use --overwrite to " \
                                           "replace it)"
        assert tree(out) == expected["b"]
    assert leftovers(out.parent) == [] and os.listdir(out.parent) == ["out"]
    assert run(capsys, "inspect", out, "--check")[0] == 0


@pytest.mark.parametrize("overwrite", [False, True], ids=["no-overwrite", "overwrite"])
def test_two_runs_released_together(capsys, tmp_path, sources, expected, mode, overwrite):
    """Both runs passed their check; both commit at once. Without --overwrite exactly one wins (0) and the other is
    refused (2); with it both succeed and OUT is one of the two conversions, whole, never a mixture."""
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    with stopped_run(tmp_path / "barrier-a", mode, "convert", sources["a"], out, *overwriting(overwrite)) as a, \
            stopped_run(tmp_path / "barrier-b", mode, "convert", sources["b"], out, *overwriting(overwrite)) as b:
        a.release()
        b.release()
        a.finish()
        b.finish()
    codes = {"a": a.code, "b": b.code}
    assert sorted(codes.values()) == ([0, 0] if overwrite else [0, 2]), (a.err, b.err)
    assert tree(out) in (expected["a"], expected["b"])
    if not overwrite:
        winner = next(name for name, code in codes.items() if code == 0)
        assert tree(out) == expected[winner]
        assert "already exists and is not empty" in (b.err if winner == "a" else a.err)
    assert leftovers(out.parent) == [] and os.listdir(out.parent) == ["out"]
    assert run(capsys, "inspect", out, "--check")[0] == 0


def test_overwrite_never_moves_out_away_where_renameat2_exists(capsys, tmp_path, sources, expected, monkeypatch):
    """With RENAME_EXCHANGE the old and the new OUT swap names in one call: OUT is never renamed aside, so a
    reader opening OUT at any moment finds a complete folder."""
    if commit_module._renameat2() is None:
        pytest.skip("renameat2 is Linux's (glibc 2.28 and later)")
    out = tmp_path / "out"
    assert run(capsys, "convert", sources["a"], out)[0] == 0
    renamed, exchanged = [], []
    real_rename, real_exchange = os.rename, commit_module._exchange
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append(Path(a)), real_rename(a, b)))
    monkeypatch.setattr(commit_module, "_exchange", lambda a, b: (exchanged.append(b), real_exchange(a, b))[1])
    assert run(capsys, "convert", sources["b"], out, "--overwrite")[0] == 0
    assert exchanged == [out] and out not in renamed
    assert tree(out) == expected["b"] and leftovers(tmp_path) == []


def test_overwrite_replaces_a_file_where_out_was(capsys, tmp_path, sources, expected, mode):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert run(capsys, "convert", sources["a"], out, "--overwrite")[0] == 0
    assert tree(out) == expected["a"] and leftovers(tmp_path) == []


def test_the_two_renames_wait_for_another_commit_to_finish(tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is missing, an --overwrite commit renames OUT aside and the new folder in: while
    another commit holds the lock on OUT's parent, it waits, touching nothing."""
    monkeypatch.setattr(commit_module, "_renameat2", lambda: None)
    out, staged = tmp_path / "out", tmp_path / ".out.precompute-tmp-1"
    for folder, text in ((out, "old"), (staged, "new")):
        folder.mkdir()
        (folder / "file").write_text(text)
    held = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as another conversion's commit would
    result: list[Path | None] = []
    worker = threading.Thread(target=lambda: result.append(commit_module.commit(staged, out, overwrite=True)))
    try:
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and (out / "file").read_text() == "old" and staged.exists()
    finally:
        os.close(held)
    worker.join(10)
    assert (out / "file").read_text() == "new"
    assert result == [tmp_path / f".out.precompute-old-{os.getpid()}"] and (result[0] / "file").read_text() == "old"


def test_exchange_is_refused_cleanly_where_the_file_system_lacks_it(tmp_path, monkeypatch):
    """EINVAL from renameat2 (a file system without RENAME_EXCHANGE) falls back to the two renames."""

    def einval(*args) -> int:
        import ctypes
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(commit_module, "_renameat2", lambda: einval)
    out, staged = tmp_path / "out", tmp_path / "staged"
    out.mkdir()
    staged.mkdir()
    (staged / "new").touch()
    old = commit_module.commit(staged, out, overwrite=True)
    assert (out / "new").exists() and old is not None and old.name.startswith(".out.precompute-old-")


# -- convert-all against convert-all -------------------------------------------------------------------------------

def release_file(folder: Path, sources: dict[str, Path]) -> Path:
    path = folder / "release.toml"
    path.write_text("".join(f'[[model]]\nname = "{name}"\npath = "{src}"\n\n' for name, src in sources.items()))
    return path


@pytest.fixture
def quick_verify(monkeypatch):
    monkeypatch.setattr(release, "default_verify", lambda: (lambda original, converted: {"passed": True}))


def test_a_second_convert_all_on_the_same_out_root_is_refused(capsys, tmp_path, sources, expected, mode,
                                                              quick_verify):
    """While one convert-all is converting into OUT_ROOT, another is refused at once, naming the first one's pid, and
    changes nothing there; the first finishes with a valid state file, and the next run skips what it did."""
    config = release_file(tmp_path, sources)
    root = tmp_path / "root"
    with stopped_run(tmp_path / "barrier", mode, "convert-all", config, root) as first:
        before = tree(root)
        code, _, err = run(capsys, "convert-all", config, root)
        assert code == 2
        assert one_line(err, "error") == f"error: {root}: another convert-all (pid {first.proc.pid}) is running on " \
                                         "this folder; wait for it to finish, or give this one another OUT_ROOT"
        assert tree(root) == before
    assert first.code == 0, first.err
    state = json.loads((root / STATE_NAME).read_text())
    assert sorted(state["models"]) == ["a", "b"]
    for name in sources:
        assert tree(root / name) == {**expected[name], "README.md": tree(root / name)["README.md"]}
        assert run(capsys, "inspect", root / name, "--check")[0] == 0
    code, _, err = run(capsys, "convert-all", config, root)
    assert code == 0, err
    assert json.loads((root / SUMMARY_NAME).read_text())["counts"] == {"converted": 0, "skipped": 2, "failed": 0}
    assert sorted(os.listdir(root)) == sorted([LOCK_NAME, STATE_NAME, "a", "b", SUMMARY_NAME])


def test_a_convert_all_killed_outright_does_not_hold_the_lock(capsys, tmp_path, sources, expected, quick_verify):
    """kill -9 leaves the lock file (with the dead pid) but not the lock: the next run goes ahead, and reaps the
    dead run's staging folder."""
    config = release_file(tmp_path, {"a": sources["a"]})
    root = tmp_path / "root"
    with stopped_run(tmp_path / "barrier", "renameat2", "convert-all", config, root) as first:
        assert f".a.precompute-tmp-{first.proc.pid}" in os.listdir(root)  # its staging folder
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        assert (root / LOCK_NAME).read_text() == f"{first.proc.pid}\n"
        code, _, err = run(capsys, "convert-all", config, root)
        assert code == 0, err
    assert sorted(os.listdir(root)) == sorted([LOCK_NAME, STATE_NAME, "a", SUMMARY_NAME])
    assert run(capsys, "inspect", root / "a", "--check")[0] == 0


def test_the_state_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing the new state (here, the disk filling at fsync) leaves the previous state file as
    it was and no temporary file."""
    path = tmp_path / STATE_NAME
    release._write_json(path, {"format": 1, "models": {"a": {}}})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        release._write_json(path, {"format": 1, "models": {"a": {}, "b": {}}})
    assert path.read_bytes() == before and os.listdir(tmp_path) == [STATE_NAME]
