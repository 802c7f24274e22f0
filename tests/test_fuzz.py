"""Fuzzing every reader with mutated checkpoints: each either accepts the input or raises InputError (exit 2).

Inputs start from a valid tiny Llama checkpoint and are broken at the byte level (random bytes, bit flips,
truncations, splices, a lying length prefix), at the header level (dtypes, shapes and offsets replaced by any JSON
value, entries dropped or added, the JSON text itself damaged) and in the index and config files. Each goes to
st_io.read_header and read_tensor, source resolution and Source.tensors, plan building, and `precompute inspect`;
when the plan accepts a file, `precompute convert` must succeed too, and when both we and the safetensors library
read a tensor, the values must agree. A hard timer turns a hang into a failure. Examples are derandomized so CI
sees the same inputs on every run.
"""

from __future__ import annotations

import json
import shutil
import signal
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import encode, header_of, llama_config, tensors
from tiny import run_cli as cli

from precompute_cli.errors import InputError
from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.source import resolve
from precompute_cli.st_io import read_header, read_tensor

ARRAYS = tensors(vocab=8, hidden=8, heads=2, kv_heads=1, dtype=np.float16)
HEADER, DATA = header_of(ARRAYS)
VALID = encode(HEADER, DATA)
CONFIG = llama_config(vocab=8, hidden=8, heads=2, kv_heads=1)
NAMES = list(ARRAYS)

FUZZ = settings(max_examples=120, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
offsets = st.integers(-2 ** 64, 2 ** 64) | st.integers(0, len(DATA) + 16)


# -- byte-level mutations ---------------------------------------------------------------------------------------

@st.composite
def mutated_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "flips", "truncate", "splice", "length"]))
    raw = bytearray(VALID)
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "flips":
        for pos in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    if kind == "truncate":
        return bytes(raw[:draw(st.integers(0, len(raw) - 1))])
    if kind == "splice":
        start = draw(st.integers(0, len(raw)))
        stop = draw(st.integers(start, min(len(raw), start + 64)))
        return bytes(raw[:start]) + draw(st.binary(max_size=64)) + bytes(raw[stop:])
    length = draw(st.integers(0, 2 ** 64 - 1) | st.integers(0, len(raw)))
    return length.to_bytes(8, "little") + bytes(raw[8:])


# -- header-level mutations -------------------------------------------------------------------------------------

@st.composite
def mutated_header(draw) -> bytes:
    header = json.loads(json.dumps(HEADER))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        kind = draw(st.sampled_from(["dtype", "shape", "reshape", "offsets", "field", "drop", "add", "metadata",
                                     "swap"]))
        entry = header[name] if name in header else header.setdefault(name, {})
        if kind == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3",
                                                   "I16", "I64", "Q4_K", "F4", "", "f16"]) | json_values)
        elif kind == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 2 ** 40) | st.integers(0, 16), max_size=3) | json_values)
        elif kind == "reshape" and isinstance(entry.get("shape"), list):  # same size: only the plan can object
            numel = int(np.prod(ARRAYS[name].shape))
            rows = draw(st.sampled_from([d for d in range(1, numel + 1) if numel % d == 0]))
            entry["shape"] = [rows, numel // rows]
        elif kind == "offsets":
            entry["data_offsets"] = draw(st.lists(offsets, min_size=2, max_size=2) | st.lists(offsets, max_size=3)
                                         | json_values)
        elif kind == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(json_values)
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "add":
            header[draw(st.text(max_size=12))] = draw(json_values | st.just(dict(entry)))
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        else:
            other = header.get(draw(st.sampled_from(NAMES)), {})
            if "data_offsets" in other and "data_offsets" in entry:
                entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    data = DATA
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
    text = json.dumps(header).encode()
    if draw(st.integers(0, 4)) == 0:  # damage the JSON text itself
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from([b"", b"{", b"]", b"\"", b",", b"\xff", b"\x00", b"9" * 5000])) \
            + text[pos + draw(st.integers(0, 3)):]
    return encode(text, data)


# -- the readers --------------------------------------------------------------------------------------------------

