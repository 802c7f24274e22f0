"""The Hub both ways, offline: pulls run huggingface_hub's real code against a cache laid out on disk as the Hub's
is (models--ORG--NAME/blobs, snapshots/<commit>/ symlinks, refs/<branch or tag>); pushes patch HfApi's methods
and check what would be uploaded. No test reaches the network."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard, constants
from safetensors import safe_open
from tiny import build, convert, run_cli

from precompute_cli import hub, modelcard
from precompute_cli.block import PrecomputeBlock
from precompute_cli.st_io import read_header

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_commit(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)):
    """Lay a commit out as huggingface_hub's cache does: content-addressed blobs (sha256 for LFS files, the git
    blob sha1 otherwise), snapshot entries as relative symlinks to them, and refs files holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        lfs = name.endswith((".safetensors", ".bin"))
        blob_id = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / blob_id
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Two tiny Llama checkpoints with different weights (two commits of one repo), built once."""
    root = tmp_path_factory.mktemp("tiny")
    return {"a": build(root / "a", "llama", seed=0), "b": build(root / "b", "llama", seed=1)}


def run(capsys, *argv: str) -> tuple[int, str]:
    from precompute_cli.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    return code, " ".join(err.split())


def table(path: Path):
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return f.get_tensor("precompute.table")


def test_pull_from_cache_by_id(tmp_path, tiny, cache, capsys):
    add_commit(cache, "org/tiny", COMMIT_A, {**files_of(tiny["a"]), "pytorch_model.bin": b"never read",
                                             "README.md": b"# upstream card\n"})
    code, err = run(capsys, "convert", "org/tiny", str(tmp_path / "out"))
    assert code == 0, err
    block = json.loads((tmp_path / "out" / "config.json").read_text())["precompute"]
    assert block["source"] == {"id": "org/tiny", "revision": COMMIT_A}
    # the same bytes as converting the folder itself: the Hub path changes where files come from, nothing else
    assert convert(tiny["a"], tmp_path / "local") == 0
    assert files_of(tmp_path / "out")["model.safetensors"] == files_of(tmp_path / "local")["model.safetensors"]
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "generation_config.json" in names
    assert not names & {"pytorch_model.bin", "README.md"}


def test_revision_by_tag_and_by_commit(tmp_path, tiny, cache, capsys):
    add_commit(cache, "org/tiny", COMMIT_A, files_of(tiny["a"]), refs=("main",))
    add_commit(cache, "org/tiny", COMMIT_B, files_of(tiny["b"]), refs=("v2",))
    expected = {}
    for key in "ab":
        assert convert(tiny[key], tmp_path / f"local-{key}") == 0
        expected[key] = table(tmp_path / f"local-{key}")
    assert not bool((expected["a"] == expected["b"]).all())  # the two commits really differ
    for revision, commit, key in ((None, COMMIT_A, "a"), ("v2", COMMIT_B, "b"), (COMMIT_A, COMMIT_A, "a")):
        out = tmp_path / f"out-{revision}"
        code, err = run(capsys, "convert", "org/tiny", str(out), *(["--revision", revision] if revision else []))
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["precompute"]["source"]["revision"] == commit
        assert bool((table(out) == expected[key]).all())


def test_offline_flag_never_touches_the_network(tmp_path, tiny, cache, capsys, monkeypatch):
    add_commit(cache, "org/tiny", COMMIT_A, files_of(tiny["a"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # only --offline says so

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(HfApi, "repo_info", no_network)
    monkeypatch.setattr(HfApi, "list_repo_tree", no_network)
    code, err = run(capsys, "convert", "org/tiny", str(tmp_path / "out"), "--offline")
    assert code == 0, err
    assert hub.resolve_revision("org/tiny", offline=True) == COMMIT_A


@pytest.mark.parametrize("revision", [None, "v9"])
def test_missing_repo_or_revision_offline_is_exit_2(tmp_path, tiny, cache, capsys, revision):
    add_commit(cache, "org/tiny", COMMIT_A, files_of(tiny["a"]))
    repo = "org/absent" if revision is None else "org/tiny"
    code, err = run(capsys, "convert", repo, str(tmp_path / "out"), *(["--revision", revision] if revision else []))
    assert code == 2
    assert f"{repo}" in err and "not in the local Hub cache" in err and "offline mode forbids downloading" in err
    assert (f"revision '{revision}'" in err) == (revision is not None)
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_pickled_only_repo_is_refused(tmp_path, tiny, cache, capsys):
    add_commit(cache, "org/pickled", COMMIT_A, {"config.json": (tiny["a"] / "config.json").read_bytes(),
                                                "pytorch_model.bin": b"\x80\x04 not to be unpickled"})
    code, err = run(capsys, "convert", "org/pickled", str(tmp_path / "out"))
    assert code == 2
    assert "only pickled weights" in err and "never unpickles" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_from_cache_writes_nothing(tmp_path, tiny, cache, capsys):
    add_commit(cache, "org/tiny", COMMIT_A, files_of(tiny["a"]))
    before = sorted(str(p) for p in cache.rglob("*"))
    out = tmp_path / "out"
    code, err = run(capsys, "convert", "org/tiny", str(out), "--dry-run", "--push-to-hub", "me/tiny-pre", "--private")
    assert code == 0, err
    assert not out.exists()
    assert sorted(str(p) for p in cache.rglob("*")) == before  # not even a ref written into the cache
    assert f"at commit {COMMIT_A}: 0 bytes to fetch (all in the local cache)" in err
    assert "upload" in err and "me/tiny-pre (private)" in err and "README.md" in err
    # the predicted size matches what the conversion then does
    assert convert(tiny["a"], tmp_path / "real", "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert f"tensor bytes {report['bytes_before']:,} -> {report['bytes_after']:,}" in err


def serve_from_hub(monkeypatch, folder: Path, repo_id: str = "org/tiny") -> list[str]:
    """The online path, with the three Hub calls a look at an uncached repo makes answered from a local checkpoint
    (this checks our use of their results, not huggingface_hub's network code, which no offline test can reach):
    the dry-run listing (nothing cached), the safetensors headers, and hf_hub_download, which serves config.json
    alone. Returns the names hf_hub_download was asked for."""
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    downloaded: list[str] = []

    def snapshot_download(repo, *, revision, allow_patterns, token, dry_run):
        assert repo == repo_id and dry_run and "*.safetensors" in allow_patterns and "*.bin" not in allow_patterns
        return [SimpleNamespace(filename=n, file_size=s, commit_hash=COMMIT_A, will_download=True)
                for n, s in sizes.items()]

    def get_safetensors_metadata(repo, revision, token):
        assert repo == repo_id and revision == COMMIT_A
        files = {}
        for path in sorted(folder.glob("*.safetensors")):
            header = read_header(path)
            files[path.name] = SafetensorsFileMetadata(metadata=header.metadata, tensors={
                n: TensorInfo(t.dtype, list(t.shape), (t.start - header.data_start, t.end - header.data_start))
                for n, t in header.tensors.items()})
        weight_map = {n: f for f, meta in files.items() for n in meta.tensors}
        return SafetensorsRepoMetadata(None, len(files) > 1, weight_map, files)

    def hf_hub_download(repo, filename, revision, token, local_dir):
        assert repo == repo_id and revision == COMMIT_A and filename == "config.json"
        downloaded.append(filename)
        (Path(local_dir) / filename).write_bytes((folder / filename).read_bytes())
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return downloaded


def test_dry_run_of_an_uncached_repo_sizes_it_from_the_hub_headers(tmp_path, tiny, cache, capsys, monkeypatch):
    src = tiny["a"]
    serve_from_hub(monkeypatch, src)
    sizes = {p.name: p.stat().st_size for p in src.iterdir()}
    code, err = run(capsys, "convert", "org/tiny", str(tmp_path / "out"), "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "out").exists()
    assert f"{sum(sizes.values()):,} bytes to fetch" in err
    assert convert(src, tmp_path / "real", "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert f"tensor bytes {report['bytes_before']:,} -> {report['bytes_after']:,}" in err


def inspect_both(capsys, monkeypatch, folder: Path, *args: str) -> tuple[tuple[dict, dict], tuple[str, str]]:
    """`inspect` of org/tiny (served by serve_from_hub) and of the same checkpoint as a local folder: the --json
    objects, and the printed texts without their titles (the name given)."""
    results = []
    monkeypatch.chdir(folder.parent)
    for ref in ("org/tiny", folder.name):
        code, out, err = run_cli(capsys, "inspect", ref, "--json", *args)
        assert code == 0, err
        code, _, printed = run_cli(capsys, "inspect", ref, *args)
        assert code == 0, printed
        results.append((json.loads(out), " ".join(printed.split()).removeprefix(ref)))
    (remote, remote_text), (local, local_text) = results
    return (remote, local), (remote_text, local_text)


@pytest.mark.parametrize("sharded, args", [(False, ()), (False, ("--assume-parallel",)), (True, ())])
def test_inspect_of_an_uncached_repo_reads_only_its_config_and_headers(tmp_path, tiny, cache, capsys, monkeypatch,
                                                                       sharded, args):
    folder = tiny["a"]
    if sharded:
        from transformers import AutoModelForCausalLM

        folder = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(tiny["a"]).save_pretrained(folder, max_shard_size="150KB")
        assert len(list(folder.glob("*.safetensors"))) > 1
    downloaded = serve_from_hub(monkeypatch, folder)
    (remote, local), (remote_text, local_text) = inspect_both(capsys, monkeypatch, folder, *args)
    assert downloaded == ["config.json", "config.json"]  # once per run; never a weight file
    assert not any(cache.rglob("*"))  # nothing kept in the Hub cache either
    assert remote == local and remote_text == local_text
    assert remote["total_params_exact"] is True  # sized from the headers, not estimated from the config
    assert remote["precomputable"] and remote["removed"] and f"{remote['param_delta']:+,}" in remote_text


def test_inspect_of_an_uncached_converted_repo_shows_its_precompute_block(tmp_path, tiny, cache, capsys,
                                                                          monkeypatch):
    assert convert(tiny["a"], tmp_path / "converted") == 0
    downloaded = serve_from_hub(monkeypatch, tmp_path / "converted")
    (remote, local), (remote_text, local_text) = inspect_both(capsys, monkeypatch, tmp_path / "converted")
    assert downloaded == ["config.json", "config.json"]
    assert remote == local and remote_text == local_text
    assert remote["converted"] is True and remote["precompute"]["table"] == "precompute.table"


def test_inspect_of_a_repo_whose_headers_contradict_its_config_is_exit_2(tmp_path, tiny, cache, capsys,
                                                                         monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.safetensors").write_bytes((tiny["a"] / "model.safetensors").read_bytes())
    config = json.loads((tiny["a"] / "config.json").read_text())
    (served / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    serve_from_hub(monkeypatch, served)
    code, err = run(capsys, "inspect", "org/tiny")
    assert code == 2 and "org/tiny: tensor model.embed_tokens.weight has shape [211, 64], the config implies" in err


@pytest.mark.parametrize("online", [False, True])
def test_inspect_of_a_cached_repo_reads_the_cache(tiny, cache, capsys, monkeypatch, online):
    """Complete in the cache (or offline): the local path, as for a folder."""
    real_snapshot_download = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        if kwargs.pop("dry_run", False):  # online: the Hub's listing says every file is cached
            return [SimpleNamespace(filename=p.name, file_size=p.stat().st_size, commit_hash=COMMIT_A,
                                    will_download=False) for p in tiny["a"].iterdir()]
        assert kwargs["local_files_only"]
        return real_snapshot_download(repo_id, **kwargs)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", not online)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    add_commit(cache, "org/tiny", COMMIT_A, files_of(tiny["a"]))
    monkeypatch.chdir(tiny["a"].parent)
    answers = [run_cli(capsys, "inspect", ref, "--json") for ref in ("org/tiny", "a")]
    assert [code for code, _, _ in answers] == [0, 0], answers
    assert json.loads(answers[0][1]) == json.loads(answers[1][1])


def test_inspect_and_dry_run_of_a_cached_repo_with_the_hub_unreachable_read_the_cache(tmp_path, tiny, cache, capsys,
                                                                                    monkeypatch):
    """Not offline, but no network: the Hub's listing fails, and the cache answers, as it does for a download."""
    import httpx2

    def unreachable(*args, **kwargs):
        raise httpx2.ConnectError("no route to host")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    add_commit(cache, "org/tiny", COMMIT_A, files_of(tiny["a"]))
    monkeypatch.chdir(tiny["a"].parent)
    answers = [run_cli(capsys, "inspect", ref, "--json") for ref in ("org/tiny", "a")]
    assert [code for code, _, _ in answers] == [0, 0], answers
    assert json.loads(answers[0][1]) == json.loads(answers[1][1])
    code, err = run(capsys, "convert", "org/tiny", str(tmp_path / "out"), "--dry-run")
    assert code == 0, err
    assert f"at commit {COMMIT_A}: 0 bytes to fetch (all in the local cache)" in err
    code, err = run(capsys, "inspect", "org/absent")
    assert code == 2 and "not in the local Hub cache" in err and "the Hub cannot be reached" in err


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi.create_repo and upload_folder recorded instead of called; the README is read at upload time."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: dict[str, dict] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload_folder"] = {"repo_id": repo_id, "folder": folder, "files": files_of(folder), **kwargs}
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'c' * 40}")

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "repo_info", no_network)
    monkeypatch.setattr(HfApi, "list_repo_tree", no_network)
    return calls


