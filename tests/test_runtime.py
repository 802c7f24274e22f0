"""The runtime: load_model refuses incomplete checkpoints, takes from_pretrained's arguments, and the model works
wherever the original does (pipelines, chat templates, sampling, padded batches, the base model called again); it
refuses inputs that would bypass or corrupt the table lookup."""

from __future__ import annotations

import copy
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import build, convert, run_cli
from transformers import AutoModelForCausalLM

from precompute_cli import load_model
from precompute_cli.errors import InputError


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptj")
    src = build(tmp / "src", "gptj", n_embd=64, n_head=4, n_layer=2, rotary_dim=8, n_positions=128)
    assert convert(src, tmp / "out") == 0
    return load_model(tmp / "out")


def test_token_type_ids_are_refused_not_silently_wrong(gptj):
    """GPT-J adds wte(token_type_ids): a second lookup that would overwrite layer 0's rows."""
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(RuntimeError, match="token_type_ids"):
        gptj(ids, token_type_ids=torch.zeros_like(ids))
    assert gptj(ids).logits.shape == (1, 4, 211)  # the model still works afterwards


def test_inputs_embeds_are_refused(gptj):
    with pytest.raises(RuntimeError, match="input_ids"):
        gptj(inputs_embeds=torch.zeros(1, 3, 64))


# -- load_model refuses what would leave random weights, and takes from_pretrained's arguments -------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (untied, so its embedding is removed too), converted; and the original."""
    tmp = tmp_path_factory.mktemp("llama")
    src = build(tmp / "src", "llama", tie_word_embeddings=False)
    assert convert(src, tmp / "out") == 0
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    return src, tmp / "out", original, load_model(tmp / "out")


def _edited(out: Path, dest: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of a converted folder whose safetensors file lost `drop` and gained `add`."""
    shutil.copytree(out, dest)
    weights = load_file(dest / "model.safetensors")
    if drop:
        del weights[drop]
    weights.update(add or {})
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_a_lost_tensor_outside_layer_0_is_refused(llama, tmp_path):
    _, out, _, _ = llama
    broken = _edited(out, tmp_path / "broken", drop="model.layers.1.mlp.down_proj.weight")
    with pytest.raises(InputError, match=r"lacks model\.layers\.1\.mlp\.down_proj\.weight .*random"):
        load_model(broken)


def test_a_lost_head_is_refused(llama, tmp_path):
    _, out, _, _ = llama
    with pytest.raises(InputError, match=r"lacks lm_head\.weight"):
        load_model(_edited(out, tmp_path / "broken", drop="lm_head.weight"))


def test_an_unexpected_tensor_is_refused(llama, tmp_path):
    _, out, _, _ = llama
    broken = _edited(out, tmp_path / "extra", add={"model.layers.1.mlp.extra.weight": torch.zeros(3)})
    with pytest.raises(InputError, match=r"holds model\.layers\.1\.mlp\.extra\.weight"):
        load_model(broken)


def test_a_tensor_of_the_wrong_shape_is_refused(llama, tmp_path):
    _, out, _, _ = llama
    broken = _edited(out, tmp_path / "reshaped", add={"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 95)})
    with pytest.raises(InputError, match=r"wrong shape for model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(broken)


def test_the_cli_names_the_lost_tensor(llama, tmp_path, capsys):
    """verify goes through load_model: the refusal reaches the user as one sentence, exit 2."""
    src, out, _, _ = llama
    broken = _edited(out, tmp_path / "broken", drop="model.norm.weight")
    code, _, err = run_cli(capsys, "verify", src, broken)
    assert code == 2 and "lacks model.norm.weight" in err


def test_from_pretrained_arguments_pass_through(llama):
    _, out, _, _ = llama
    model = load_model(out, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.get_input_embeddings().table.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert load_model(out, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    model, info = load_model(out, output_loading_info=True)
    assert "precompute.table" in info["unexpected_keys"]


def test_weights_are_loaded_onto_the_target_device(llama, monkeypatch):
    """`device` becomes from_pretrained's device_map: loaded there directly, not moved after a CPU load (no GPU
    here, so what reaches from_pretrained is recorded, and the CPU load is run for real)."""
    from transformers import AutoModelForCausalLM as Auto

    class Stop(Exception):
        pass

    _, out, _, _ = llama
    seen: list[dict] = []
    real = Auto.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        if kwargs.get("device_map") not in (None, "cpu"):
            raise Stop
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Auto, "from_pretrained", classmethod(spy))
    for where, given in (("cuda:1", {"device": "cuda:1"}), ("auto", {"device_map": "auto"})):
        with pytest.raises(Stop):
            load_model(out, **given)
        assert seen[-1]["device_map"] == where
    model = load_model(out, device="cpu")
    assert seen[-1].get("device_map") is None  # transformers' own default: the CPU
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# -- it works wherever the original does ------------------------------------------------------------------------

def test_the_base_model_can_be_called_again(llama):
    """model.model(input_ids) twice (no causal-LM call between) gives the original's hidden states both times."""
    _, _, original, converted = llama
    ids = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
    with torch.no_grad():
        want = original.model(ids).last_hidden_state
        first = converted.model(ids).last_hidden_state
        second = converted.model(ids[:, :4]).last_hidden_state
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, want[:, :4], rtol=1e-4, atol=1e-5)


