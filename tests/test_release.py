"""The release job on tiny local models and a Hub cache on disk: convert-all converts and verifies each model,
skips what is unchanged, writes byte-identical outputs when it does re-convert, and goes on past a broken model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import HfApi, constants
from test_hub import COMMIT_A, COMMIT_B, add_commit, files_of, run
from tiny import build, convert

import precompute_cli
from precompute_cli.errors import PrecomputeError
from precompute_cli.release import STATE_NAME, SUMMARY_NAME, load_entries

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"llama": build(root / "llama", "llama"), "qwen2": build(root / "qwen2", "qwen2", tie_word_embeddings=True),
            "llama-b": build(root / "llama-b", "llama", seed=1)}


def quick_verify(monkeypatch, fail: str | None = None) -> None:
    """Stand in for verify.py's proof (seconds per model) where a test is about the batch, not the proof; the
    first test runs the real one. `fail` names a model output folder whose verification fails."""

    def verify(original, converted: Path) -> dict:
        ok = converted.name != fail
        return {"passed": ok, "failure": None if ok else f"{converted} does not verify against {original.ref}"}

    monkeypatch.setattr("precompute_cli.release.default_verify", lambda: verify)


def release_file(folder: Path, text: str) -> Path:
    path = folder / "release.toml"
    path.write_text(text)
    return path


def summary(out_root: Path) -> dict:
    return json.loads((out_root / SUMMARY_NAME).read_text())


def outputs(out_root: Path) -> dict[str, dict[str, bytes]]:
    return {p.name: files_of(p) for p in sorted(out_root.iterdir()) if p.is_dir()}


def test_same_input_twice_gives_identical_bytes(tmp_path, models):
    for out in ("one", "two"):
        assert convert(models["llama"], tmp_path / out) == 0
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")


def test_batch_runs_verify_py_and_puts_its_result_in_the_card(tmp_path, models, capsys):
    config = release_file(tmp_path, f'[[model]]\npath = "{models["qwen2"]}"\n')
    code, err = run(capsys, "convert-all", str(config), str(tmp_path / "release"))
    assert code == 0, err
    (model,) = summary(tmp_path / "release")["models"]
    assert model["verify"]["passed"] is True and model["verify"]["greedy_identical"] is True
    card = (tmp_path / "release" / "qwen2" / "README.md").read_text()
    assert "and passed:" in card
    assert all(f"| {c['name']} | pass |" in card for c in model["verify"]["checks"])


def test_batch_skips_unchanged_and_reconverts_identically(tmp_path, models, cache, capsys, monkeypatch):
    quick_verify(monkeypatch)
    add_commit(cache, "org/tiny", COMMIT_A, files_of(models["llama"]))
    shutil.copytree(models["qwen2"], tmp_path / "local-qwen2")
    config = release_file(tmp_path, """
[[model]]
id = "org/tiny"
revision = "main"
dtype = "bfloat16"
repo = "me/tiny-precomputed"