def test_push_uploads_the_folder_with_a_model_card(tmp_path, tiny, capsys, fake_hub):
    out = tmp_path / "out"
    assert convert(tiny["a"], tmp_path / "first", "--json", str(tmp_path / "r.json")) == 0
    # pushing needs the network: --offline is refused before anything is converted
    code, err = run(capsys, "convert", str(tiny["a"]), str(out), "--offline", "--push-to-hub", "me/tiny-pre",
                    "--token", "hf_x")
    assert code == 2 and "uploading needs the network" in err and not out.exists() and not fake_hub
    code, err = run(capsys, "convert", str(tiny["a"]), str(out), "--push-to-hub", "me/tiny-pre", "--private",
                    "--token", "hf_x", "--verify")
    assert code == 0, err
    assert fake_hub["create_repo"]["repo_id"] == "me/tiny-pre"
    assert fake_hub["create_repo"]["private"] is True and fake_hub["create_repo"]["exist_ok"] is True
    upload = fake_hub["upload_folder"]
    assert upload["repo_id"] == "me/tiny-pre" and upload["folder"] == out
    assert "layer 0 of a precomputed" in upload["commit_message"]
    # everything the conversion wrote is uploaded as is (the same bytes as an earlier conversion), plus the card
    first = files_of(tmp_path / "first")
    assert set(upload["files"]) == set(first) | {"README.md"}
    assert all(upload["files"][n] == b for n, b in first.items())
    card = upload["files"]["README.md"].decode()
    report = json.loads((tmp_path / "r.json").read_text())
    assert "the local checkpoint `a`" in card
    assert f"| bytes | {report['bytes_before']:,} | {report['bytes_after']:,} |" in card
    assert f"{report['param_delta_pct']:+.2f}%" in card
    assert 'load_model("me/tiny-pre")' in card
    assert "precompute.table" in card and "model.layers.0.self_attn.q_proj.weight" in card
    assert "and passed:" in card and "| FAIL |" not in card  # --verify ran and its checks are in the card
    assert (out / "README.md").read_text() == card
    assert "pushed" in err


