"""A conversion that cannot fit is refused before it writes, naming both sizes; one that runs out of space anyway
(the disk filled by someone else meanwhile) leaves the old OUT and nothing else.

The free space is patched where that is the point; where the test may mount a small tmpfs (root on Linux), the
same is also done end to end on a real full file system.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import encode, header_of, tensors, write_llama
from test_atomic import tree
from tiny import run_cli as run

import precompute_cli.execute as execute_module
from precompute_cli import space
from precompute_cli.plan import METADATA_MARGIN, load_recipe, make_plan
from precompute_cli.source import resolve


def planned(src: Path, link: bool = False) -> int:
    source = resolve(str(src))
    return make_plan(source, load_recipe(source)).output_bytes(link)


def written(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir())


def write_sharded(folder: Path) -> Path:
    """Layer 0 in the first shard; the second (o_proj, the final norm) is copied whole, or hard-linked."""
    folder.mkdir(parents=True)
    arrays = tensors(1024, 64, 4, 2, np.float16)
    names = list(arrays)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, members in shards.items():
        (folder / shard).write_bytes(encode(*header_of({n: arrays[n] for n in members})))
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text((write_llama(folder.parent / "config-from", 1024, 64) / "config.json")
                                        .read_text())
    return folder


@pytest.fixture
def src(tmp_path) -> Path:
    """About 0.4 MB converted."""
    return write_llama(tmp_path / "src", vocab=1024, hidden=64, heads=4, kv_heads=2)


def refusal(err: str) -> re.Match:
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, err
    found = re.fullmatch(r"error: (.+): not enough free space: the output needs (.+), (.+) free on its file system; "
                         r"nothing was written", line)
    assert found, err
    return found


@pytest.mark.parametrize("sizes, shown", [
    ((15_234_000_000, 9_812_000_000), ("15.2 GB", "9.8 GB")),
    ((2_500_000_000_000, 310_000_000), ("2.5 TB", "310.0 MB")),
    ((58_400, 1_234), ("58.4 kB", "1.2 kB")),
    ((999, 12), ("999 bytes", "12 bytes")),
    ((9_812_000_001, 9_811_999_000), ("9,812,000,001 bytes", "9,811,999,000 bytes")),  # both would read 9.8 GB
])
def test_sizes_are_shown_as_disks_are_sold(sizes, shown):
    assert space._sizes(*sizes) == shown


def test_the_plan_sizes_the_output(tmp_path, src, capsys):
    """What the pre-flight check asks for is what the conversion then writes, give or take the margin for the
    few bytes it does not size exactly (config.json's new block, SHA256SUMS)."""
    sharded = write_sharded(tmp_path / "sharded")
    for folder in (src, sharded):
        out = tmp_path / "out" / folder.name
        assert run(capsys, "convert", folder, out)[0] == 0
        assert 0 <= planned(folder) - written(out) <= METADATA_MARGIN
    whole = (sharded / "model-00002-of-00002.safetensors").stat().st_size
    assert planned(sharded) - planned(sharded, link=True) == whole


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_an_output_that_does_not_fit_is_refused_before_writing(capsys, tmp_path, src, monkeypatch, overwrite):
    out = tmp_path / "deeper" / "out"
    if overwrite:  # the old OUT stays until the commit, so it frees nothing in time: the same space is needed
        out.parent.mkdir()
        assert run(capsys, "convert", src, out)[0] == 0
    needed = planned(src)
    monkeypatch.setattr(space, "free_bytes", lambda folder: needed - 1)
    staged = []
    monkeypatch.setattr(execute_module, "_staging", lambda *args: staged.append(args))
    before = tree(tmp_path)
    code, _, err = run(capsys, "convert", src, out, *(["--overwrite"] if overwrite else []))
    assert code == 1
    assert refusal(err).groups() == (str(out), f"{needed:,} bytes", f"{needed - 1:,} bytes")  # same in kB
    assert staged == []  # refused before a staging folder was made
    assert tree(tmp_path) == before  # not even OUT's parent folder


def test_link_needs_no_space_for_the_files_it_links(capsys, tmp_path, monkeypatch):
    """--link hard-links the unchanged shard, so its bytes are not asked for; without --link they are."""
    sharded = write_sharded(tmp_path / "sharded")
    linked = planned(sharded, link=True)
    monkeypatch.setattr(space, "free_bytes", lambda folder: linked)
    code, _, err = run(capsys, "convert", sharded, tmp_path / "copied")
    assert code == 1 and refusal(err).groups()[1:] == (space._size(planned(sharded)), space._size(linked))
    assert not (tmp_path / "copied").exists()
    code, _, err = run(capsys, "convert", sharded, tmp_path / "linked", "--link")
    assert code == 0, err
    shard = "model-00002-of-00002.safetensors"
    assert (tmp_path / "linked" / shard).stat().st_ino == (sharded / shard).stat().st_ino


# -- a real small file system --------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs, where this test may mount one (root on Linux); skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)]).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Take the tmpfs's free space down to about `leave` bytes."""
    with open(disk / "filler", "wb") as f:
        f.write(bytes(shutil.disk_usage(disk).free - leave))


def test_full_disk_end_to_end(capsys, tmp_path, src, small_disk, monkeypatch):
    """On a real 1 MiB tmpfs: a conversion fits and passes its check; with the disk then nearly full, the next one
    (--overwrite) is refused before writing, naming both sizes; and one let past the check (the disk filled after
    it, as by another writer) fails at ENOSPC, leaving the first OUT byte for byte and no staging folder."""
    out = small_disk / "out"
    code, _, err = run(capsys, "convert", src, out)
    assert code == 0, err
    assert run(capsys, "inspect", out, "--check")[0] == 0
    fill(small_disk, 100_000)
    before = tree(small_disk)
    free = shutil.disk_usage(small_disk).free

    code, _, err = run(capsys, "convert", src, out, "--overwrite")
    assert code == 1
    found = refusal(err)
    assert found.group(1) == str(out) and found.group(3) == f"{free / 1e3:.1f} kB"
    assert found.group(2) == f"{planned(src) / 1e3:.1f} kB"
    assert tree(small_disk) == before

    monkeypatch.setattr(space, "free_bytes", lambda folder: 1 << 40)  # the check passes; the disk is still full
    code, _, err = run(capsys, "convert", src, out, "--overwrite")
    assert code == 1
    assert err.strip() == f"error: {out}: no space left on the device while writing the output; nothing was written"
    assert tree(small_disk) == before
    assert shutil.disk_usage(small_disk).free == free  # no staging folder holding blocks either
