"""The release workflow runs one job per model: its matrix comes from the release file, each job checks its disk
before downloading and converts with `convert-all --only NAME`, and the last job merges every job's summary."""

from __future__ import annotations

import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import yaml
from test_hub import run
from test_release import quick_verify, release_file, summary
from tiny import build

from precompute_cli.release import SUMMARY_NAME

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import release_jobs  # noqa: E402


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    build(root / "a", "llama")
    build(root / "b", "qwen2", seed=1)
    return release_file(root, '[[model]]\npath = "a"\nname = "first"\n[[model]]\npath = "b"\nname = "second"\n')


def test_matrix_has_one_job_per_model(two_models, capsys):
    assert release_jobs.main(["matrix", str(two_models)]) == 0
    jobs = json.loads(capsys.readouterr().out)["include"]
    assert [j["name"] for j in jobs] == ["first", "second"]
    shipped = release_jobs.matrix(ROOT / "configs" / "release.toml")["include"]
    assert len(shipped) == 4 and all("/" in j["source"] for j in shipped)


def test_only_converts_the_one_model_named(two_models, tmp_path, capsys, monkeypatch):
    quick_verify(monkeypatch)
    code, err = run(capsys, "convert-all", str(two_models), str(tmp_path / "out"), "--only", "second")
    assert code == 0, err
    assert [m["name"] for m in summary(tmp_path / "out")["models"]] == ["second"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["second"]
    code, err = run(capsys, "convert-all", str(two_models), str(tmp_path / "out"), "--only", "third")
    assert code == 2 and "no model named 'third'" in err and "first, second" in err


def test_disk_check_passes_with_room_and_fails_with_a_sentence_without(two_models, tmp_path, capsys, monkeypatch):
    out_root = tmp_path / "out"
    assert release_jobs.main(["check-disk", str(two_models), "first", str(out_root)]) == 0
    assert "the disk has room" in capsys.readouterr().out
    download, output = release_jobs.needed_bytes(next(e for e in release_jobs.release.load_entries(two_models)
                                                      if e.name == "first"))
    assert download == 0 and output > 100_000  # a local source downloads nothing; the output is its tensors
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    assert release_jobs.main(["check-disk", str(two_models), "first", str(out_root)]) == 1
    err = capsys.readouterr().err
    assert "first: needs 1.1 GB of free disk" in err and "this runner has 0.0 GB" in err
    assert release_jobs.main(["check-disk", str(two_models), "third", str(out_root)]) == 1


def test_summary_merges_every_job_and_counts_a_missing_one_as_failed(two_models, tmp_path, capsys, monkeypatch):
    quick_verify(monkeypatch)
    code, err = run(capsys, "convert-all", str(two_models), str(tmp_path / "job-first"), "--only", "first")
    assert code == 0, err
    artifacts = tmp_path / "artifacts" / "release-summary-first"
    artifacts.mkdir(parents=True)
    shutil.copy(tmp_path / "job-first" / SUMMARY_NAME, artifacts / SUMMARY_NAME)
    assert release_jobs.main(["summary", str(two_models), str(tmp_path / "artifacts")]) == 1  # second: no summary
    merged = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["status"]) for m in merged["models"]] == [("first", "converted"), ("second", "failed")]
    assert merged["counts"] == {"converted": 1, "skipped": 0, "failed": 1}
    assert "ended before converting" in merged["models"][1]["error"]


def test_release_workflow_runs_one_job_per_model_and_checks_the_disk_first():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release-convert.yml").read_text())
    jobs = workflow["jobs"]
    assert "release_jobs.py matrix configs/release.toml" in jobs["plan"]["steps"][-1]["run"]
    assert jobs["convert"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    runs = [s.get("run", "") for s in jobs["convert"]["steps"]]
    disk = next(i for i, r in enumerate(runs) if "check-disk" in r)
    convert = next(i for i, r in enumerate(runs) if "convert-all" in r)
    assert disk < convert and '--only "${{ matrix.name }}"' in runs[convert]
    assert "release_jobs.py summary" in " ".join(s.get("run", "") for s in jobs["summary"]["steps"])
    assert jobs["summary"]["if"].startswith("always()")


def test_test_workflow_covers_three_platforms_and_the_floors():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "test.yml").read_text())
    assert set(workflow["jobs"]["suite"]["strategy"]["matrix"]["os"]) == {"ubuntu-latest", "macos-latest",
                                                                          "windows-latest"}
    assert "make test-floors" in " ".join(s.get("run", "") for s in workflow["jobs"]["floors"]["steps"])