def test_push_needs_a_token_and_a_valid_repo_id(tmp_path, tiny, capsys, fake_hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, err = run(capsys, "convert", str(tiny["a"]), str(tmp_path / "out"), "--push-to-hub", "me/x")
    assert code == 2 and "no Hub token" in err
    code, err = run(capsys, "convert", str(tiny["a"]), str(tmp_path / "out"), "--push-to-hub", "me/x/y",
                    "--token", "hf_x")
    assert code == 2 and "not a valid Hub repository id" in err
    assert not (tmp_path / "out").exists() and not fake_hub


def _report_and_block(tmp_path, src: Path) -> tuple[dict, PrecomputeBlock]:
    assert convert(src, tmp_path / "out", "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    config = tmp_path / "out" / "config.json"
    return report, PrecomputeBlock.read(json.loads(config.read_text()), config)


def test_model_card_content_and_determinism(tmp_path, tiny):
    report, block = _report_and_block(tmp_path, tiny["a"])
    first = str(modelcard.build(report, block, "me/tiny-pre"))
    report2 = {**report, "seconds": report["seconds"] + 5.0, "out": "/elsewhere"}  # run-specific fields
    assert str(modelcard.build(report2, block, "me/tiny-pre")) == first
    card = ModelCard(first)
    assert card.data.tags == modelcard.TAGS and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local source is not a Hub model to link to
    assert "the local checkpoint `a`" in first and str(tiny["a"]) not in first
    assert "No numeric verification was run" in first
    for r in report["removed"]:
        assert f"`{r['name']}`" in first
    table_ref = report["added"][0]
    assert f"shape {table_ref['shape'][0]} x {table_ref['shape'][1]}, {table_ref['dtype']}" in first
    assert f"| parameters | {report['params_before']:,} | {report['params_after']:,} |" in first
    assert 'load_model("me/tiny-pre")' in first and "AutoTokenizer" not in first  # no tokenizer files here
    verify = {"dtype": "float32", "passed": False,
              "checks": [{"name": "logits", "passed": False, "value": "3e-2", "limit": "1e-4"},
                         {"name": "greedy text", "passed": True, "value": "identical", "limit": "identical"}]}
    failed = str(modelcard.build(report, block, None, verify))
    assert "and FAILED:" in failed and "| logits | FAIL | 3e-2 | 1e-4 |" in failed
    assert 'load_model("path/to/this/folder")' in failed
    written = modelcard.write(tmp_path / "out", modelcard.build(report, block, "me/tiny-pre"))
    assert written.read_text() == first
    hub_block = replace(block, source="org/tiny", revision=COMMIT_A)
    linked = str(modelcard.build(report, hub_block, "me/tiny-pre"))
    assert ModelCard(linked).data.base_model == "org/tiny"
    assert f"[org/tiny](https://huggingface.co/org/tiny) at commit `{COMMIT_A}`" in linked


def test_partial_snapshot_offline_is_exit_2(tmp_path, tiny, cache, capsys):
    """huggingface_hub remembers a commit's file listing (trees/<commit>.json); a snapshot missing a listed file
    (an interrupted download) is refused rather than converted without it."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    files = files_of(tiny["a"])
    add_commit(cache, "org/tiny", COMMIT_A, {n: b for n, b in files.items() if n != "model.safetensors"})
    write_tree_cache(str(cache / "models--org--tiny"), COMMIT_A,
                     {n: TreeCacheEntry(size=len(b), blob_id="0" * 40) for n, b in files.items()})
    code, err = run(capsys, "convert", "org/tiny", str(tmp_path / "out"))
    assert code == 2
    assert "holds only part of this snapshot, and offline mode forbids downloading the rest" in err
    assert not (tmp_path / "out").exists()


def test_shards_copied_whole_from_the_cache_keep_the_sha256_the_hub_published(tmp_path, cache, capsys):
    """Whole shards are not re-hashed: the manifest takes the blob's name (the LFS sha256). A blob whose bytes
    no longer match its name is then caught by `inspect --check`, as a re-hash would not have caught it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build(tmp_path / "single", "llama"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    files = files_of(tmp_path / "sharded")
    add_commit(cache, "org/sharded", COMMIT_A, files)
    code, err = run(capsys, "convert", "org/sharded", str(tmp_path / "out"))
    assert code == 0, err
    manifest = dict(line.split()[::-1] for line in (tmp_path / "out" / "SHA256SUMS").read_text().splitlines())
    whole = [n for n in files if n.endswith(".safetensors") and (tmp_path / "out" / n).read_bytes() == files[n]]
    assert whole, "the tiny model should have a shard without layer 0 or the embedding"
    for name in whole:
        assert manifest[name] == hashlib.sha256(files[name]).hexdigest()

    # The same checkpoint with one unchanged shard's blob damaged after download (its name is the Hub's sha256).
    repo = cache / "models--org--sharded"
    blob = (repo / "snapshots" / COMMIT_A / whole[0]).resolve()
    damaged = bytearray(blob.read_bytes())
    damaged[-1] ^= 0xFF  # a flipped bit in the data section: headers and sizes still agree
    blob.write_bytes(bytes(damaged))
    code, err = run(capsys, "convert", "org/sharded", str(tmp_path / "out2"))
    assert code == 0, err
    code, err = run(capsys, "inspect", "--check", str(tmp_path / "out2"))
    assert code == 2 and f"{whole[0]} (changed)" in err


def test_the_plan_carries_each_whole_shards_published_sha256(tmp_path, cache):
    """The executor takes a copied shard's digest from the plan: the Hub's (its blob's name) for a cached snapshot,
    none for a plain folder (the writer then hashes the bytes it copies)."""
    from transformers import AutoModelForCausalLM

    from precompute_cli.plan import load_recipe, make_plan
    from precompute_cli.source import resolve

    model = AutoModelForCausalLM.from_pretrained(build(tmp_path / "single", "llama"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    files = files_of(tmp_path / "sharded")
    add_commit(cache, "org/sharded", COMMIT_A, files)
    for ref, from_hub in (("org/sharded", True), (str(tmp_path / "sharded"), False)):
        src = resolve(ref)
        plan = make_plan(src, load_recipe(src))
        whole = [s for s in plan.shards if s.unchanged]
        assert whole and len(whole) < len(plan.shards)
        for shard in plan.shards:
            expected = hashlib.sha256(files[shard.source.name]).hexdigest() if from_hub else None
            assert shard.published_sha256 == expected