def test_a_deep_copy_runs(llama):
    _, _, original, converted = llama
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(converted)(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-5)


def _tokenizer(vocab: int):
    """A word-level tokenizer made offline: token i is spelled w{i}."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", pad_token="w1", eos_token="w2",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
    return tok


def test_a_pipeline_generates_the_originals_text(llama):
    from transformers import pipeline

    _, _, original, converted = llama
    tok = _tokenizer(original.config.vocab_size)
    texts = {}
    for name, model in (("original", original), ("converted", converted)):
        generate = pipeline("text-generation", model=model, tokenizer=tok)
        options = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
        plain = generate("w10 w20 w30", return_full_text=False, **options)[0]["generated_text"]
        chat = generate([{"role": "user", "content": "w40 w50"}], **options)
        texts[name] = plain, chat[0]["generated_text"][-1]["content"]
    assert len(texts["original"][0].split()) == 10 and len(texts["original"][1].split()) == 10
    assert texts["converted"] == texts["original"]


def test_batched_left_padded_generation_equals_the_originals(llama):
    _, _, original, converted = llama
    tok = _tokenizer(original.config.vocab_size)
    tok.padding_side = "left"
    batch = tok(["w5 w6 w7 w8 w9", "w11 w12", "w13"], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    out = [m.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
           for m in (original, converted)]
    assert out[0].tolist() == out[1].tolist()


def test_sampling_with_a_seed_equals_the_originals(llama):
    _, _, original, converted = llama
    ids = torch.tensor([[10, 11, 12]])
    out = []
    for model in (original, converted):
        torch.manual_seed(1234)
        out.append(model.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, temperature=1.5).tolist())
    assert out[0] == out[1]
    torch.manual_seed(4321)
    assert converted.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, temperature=1.5).tolist() != out[1]


def test_threads_share_one_model(llama):
    """Each thread's forward call has its own table rows: two threads running different inputs at once each get
    their own result (one shared slot of rows would hand one thread's q, k, v to the other)."""
    _, _, original, converted = llama
    inputs = [torch.tensor([[i, i + 1, i + 2, i + 3] * 4]) for i in (5, 50)]
    with torch.no_grad():
        want = [original(ids).logits for ids in inputs]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            start.wait()
            for _ in range(150):
                with torch.no_grad():
                    torch.testing.assert_close(converted(inputs[k]).logits, want[k], rtol=1e-4, atol=1e-5)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as Python can, so that calls interleave
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
