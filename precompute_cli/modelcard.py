"""The README.md model card that goes with a converted checkpoint to the Hub (huggingface_hub's ModelCard).

It is built from values the conversion already produced (the config's "precompute" block, the size-delta report,
the verify result when one was run) and holds nothing time- or machine-dependent, so that converting the same
input twice gives byte-identical folders, card included.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from precompute_cli.block import LAYER, PrecomputeBlock

CARD_NAME = "README.md"
TAGS = ["precompute-cli", "precomputed-first-layer"]


def build(report: Mapping[str, Any], block: PrecomputeBlock, repo_id: str | None = None,
          verify: Mapping[str, Any] | None = None):
    """A huggingface_hub ModelCard for a converted checkpoint; `report` is ConversionReport.as_dict()."""
    from huggingface_hub import ModelCard, ModelCardData

    source, revision = block.source, block.revision
    on_hub = revision is not None
    data = ModelCardData(base_model=source if on_hub else None, pipeline_tag="text-generation", tags=TAGS)
    name = repo_id.split("/")[-1] if repo_id else Path(source).name + "-precomputed"
    text = "\n\n".join([
        f"# {name}",
        _intro(source, revision, block),
        _what(report, block),
        _size(report),
        _usage(repo_id, any(f["name"].startswith("tokenizer") for f in report.get("files", ()))),
        _verification(verify),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n")


def write(folder: Path, card) -> Path:
    """Save the card as README.md in `folder` (a converted checkpoint ships no README of its own)."""
    path = Path(folder) / CARD_NAME
    path.write_text(str(card))
    return path


def _intro(source: str, revision: str | None, block: PrecomputeBlock) -> str:
    what = ("query, key, value and FFN output (summed with the embedding)" if block.block == "parallel"
            else "query, key and value")
    if revision is not None:
        origin = f"[{source}](https://huggingface.co/{source}) at commit `{revision}`"
    else:
        origin = f"the local checkpoint `{Path(source).name}`"
    return (f"This is {origin} with its first transformer layer precomputed by "
            f"[{block.tool}](https://pypi.org/project/{block.tool}/) {block.version}, following "
            f"\"Transformer tricks: Precomputing the first layer\" (Nils Graef). Every token's layer-0 {what} "
            "are read from one table row instead of being computed, and the weights that computed them are gone. "
            "The outputs are those of the original model up to floating-point rounding.")


def _what(report: Mapping[str, Any], block: PrecomputeBlock) -> str:
    table = report["added"][0] if report.get("added") else None
    lines = ["## What was precomputed", "",
             f"- architecture: `{report['model_type']}`, {block.block} attention/FFN block, layer {LAYER}"]
    if table:
        lines.append(f"- added: `{table['name']}`, shape {_shape(table['shape'])}, {table['dtype']}")
    columns = ", ".join(f"{k} [{v[0]}, {v[1]})" for k, v in block.columns.items() if v)
    absent = [k for k, v in block.columns.items() if not v]
    lines.append(f"- table columns: {columns}" + (f" ({', '.join(absent)} read from the embedding)" if absent else ""))
    lines += ["", "Removed tensors:", "", "| tensor | shape | dtype |", "|---|---|---|"]
    lines += [f"| `{t['name']}` | {_shape(t['shape'])} | {t['dtype']} |" for t in report["removed"]]
    return "\n".join(lines)


def _size(report: Mapping[str, Any]) -> str:
    return "\n".join([
        "## Size", "",
        "| | before | after | delta |", "|---|---:|---:|---:|",
        f"| parameters | {report['params_before']:,} | {report['params_after']:,} | "
        f"{report['param_delta']:+,} ({report['param_delta_pct']:+.2f}%) |",
        f"| bytes | {report['bytes_before']:,} | {report['bytes_after']:,} | "
        f"{report['byte_delta']:+,} ({report['byte_delta_pct']:+.2f}%) |",
    ])


def _usage(repo_id: str | None, has_tokenizer: bool) -> str:
    where = repo_id or "path/to/this/folder"
    tokenizer = [
        "from transformers import AutoTokenizer", "",
        f"model = load_model(\"{where}\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{where}\")",
        "ids = tokenizer(\"The capital of France is\", return_tensors=\"pt\").input_ids",
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))",
    ] if has_tokenizer else ["import torch", "", f"model = load_model(\"{where}\")",
                             "logits = model(torch.tensor([[1, 2, 3]])).logits"]
    return "\n".join([
        "## How to load", "",
        "The layer-0 weights are gone, so plain `transformers` cannot load this checkpoint; "
        "precompute-cli's `load_model` returns a transformers model whose first layer reads the table:", "",
        "```python",
        "# pip install \"precompute-cli[runtime]\"",
        "from precompute_cli import load_model",
        *tokenizer,
        "```",
    ])


def _verification(verify: Mapping[str, Any] | None) -> str:
    """verify.py's checks (name, verdict, measured, allowed) as a table; any other dict key by key."""
    if verify is None:
        return ("## Verification\n\nNo numeric verification was run for this upload; "
                "`precompute verify ORIGINAL CONVERTED` compares it with the original.")
    passed = verify.get("passed")
    verdict = {True: "passed", False: "FAILED"}.get(passed, "ran") if isinstance(passed, bool) else "ran"
    head = ["## Verification", ""]
    if verify.get("checks"):
        run = f", running the converted model in {verify['dtype']}," if verify.get("dtype") else ""
        marks = {True: "pass", False: "FAIL", None: "-"}
        return "\n".join([*head, f"`precompute verify` compared this checkpoint with the original{run} "
                                  f"and {verdict}:", "",
                           "| check | verdict | measured | allowed |", "|---|---|---|---|",
                           *(f"| {_value(c['name'])} | {marks[c['passed']]} | {_value(c['value'])} | "
                             f"{_value(c['limit'])} |" for c in verify["checks"])])
    rows = [f"| {k} | {_value(v)} |" for k, v in verify.items() if k != "passed"]
    return "\n".join([*head, f"`precompute verify` compared this checkpoint with the original and {verdict}:", "",
                       "| check | result |", "|---|---|", *rows])


def _shape(shape) -> str:
    return " x ".join(str(d) for d in shape)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v).replace("|", "\\|")
