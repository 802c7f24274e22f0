"""Bad input gets one sentence naming the file and the problem, exit 2, no traceback, and nothing is written.

Each case starts from a small Llama checkpoint that converts cleanly (tests/synthetic.py) and breaks one thing.
"Nothing written" is checked on the whole test folder: after the failed run it holds exactly what it held before
(no OUT, no temporary folder beside it, the source untouched).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from synthetic import encode, header_of, tensors, write_llama
from tiny import run_cli as run
from transformers import GPT2Config, OPTConfig

EMBED = "model.embed_tokens.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: equal before and after means nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def refused(capsys, tmp_path: Path, src: Path | str, *words: str, command: str = "convert") -> str:
    """Run `command` on src; assert exit 2, one `error:` line holding every word, no traceback, nothing written."""
    before = tree(tmp_path)
    args = ["convert", src, tmp_path / "out"] if command == "convert" else ["inspect", src]
    code, out, err = run(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert tree(tmp_path) == before
    return lines[0]


@pytest.fixture
def src(tmp_path) -> Path:
    return write_llama(tmp_path / "src")


def rewrite_header(path: Path, edit) -> None:
    """Apply `edit(header)` to a safetensors file's header, keeping its data section."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    path.write_bytes(encode(header, raw[8 + n:]))


def set_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- config.json ---------------------------------------------------------------------------------------------------