[[model]]
path = "local-qwen2"
name = "qwen2"
""")
    out_root = tmp_path / "release"
    code, err = run(capsys, "convert-all", str(config), str(out_root))
    assert code == 0, err
    first = summary(out_root)
    assert first["counts"] == {"converted": 2, "skipped": 0, "failed": 0}
    hub_model, local_model = first["models"]
    assert hub_model["name"] == "tiny-precomputed" and hub_model["revision"] == COMMIT_A
    assert local_model["revision"].startswith("sha256:")
    for m in first["models"]:  # each was verified, and the card says so
        assert m["verify"]["passed"] is True
        assert "and passed:" in (out_root / m["name"] / "README.md").read_text()
    assert "me/tiny-precomputed" in (out_root / "tiny-precomputed" / "README.md").read_text()
    block = json.loads((out_root / "tiny-precomputed" / "config.json").read_text())["precompute"]
    assert block["source"] == {"id": "org/tiny", "revision": COMMIT_A} and block["dtype"] == "BF16"
    written = outputs(out_root)
    assert set(written) == {"tiny-precomputed", "qwen2"}
    mtimes = {p: p.stat().st_mtime_ns for p in out_root.rglob("*") if p.is_file() and p.parent != out_root}

    # unchanged source and tool: both skipped, nothing rewritten
    code, err = run(capsys, "convert-all", str(config), str(out_root))
    assert code == 0, err
    second = summary(out_root)
    assert second["counts"] == {"converted": 0, "skipped": 2, "failed": 0}
    assert [m["verify"]["passed"] for m in second["models"]] == [True, True]  # the recorded verify result
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # --force converts again: the same bytes, model card and checksums included
    code, err = run(capsys, "convert-all", str(config), str(out_root), "--force")
    assert code == 0, err
    assert summary(out_root)["counts"]["converted"] == 2
    assert outputs(out_root) == written

    # a new commit on main re-converts that model only; so does a new tool version, for all
    add_commit(cache, "org/tiny", COMMIT_B, files_of(models["llama-b"]))
    code, err = run(capsys, "convert-all", str(config), str(out_root))
    assert code == 0, err
    statuses = {m["name"]: (m["status"], m["revision"]) for m in summary(out_root)["models"]}
    assert statuses["tiny-precomputed"] == ("converted", COMMIT_B)
    assert statuses["qwen2"][0] == "skipped"
    monkeypatch.setattr(precompute_cli, "__version__", "99.0.0")
    code, err = run(capsys, "convert-all", str(config), str(out_root))
    assert code == 0, err
    assert summary(out_root)["counts"]["converted"] == 2

    # a deleted output is not "unchanged": it is converted again
    shutil.rmtree(out_root / "qwen2")
    code, err = run(capsys, "convert-all", str(config), str(out_root))
    assert {m["name"]: m["status"] for m in summary(out_root)["models"]} == {"tiny-precomputed": "skipped",
                                                                           "qwen2": "converted"}


def test_batch_goes_on_past_a_broken_model_and_fails_at_the_end(tmp_path, models, cache, capsys, monkeypatch):
    quick_verify(monkeypatch)
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    config = release_file(tmp_path, f"""
[[model]]
path = "{models['llama']}"
name = "first"

[[model]]
path = "broken"

[[model]]
id = "org/not-cached"

[[model]]
path = "{models['qwen2']}"
name = "last"
""")
    out_root = tmp_path / "release"
    code, err = run(capsys, "convert-all", str(config), str(out_root))
    assert code == 1
    assert "2 of 4 models failed" in err
    result = summary(out_root)
    assert result["counts"] == {"converted": 2, "skipped": 0, "failed": 2}
    status = {m["name"]: m for m in result["models"]}
    assert status["first"]["status"] == status["last"]["status"] == "converted"
    assert status["broken"]["status"] == "failed" and "model.safetensors" in status["broken"]["error"]
    assert "truncated" in status["broken"]["error"] or "data section" in status["broken"]["error"]
    assert status["not-cached"]["status"] == "failed" and "not in the local Hub cache" in status["not-cached"]["error"]
    assert not (out_root / "broken").exists() and not (out_root / "not-cached").exists()
    state = json.loads((out_root / STATE_NAME).read_text())
    assert set(state["models"]) == {"first", "last"}  # failures are retried next time
    # the next run retries exactly the failures
    code, err = run(capsys, "convert-all", str(config), str(out_root))
    assert code == 1
    assert {m["name"]: m["status"] for m in summary(out_root)["models"]} == {
        "first": "skipped", "broken": "failed", "not-cached": "failed", "last": "skipped"}


def test_a_verify_that_raises_fails_the_model_and_keeps_its_report(tmp_path, models, capsys, monkeypatch):
    """The conversion's report reaches the summary as soon as it exists, before a verify that may raise."""

    def verify(original, converted: Path) -> dict:
        raise PrecomputeError(f"{converted}: cannot load it")

    monkeypatch.setattr("precompute_cli.release.default_verify", lambda: verify)
    config = release_file(tmp_path, f'[[model]]\npath = "{models["llama"]}"\n')
    code, err = run(capsys, "convert-all", str(config), str(tmp_path / "release"))
    assert code == 1 and "1 of 1 models failed" in err
    (model,) = summary(tmp_path / "release")["models"]
    assert model["status"] == "failed" and "cannot load it" in model["error"] and model["verify"] is None
    assert model["report"]["model_type"] == "llama" and model["report"]["bytes_after"] > 0


