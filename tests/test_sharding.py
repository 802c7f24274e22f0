"""Sharded checkpoints: mirrored shards, --max-shard-size, --link, and the writers' byte-exact output."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from tiny import assert_equivalent, build, convert
from transformers import AutoModelForCausalLM

from precompute_cli import portable
from precompute_cli.plan import parse_size
from precompute_cli.st_io import read_header

INDEX = "model.safetensors.index.json"
TABLE = "precompute.table"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same tiny Llama saved as one file and as three shards by transformers itself."""
    base = tmp_path_factory.mktemp("sharding")
    single = build(base / "single", "llama")
    model = AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(base / "sharded", max_shard_size="150KB")
    shards = sorted(p.name for p in (base / "sharded").glob("*.safetensors"))
    assert len(shards) == 3, shards
    return single, base / "sharded"


def _raw(path, info) -> bytes:
    with open(path, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def _tensor(path, name) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


def _source_tensors(folder) -> dict:
    return {name: (p, info) for p in folder.glob("*.safetensors") for name, info in read_header(p).tensors.items()}


def _check_output(src_folder, out) -> tuple[dict, str]:
    """Index, headers and bytes of a converted folder against its source; returns {tensor: file} and the table's."""
    block = json.loads((out / "config.json").read_text())["precompute"]
    files = sorted(out.glob("*.safetensors"))
    where = {name: p.name for p in files for name in read_header(p).tensors}
    before = _source_tensors(src_folder)
    assert set(where) == (set(before) - set(block["removed"])) | {TABLE}
    sources = {q.read_bytes() for q in src_folder.glob("*.safetensors")}
    for p in files:
        header = read_header(p)
        for name, info in header.tensors.items():
            if name != TABLE:  # every kept tensor byte for byte
                assert _raw(p, info) == _raw(*before[name]), name
        if p.read_bytes() not in sources:  # a file we wrote (not a whole copy): its data starts on a cache line
            assert header.data_start % 64 == 0, p.name
        with safe_open(p, framework="pt") as f:  # and the safetensors library reads every file we wrote
            assert set(f.keys()) == set(read_header(p).tensors)
    if len(files) > 1:
        index = json.loads((out / INDEX).read_text())
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == sum(i.nbytes for p in files for i in read_header(p).tensors.values())
    else:
        assert not (out / INDEX).exists()
    return where, where[TABLE]


def _report_hashes_match(report_path, out) -> None:
    report = json.loads(report_path.read_text())
    listed = {f["name"]: f["sha256"] for f in report["files"]}
    assert {p.name for p in out.glob("*.safetensors")} <= set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_mirrors_source_shards(sources, tmp_path):
    single, sharded = sources
    out = tmp_path / "out"
    assert convert(sharded, out, "--json", str(tmp_path / "report.json")) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))
    _, table_file = _check_output(sharded, out)
    source_index = json.loads((sharded / INDEX).read_text())["weight_map"]
    assert table_file == source_index["model.embed_tokens.weight"]  # the table goes where the embedding was
    removed = set(json.loads((out / "config.json").read_text())["precompute"]["removed"])
    for p in sharded.glob("*.safetensors"):  # a shard that loses nothing and gains nothing is the same file
        if not removed & set(read_header(p).tensors):
            assert (out / p.name).read_bytes() == p.read_bytes()
    _report_hashes_match(tmp_path / "report.json", out)
    assert convert(single, tmp_path / "one") == 0
    assert torch.equal(_tensor(out / table_file, TABLE), _tensor(tmp_path / "one" / "model.safetensors", TABLE))


def test_max_shard_size_reshards(sources, tmp_path):
    single, sharded = sources
    out = tmp_path / "out"
    assert convert(sharded, out, "--max-shard-size", "100KB", "--json", str(tmp_path / "report.json")) == 0
    where, table_file = _check_output(sharded, out)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) >= 4
    assert [p.name for p in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                       for i in range(1, len(files) + 1)]
    for p in files:
        tensors = read_header(p).tensors.values()
        assert len(tensors) == 1 or sum(i.nbytes for i in tensors) <= 100_000, p.name
    assert [n for n, f in where.items() if f == table_file] == [TABLE]  # 162 KB: a file of its own
    _report_hashes_match(tmp_path / "report.json", out)
    assert_equivalent(sharded, out)


def test_max_shard_size_can_merge_into_one_file(sources, tmp_path):
    _, sharded = sources
    out = tmp_path / "out"
    assert convert(sharded, out, "--max-shard-size", "1GiB") == 0
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    _check_output(sharded, out)
    assert_equivalent(sharded, out)


def test_link_hard_links_unchanged_shards_only(sources, tmp_path):
    _, sharded = sources
    assert convert(sharded, tmp_path / "copied") == 0
    assert convert(sharded, tmp_path / "linked", "--link") == 0
    removed = set(json.loads((tmp_path / "linked" / "config.json").read_text())["precompute"]["removed"])
    index = json.loads((sharded / INDEX).read_text())["weight_map"]
    changed = {index[n] for n in removed} | {index["model.embed_tokens.weight"]}
    unchanged = {p.name for p in sharded.glob("*.safetensors")} - changed
    assert unchanged and changed
    for p in sharded.glob("*.safetensors"):
        linked, copied = os.stat(tmp_path / "linked" / p.name), os.stat(tmp_path / "copied" / p.name)
        assert copied.st_ino != p.stat().st_ino and copied.st_nlink == 1
        if p.name in unchanged:
            assert linked.st_ino == p.stat().st_ino and linked.st_nlink >= 2
        else:
            assert linked.st_ino != p.stat().st_ino and linked.st_nlink == 1
    for name in ("config.json", INDEX):
        assert os.stat(tmp_path / "linked" / name).st_nlink == 1
    _check_output(sharded, tmp_path / "linked")


def test_on_the_plain_path(sources, tmp_path):
    """Without the fast paths (Windows has none: no preadv, no O_DIRECT, no glibc), reads seek and read, writes go
    through the page cache, and the bytes come out the same."""
    _, sharded = sources
    with portable.plain():
        assert convert(sharded, tmp_path / "out") == 0
    _check_output(sharded, tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_gpu_is_refused(sources, tmp_path):
    assert convert(sources[1], tmp_path / "out", "--device", "cuda") == 2
    assert not (tmp_path / "out").exists()


def test_bad_max_shard_size_is_refused(sources, tmp_path):
    assert convert(sources[1], tmp_path / "out", "--max-shard-size", "lots") == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("4GiB", 4 << 30),
                                        ("1.5kb", 1500), ("123", 123), (" 7 MiB ", 7 << 20)])
def test_parse_size(text, size):
    assert parse_size(text) == size