def test_valid_checkpoint_converts(capsys, tmp_path, src):
    """The starting point of every case below is accepted: each failure is caused by the one defect it adds."""
    code, _, err = run(capsys, "convert", src, tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("named", ["folder", "file"])
def test_missing_config(capsys, tmp_path, src, named):
    (src / "config.json").unlink()
    ref = src if named == "folder" else src / "model.safetensors"
    refused(capsys, tmp_path, ref, str(src), "config.json")


@pytest.mark.parametrize("text, problem", [
    ("{\"model_type\": \"llama\",", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nesting deeper than the JSON parser's recursion limit
    ("{\"vocab_size\": " + "9" * 5000 + "}", "not valid JSON"),  # past Python's int-from-string digit limit
    ("[1, 2]", "JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_unparsable_config(capsys, tmp_path, src, text, problem):
    path = src / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(capsys, tmp_path, src, str(path), problem)
    refused(capsys, tmp_path, src, str(path), problem, command="inspect")


@pytest.mark.parametrize("change, tensor", [
    (dict(hidden_size=32), EMBED),  # the embedding is 32 x 16, the config says 32 x 32
    (dict(vocab_size=31), EMBED),
    (dict(num_key_value_heads=4), K),  # k_proj is 8 x 16; MHA would make it 16 x 16
    (dict(head_dim=8), Q),
])
def test_config_shapes_disagree_with_tensors(capsys, tmp_path, src, change, tensor):
    set_config(src, **change)
    line = refused(capsys, tmp_path, src, str(src / "model.safetensors"), tensor, "the config implies")
    assert "shape" in line


@pytest.mark.parametrize("change, words", [
    (dict(num_attention_heads=0), ("num_heads", "must be positive")),
    (dict(num_key_value_heads=0), ("num_kv_heads", "must be positive")),
    (dict(vocab_size=0), ("vocab_size", "must be positive")),
    (dict(hidden_size=-16), ("hidden_size", "non-negative integer")),
    (dict(hidden_size="16"), ("hidden_size",)),
    (dict(vocab_size=None), ("vocab_size is not set",)),
])
def test_config_values_that_make_no_sense(capsys, tmp_path, src, change, words):
    set_config(src, **change)
    refused(capsys, tmp_path, src, "config.json", *words)


# -- safetensors files --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep, problem", [
    (5, "shorter than its 8-byte header length"),
    (40, "more than the file holds"),  # cut inside the JSON header
    (-10, "runs past the end of the file"),  # cut inside the last tensor's data
])
def test_truncated_safetensors(capsys, tmp_path, src, keep, problem):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    refused(capsys, tmp_path, src, str(path), problem)
    refused(capsys, tmp_path, src, str(path), problem, command="inspect")


def _overlap(h):
    h[K]["data_offsets"] = list(h[Q]["data_offsets"][:1]) + [h[Q]["data_offsets"][0] + h[K]["data_offsets"][1]
                                                            - h[K]["data_offsets"][0]]


def _past_the_end(h):
    last = max((e for k, e in h.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][1])
    last["shape"][0] += 4
    last["data_offsets"][1] += 4 * last["shape"][-1] * 2 if len(last["shape"]) > 1 else 8


def _impossible_size(h):
    h[EMBED]["shape"] = [2 ** 40, 2 ** 40]


def _negative(h):
    h[EMBED]["data_offsets"] = [-64, 0]


def _gap(h):
    h.pop(Q)


@pytest.mark.parametrize("edit, problem", [
    (_overlap, "overlap"),
    (_past_the_end, "runs past the end of the file"),
    (_impossible_size, "claims"),
    (_negative, "invalid data_offsets"),
    (_gap, "leave a gap"),
])
def test_header_offsets_that_lie(capsys, tmp_path, src, edit, problem):
    path = src / "model.safetensors"
    rewrite_header(path, edit)
    refused(capsys, tmp_path, src, str(path), problem)
    refused(capsys, tmp_path, src, str(path), problem, command="inspect")


def test_header_length_beyond_the_file(capsys, tmp_path, src):
    path = src / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes((2 ** 64 - 1).to_bytes(8, "little") + raw[8:])
    refused(capsys, tmp_path, src, str(path), f"claims {2 ** 64 - 1} bytes")


@pytest.mark.parametrize("header", [
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
    b"\xff\xfe\x00{",
])
def test_header_json_the_parser_rejects(capsys, tmp_path, src, header):
    path = src / "model.safetensors"
    path.write_bytes(encode(header, b""))
    refused(capsys, tmp_path, src, str(path), "not valid JSON")


@pytest.mark.parametrize("dtype, problem", [
    ("Q4_K", "unknown dtype 'Q4_K'"),
    ("F4", "unknown dtype 'F4'"),
    ("I16", "only float checkpoints can be folded"),  # known, same size, but not a float
])
def test_embedding_dtype(capsys, tmp_path, src, dtype, problem):
    path = src / "model.safetensors"
    rewrite_header(path, lambda h: h[EMBED].update(dtype=dtype))
    refused(capsys, tmp_path, src, str(path), EMBED, problem)


def _write_sharded(folder: Path) -> Path:
    folder.mkdir()
    arrays = tensors(32, 16, 4, 2)
    names = list(arrays)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, members in shards.items():
        (folder / shard).write_bytes(encode(*header_of({n: arrays[n] for n in members})))
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text((write_llama(folder.parent / "single") / "config.json").read_text())
    return folder


def test_index_names_a_missing_shard(capsys, tmp_path):
    folder = _write_sharded(tmp_path / "sharded")
    code, _, err = run(capsys, "convert", folder, tmp_path / "ok")  # intact, it converts
    assert code == 0, err
    (folder / "model-00002-of-00002.safetensors").unlink()
    refused(capsys, tmp_path, folder, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing")


def test_index_and_shard_disagree(capsys, tmp_path):
    folder = _write_sharded(tmp_path / "sharded")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][Q] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    refused(capsys, tmp_path, folder, str(index), Q, "does not hold it")


def test_a_tensor_in_two_shards(capsys, tmp_path, src):
    """Two files (no index) that both hold the same tensors: which would a loader take? Refused, naming both."""
    (src / "model.safetensors").rename(src / "model-a.safetensors")
    (src / "model-b.safetensors").write_bytes((src / "model-a.safetensors").read_bytes())
    refused(capsys, tmp_path, src, "model-b.safetensors", "also appears in model-a.safetensors")


def test_hub_headers_are_refused_as_local_ones_are(monkeypatch):
    """The headers of an uncached Hub repo get the local checks: a dtype we cannot read, a name in two files."""
    from types import SimpleNamespace

    from precompute_cli import hub
    from precompute_cli.errors import InputError

    def serve(files):
        meta = SimpleNamespace(files_metadata={f: SimpleNamespace(tensors={n: SimpleNamespace(dtype=d, shape=[2])
                                                                             for n, d in t.items()})
                                               for f, t in files.items()})
        monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda *a, **k: meta)

    serve({"a.safetensors": {"w": "F16"}, "b.safetensors": {"v": "BF16"}})
    assert set(hub.remote_tensors("org/m", "main")) == {"w", "v"}
    serve({"a.safetensors": {"w": "Q4_K"}})
    with pytest.raises(InputError, match="org/m: a.safetensors on the Hub: tensor w has unknown dtype 'Q4_K'"):
        hub.remote_tensors("org/m", "main")
    serve({"a.safetensors": {"w": "F16"}, "b.safetensors": {"w": "F16"}})
    with pytest.raises(InputError, match="b.safetensors on the Hub: tensor w also appears in org/m: a.safetensors"):
        hub.remote_tensors("org/m", "main")


class _Payload:
    """Unpickling this creates a file: proof, if it ever appears, that something unpickled our input."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_only_pickled_weights_are_refused_unopened(capsys, tmp_path, src):
    (src / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    canary = tmp_path / "canary"  # the payload works: loading it does create its marker
    pickle.loads(pickle.dumps(_Payload(canary))).close()
    assert canary.exists()
    canary.unlink()
    refused(capsys, tmp_path, src, str(src), "pickled", "never unpickles")
    refused(capsys, tmp_path, src / "pytorch_model.bin", "pytorch_model.bin", "pickled", "never unpickles")
    refused(capsys, tmp_path, src, "pickled", command="inspect")
    assert not marker.exists()


def test_already_precomputed(capsys, tmp_path, src):
    done = tmp_path / "done"
    assert run(capsys, "convert", src, done)[0] == 0
    refused(capsys, tmp_path, done, str(done / "config.json"), "already precomputed")


# -- architectures ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=4),
    OPTConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, ffn_dim=32),
], ids=["gpt2", "opt"])
def test_absolute_positions_cannot_fold(capsys, tmp_path, src, config):
    config.to_json_file(src / "config.json")
    refused(capsys, tmp_path, src, str(src / "config.json"), config.model_type, "absolute position embeddings")
    code, out, err = run(capsys, "inspect", src, "--json")  # inspect explains instead of failing
    assert code == 0 and "Traceback" not in err
    data = json.loads(out)
    assert data["precomputable"] is False and "absolute position" in data["reason"]


@pytest.mark.parametrize("model_type, problem", [
    ("t5", "model_type 't5' has no recipe"),
    ("my_own_transformer", "has no recipe"),
    ("", "no model_type"),
])
def test_unknown_architecture(capsys, tmp_path, src, model_type, problem):
    set_config(src, model_type=model_type)
    line = refused(capsys, tmp_path, src, str(src / "config.json"), problem)
    if model_type:
        assert "supported: " in line and "llama" in line


def test_quantized_checkpoint(capsys, tmp_path, src):
    set_config(src, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    refused(capsys, tmp_path, src, str(src / "config.json"), "quantized checkpoint (gptq)")
    refused(capsys, tmp_path, src, "quantized", command="inspect")


# -- the Hub (no network: offline, or huggingface_hub patched to fail as the Hub would) ----------------------------

def test_hub_id_that_does_not_exist(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused(capsys, tmp_path, "no-such-org/no-such-model-1234", "no-such-org/no-such-model-1234",
            "not in the local Hub cache")
    refused(capsys, tmp_path, "./no/such/folder", "./no/such/folder", "no such file or folder")


def _hub_fails_with(monkeypatch, error: type[Exception], status: int) -> None:
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/m"))

    def snapshot_download(*args, **kwargs):
        raise error(f"{status} Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_hub_id_that_needs_a_token(capsys, tmp_path, monkeypatch):
    _hub_fails_with(monkeypatch, GatedRepoError, 403)
    refused(capsys, tmp_path, "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf", "gated", "HF_TOKEN")


def test_hub_id_private_or_missing_online(capsys, tmp_path, monkeypatch):
    _hub_fails_with(monkeypatch, RepositoryNotFoundError, 401)
    refused(capsys, tmp_path, "org/private-model", "org/private-model", "no such model on the Hub", "token")


# -- the message itself --------------------------------------------------------------------------------------------

def test_error_line_is_verbatim_even_with_brackets_in_the_path(capsys, tmp_path):
    """Paths are printed as they are: rich markup in them ([bold], [/]) neither styles nor swallows text."""
    src = write_llama(tmp_path / "[bold]weights[/]" / "src")
    (src / "config.json").write_text("{")
    line = refused(capsys, tmp_path, src, str(src / "config.json"), "not valid JSON")
    assert line.startswith(f"error: {src}/config.json: ")


def test_debug_shows_the_traceback(capsys, tmp_path, src):
    (src / "config.json").write_text("{")
    code, _, err = run(capsys, "convert", src, tmp_path / "out", "--debug")
    assert code == 2
    assert "Traceback" in err and "InputError" in err and "not valid JSON" in err


def test_dtype_of_numpy_helper_round_trips(tmp_path):
    """The synthetic files are what safetensors itself writes: the library reads them back bit for bit."""
    from safetensors.numpy import load_file

    arrays = tensors(8, 8, 2, 1, dtype=np.float32)
    path = tmp_path / "m.safetensors"
    path.write_bytes(encode(*header_of(arrays)))
    loaded = load_file(path)
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