@contextmanager
def hard_timeout(seconds: int):
    """A hang becomes a failure instead of a stuck test run (the deadline alone only reports afterwards)."""
    def expire(signum, frame):
        raise AssertionError(f"a reader did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def safetensors_values(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library reads from the file, or None if it refuses it in any way."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def exercise(capsys, folder: Path, convert_out: Path) -> str:
    """Run every reader on folder; returns how far the input got. Anything but InputError propagates."""
    path = folder / "model.safetensors"
    with hard_timeout(30):
        try:
            header = read_header(path)
        except InputError as exc:
            assert str(path) in str(exc)
            header = None
        if header is not None:
            size = path.stat().st_size
            ranges = sorted((i.start, i.end) for i in header.tensors.values())
            assert all(header.data_start <= a <= b <= size for a, b in ranges)
            assert all(b <= c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))
            theirs = safetensors_values(path)
            for name, info in header.tensors.items():
                ours = read_tensor(path, info)
                assert tuple(ours.shape) == info.shape
                if theirs is not None and name in theirs:  # the stored bytes, whatever the dtype
                    assert ours.tobytes() == theirs[name].reshape(-1).view(torch.uint8).numpy().tobytes(), name
        reached = "header" if header is not None else "nothing"
        try:
            source = resolve(str(folder))
            source.tensors()
            plan = make_plan(source, load_recipe(source))
            reached = "plan"
        except InputError:
            plan = None
        code, out, err = cli(capsys, "inspect", folder, "--json")
        assert "Traceback" not in err
        assert code == (0 if plan is not None else 2), err
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), err
        else:
            assert json.loads(out)["precomputable"] is True
        if plan is not None:  # accepted by every reader: it must convert, and the output must check
            shutil.rmtree(convert_out, ignore_errors=True)
            code, _, err = cli(capsys, "convert", folder, convert_out)
            assert code == 0, err
            assert cli(capsys, "inspect", convert_out, "--check")[0] == 0
    return reached


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def test_the_unmutated_checkpoint_goes_all_the_way(capsys, folder, tmp_path):
    (folder / "model.safetensors").write_bytes(VALID)
    assert exercise(capsys, folder, tmp_path / "out") == "plan"


@FUZZ
@given(data=mutated_bytes())
def test_fuzz_file_bytes(capsys, folder, tmp_path, data):
    (folder / "model.safetensors").write_bytes(data)
    exercise(capsys, folder, tmp_path / "out")


@FUZZ
@given(data=mutated_header())
def test_fuzz_header_fields(capsys, folder, tmp_path, data):
    (folder / "model.safetensors").write_bytes(data)
    exercise(capsys, folder, tmp_path / "out")


@settings(FUZZ, max_examples=60)
@given(weight_map=json_values | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8),
                                               st.sampled_from(["model.safetensors", "other.safetensors", "",
                                                                "../model.safetensors", ".", "model.bin"])
                                               | json_values, max_size=4),
       index=st.sampled_from(["object", "weight_map_only", "raw"]))
def test_fuzz_index_file(capsys, folder, tmp_path, weight_map, index):
    (folder / "model.safetensors").write_bytes(VALID)
    (folder / "other.safetensors").write_bytes(encode({"__metadata__": {"format": "pt"}}, b""))
    body = {"object": {"metadata": {}, "weight_map": weight_map}, "weight_map_only": {"weight_map": weight_map},
            "raw": weight_map}[index]
    (folder / "model.safetensors.index.json").write_text(json.dumps(body))
    exercise(capsys, folder, tmp_path / "out")


CONFIG_KEYS = ["model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "num_hidden_layers", "rms_norm_eps", "tie_word_embeddings", "torch_dtype",
               "attention_bias", "quantization_config", "precompute", "rope_theta"]


@settings(FUZZ, max_examples=80)
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS),
                               json_values | st.integers(-1, 16) | st.sampled_from(["llama", "mistral", "qwen2",
                                                                                     "gpt2", "t5", "float16"]),
                               min_size=1, max_size=3))
def test_fuzz_config(capsys, folder, tmp_path, changes):
    (folder / "model.safetensors").write_bytes(VALID)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **changes}))
    with hard_timeout(30):
        code, _, err = cli(capsys, "inspect", folder, "--json")
        assert code in (0, 2) and "Traceback" not in err, err
        code, _, err = cli(capsys, "convert", folder, tmp_path / "out", "--overwrite")
        assert code in (0, 2) and "Traceback" not in err, err