def test_batch_push_publishes_each_verified_model_and_skips_what_is_on_the_hub(tmp_path, models, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    quick_verify(monkeypatch, fail="qwen2-pre")
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        assert kwargs["exist_ok"] is True
        uploads.append(("create", repo_id, kwargs.get("private")))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append(("upload", repo_id, sorted(files_of(Path(folder_path)))))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    config = release_file(tmp_path, f"""
[[model]]
path = "{models['llama']}"
repo = "me/llama-pre"
private = true

[[model]]
path = "{models['llama-b']}"

[[model]]
path = "{models['qwen2']}"
repo = "me/qwen2-pre"
""")
    out_root = tmp_path / "release"
    code, err = run(capsys, "convert-all", str(config), str(out_root), "--push")
    assert code == 1 and "1 of 3 models failed" in err
    # pushed: the first; converted, not pushed: the one without a repo; not pushed: the one that failed verify
    assert uploads == [("create", "me/llama-pre", True), ("upload", "me/llama-pre", uploads[1][2])]
    assert "README.md" in uploads[1][2]
    first, second, third = summary(out_root)["models"]
    assert first["pushed"] == "me/llama-pre" and first["url"].startswith("https://huggingface.co/me/llama-pre")
    assert second["status"] == "converted" and second["pushed"] is None and "not pushed" in " ".join(second["notes"])
    assert third["status"] == "failed" and "does not verify" in third["error"] and third["pushed"] is None
    # in CI the outputs do not survive between runs, the state does: what is on the Hub is not pushed again
    shutil.rmtree(out_root / "llama-pre")
    quick_verify(monkeypatch)
    code, err = run(capsys, "convert-all", str(config), str(out_root), "--push")
    assert code == 0, err
    assert [m["status"] for m in summary(out_root)["models"]] == ["skipped", "skipped", "converted"]
    assert [u[:2] for u in uploads[2:]] == [("create", "me/qwen2-pre"), ("upload", "me/qwen2-pre")]


@pytest.mark.parametrize("text, message", [
    ("", "lists no models"),
    ("[[model]]\nid = 'a/b'\npath = 'x'\n", "exactly one of `id`"),
    ("[[model]]\nid = 'a/b'\nrevison = 'main'\n", "unknown key 'revison'"),
    ("[[model]]\nid = 'a/b'\ndtype = 'int8'\n", "dtype 'int8'"),
    ("[[model]]\nid = 'a/b'\nrepo = 'x/y/z'\n", "not a valid Hub repository id"),
    ("[[model]]\nid = 'a/b'\n[[model]]\nid = 'c/b'\n", "both write to 'b'"),
    ("[[model]\n", "not a valid TOML file"),
])
def test_bad_release_file_is_exit_2(tmp_path, capsys, text, message):
    config = release_file(tmp_path, text)
    code, err = run(capsys, "convert-all", str(config), str(tmp_path / "out"))
    assert code == 2
    assert str(config) in err and message in err
    assert not (tmp_path / "out").exists()


def test_shipped_release_file_and_workflow():
    entries = load_entries(ROOT / "configs" / "release.toml")
    assert entries and all(e.on_hub and e.repo and e.dtype for e in entries)
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release-convert.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["release"]["types"] == ["published"]
    steps = workflow["jobs"]["convert"]["steps"]
    commands = " ".join(s.get("run", "") for s in steps)
    assert "make install" in commands and "convert-all configs/release.toml" in commands and "--push" in commands
    assert workflow["jobs"]["convert"]["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
