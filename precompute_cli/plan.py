"""What a conversion will do, as a plain value: the table to compute, the tensors to remove, the shards to write.

`make_plan` checks the recipe's expectations against the checkpoint's headers (names, shapes) so that every
mismatch is found before a byte is written. `--dry-run`, `inspect`, the report and the tests read the plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from precompute_cli.block import KEY, is_converted
from precompute_cli.errors import InputError
from precompute_cli.quant import SCALE_SUFFIX, Quantization, dequantize_fp8
from precompute_cli.recipes import Recipe, recipe_for
from precompute_cli.recipes.multimodal import TextConfig, Wrapper, is_multimodal, text_config, text_name
from precompute_cli.source import Source
from precompute_cli.spec import Config
from precompute_cli.st_io import FLOATS, NAME_TO_ST, TensorInfo, TensorRef, encode_header, read_array, read_tensor

TABLE_NAME = "precompute.table"
SINGLE_FILE = "model.safetensors"
# Bytes allowed for what a plan does not size exactly: the "precompute" block added to config.json, the index's
# framing, the headers' metadata.
METADATA_MARGIN = 64 << 10


@dataclass(frozen=True)
class TablePlan:
    rows: int
    dtype: str  # safetensors dtype name, e.g. "BF16"
    columns: dict[str, tuple[int, int] | None]
    name: str = TABLE_NAME

    @property
    def width(self) -> int:
        return max(stop for span in self.columns.values() if span for stop in span[1:])

    @property
    def ref(self) -> TensorRef:
        return TensorRef(self.name, self.dtype, (self.rows, self.width))


@dataclass(frozen=True)
class ShardPlan:
    name: str  # output file name
    source: Path
    kept: tuple[TensorInfo, ...]  # copied byte for byte, in the source's data order
    source_count: int  # tensors in the source shard (-1: gathered from several source shards)
    has_table: bool
    sources: tuple[Path, ...] = ()  # per kept tensor, when they come from several files (--max-shard-size)
    # `source`'s sha256 as the Hub published it, where known (copying it whole needs no hashing); none when gathered
    published_sha256: str | None = None

    @property
    def unchanged(self) -> bool:
        """The output file is the source file, byte for byte: copied (or hard-linked) whole."""
        return not self.has_table and len(self.kept) == self.source_count

    def pieces(self) -> list[tuple[Path, TensorInfo]]:
        """(source file, tensor) for every kept tensor, in output order."""
        return list(zip(self.sources or [self.source] * len(self.kept), self.kept, strict=True))


@dataclass(frozen=True)
class TextOnly:
    """A multimodal source converted to its text decoder alone (recipes/multimodal.py): tensors renamed to the text
    model's names, the vision tower and projector not written."""

    source_model_type: str
    image_token: int | None
    dropped: tuple[TensorRef, ...]
    other_tokens: tuple[tuple[str, int], ...] = ()  # other placeholder tokens: (kind, id), audio or video
    multimodal_ids_from: int | None = None  # ids from here up stand for images or audio (gemma3n)


@dataclass(frozen=True)
class Plan:
    source: Source
    recipe: Recipe
    table: TablePlan
    removed: tuple[TensorRef, ...]
    shards: tuple[ShardPlan, ...]  # empty when planned from a config (and the Hub's headers) alone
    inputs: dict[str, tuple[Path, TensorInfo]]  # tensors the fold reads
    params_before: int | None  # exact when tensors are known (elements as stored: a uint8 of two FP4 values is one)
    bytes_before: int | None  # bytes as stored
    quantization: Quantization = Quantization(None)
    dequantized: tuple[str, ...] = ()  # folded tensors stored as FP8, read through their scales (recipe names)
    text_only: TextOnly | None = None

    def weights(self, dtype: type = np.float32) -> Reader:
        """The fold's accessor to layer 0's tensors: each read once, kept in `dtype` (float32 for the table, float64
        for verify; for a parallel MoE block, every expert, unless the recipe streams them). FP8 weights come
        dequantized; the recipe's streamed tensors (a parallel MoE's experts) are read a block at a time instead."""
        return Reader(self, dtype)

    @property
    def not_written(self) -> tuple[TensorRef, ...]:
        """Tensors of the source missing from the output: the removed ones and, text-only, the vision model's."""
        return self.removed + (self.text_only.dropped if self.text_only else ())

    @property
    def params_after(self) -> int | None:
        removed, added = sum(r.numel for r in self.not_written), self.table.ref.numel
        return None if self.params_before is None else self.params_before - removed + added

    @property
    def bytes_after(self) -> int | None:
        removed, added = sum(r.nbytes for r in self.not_written), self.table.ref.nbytes
        return None if self.bytes_before is None else self.bytes_before - removed + added

    def output_bytes(self, link: bool = False) -> int:
        """What OUT will take on disk: every file's header and tensors, the files copied verbatim, and a margin
        for config.json and the index; with `link`, less the whole files that are hard-linked (they share the
        source's blocks)."""
        total = METADATA_MARGIN + sum(p.stat().st_size for p in (self.source.config_path, *self.source.aux))
        for shard in self.shards:
            if shard.unchanged:
                total += 0 if link else shard.source.stat().st_size
                continue
            refs = [TensorRef(i.name, i.dtype, i.shape) for i in shard.kept]
            refs += [self.table.ref] if shard.has_table else []
            total += len(encode_header(refs, {})) + sum(r.nbytes for r in refs)
        if len(self.shards) > 1:  # the index: a line per tensor
            total += sum(len(i.name) + 64 for s in self.shards for i in s.kept)
        return total

    @property
    def from_config_only(self) -> bool:
        return not self.shards


class Reader:
    """Layer 0's tensors by name, in float: `reader(name)` reads a tensor once and keeps it; `reader.streamed(name)`
    keeps nothing and converts a block of rows from the stored dtype each time one is asked for."""

    def __init__(self, plan: Plan, dtype: type):
        self.plan, self.inputs, self.dtype = plan, plan.inputs, dtype
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            if name in self.plan.dequantized:
                scale = read_array(*self.inputs[name + SCALE_SUFFIX], dtype=self.dtype)
                raw = read_tensor(*self.inputs[name])
                self.cache[name] = dequantize_fp8(raw, scale, self.plan.quantization.block, self.dtype)
            else:
                self.cache[name] = read_array(*self.inputs[name], dtype=self.dtype)
        return self.cache[name]

    def streamed(self, name: str) -> Streamed:
        if name in self.plan.dequantized:
            raise InputError(f"{name}: a streamed expert stored as FP8 is not supported; precompute streams only "
                             "float experts")
        return Streamed(*self.inputs[name], self.dtype)


@dataclass(frozen=True)
class Streamed:
    """A [out, in] weight read from its file a block of rows at a time (ops.Rows), each block converted from the
    stored dtype as it is read. A parallel MoE's experts are used once per chunk of vocabulary rows: held whole in
    float they would cost twice their stored size (bfloat16) for the whole conversion; read so, one block."""

    path: Path
    info: TensorInfo
    dtype: type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.info.shape[0])
        if step != 1:
            raise IndexError("a streamed weight is read in contiguous blocks of rows")
        return read_array(self.path, self.info, (start, stop), self.dtype)


def load_recipe(source: Source, vocab_size: int | None = None, text_only: bool = False,
                **choices: str | None) -> Recipe:
    """The source's recipe; a multimodal source's text decoder with `text_only` (without it, recipe_for refuses).
    `choices`: the user's (convert's --mla-table as mla_table); a recipe ignores those it has no use for."""
    cfg = Config.load(source.config_path)
    if text_only and is_multimodal(cfg):
        cfg = text_config(cfg, text_only=True)
    if vocab_size is not None:
        cfg.data["vocab_size"] = vocab_size
    recipe = recipe_for(cfg)
    for name, value in choices.items():
        if value is not None and name not in recipe.choices():
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{cfg.path}: {flag} applies to MLA models only; this is {cfg.model_type}")
    recipe.choose(**choices)
    return recipe


def make_plan(source: Source, recipe: Recipe, table_dtype: str | None = None,
              max_shard_size: int | None = None, headers: dict[str, TensorRef] | None = None) -> Plan:
    """Refuse what cannot be folded, then match the recipe's tensors against the checkpoint's.

    Output shards mirror the source's; `max_shard_size` (bytes of tensor data per file) re-shards instead.
    `headers` are the tensors of a checkpoint whose files are not here (from the Hub's safetensors headers, with a
    config-only source): the plan is checked and sized against them as against local files, but has no shards and
    no inputs, since there is nothing here to read or copy (execute refuses it)."""
    cfg = recipe.cfg
    if is_converted(cfg.data):
        raise InputError(f"{cfg.path}: this checkpoint is already precomputed (its config has a '{KEY}' block)")
    reason = recipe.refusal()
    if reason:
        raise InputError(f"{cfg.path}: {reason}")
    expected = {recipe.embedding: (recipe.spec.vocab_size, recipe.spec.hidden_size),
                **recipe.embedding_transforms(), **recipe.folded(), **recipe.kept_inputs()}
    quantization = Quantization.of(cfg)
    reason = quantization.refusal(next((n for n, s in recipe.folded().items() if len(s) == 2), recipe.embedding))
    if reason:
        raise InputError(f"{cfg.path}: {reason}")
    tensors = source.tensors() if source.shards else {}
    text_only = None
    if isinstance(cfg, TextConfig):
        tensors, dropped = _text_tensors(tensors, cfg.wrapper)
        headers, dropped_headers = _text_tensors(headers, cfg.wrapper) if headers is not None else (None, {})
        dropped_refs = tuple(TensorRef(n, t.dtype, t.shape) for n, t in {**dropped_headers, **dropped}.items())
        text_only = TextOnly(cfg.outer.model_type, cfg.image_token, dropped_refs, cfg.other_tokens,
                             cfg.multimodal_ids_from)
    known: dict[str, TensorRef | TensorInfo] = {n: i for n, (_, i) in tensors.items()} or dict(headers or {})
    if (source.shards or headers is not None) and not known:  # else it would pass for a plan from the config alone
        raise InputError(f"{source.ref}: its safetensors files hold no tensors")
    files = {n: path for n, (path, _) in tensors.items()}  # where a tensor is named in errors; else the checkpoint
    kept = dict.fromkeys(recipe.kept())  # read by layer 0 after the table: they must be there, and they stay
    disk = _names_on_disk(recipe, [*expected, *kept], known)
    for name, shape in {**kept, **expected}.items():
        if known and disk[name] not in known:
            raise InputError(f"{source.ref}: " + (quantization.missing(disk[name], known) or
                                                  f"the config describes a {cfg.model_type} model, "
                                                  f"but the checkpoint has no tensor {name}"))
        if known and shape is not None and known[disk[name]].shape != shape:
            raise InputError(f"{files.get(disk[name], source.ref)}: tensor {disk[name]} has shape "
                             f"{list(known[disk[name]].shape)}, the config implies {list(shape)}")
    dtype_of = {n: (known[disk[n]].dtype if known else NAME_TO_ST.get(recipe.spec.dtype, "F32")) for n in expected}
    scales: dict[str, TensorRef | TensorInfo] = {}  # recipe name of a dequantized weight -> its scale tensor
    for name in expected:
        at = files.get(disk[name], source.ref) if known else source.config_path
        scale = quantization.scale_of(disk[name], dtype_of[name]) if name != recipe.embedding else None
        if scale is None:
            if dtype_of[name] not in FLOATS:
                raise InputError(f"{at}: {quantization.unreadable(disk[name], dtype_of[name])}")
            continue
        want = quantization.scale_shape(expected[name])
        if scale not in known or known[scale].shape != want or known[scale].dtype not in FLOATS:
            found = f"{known[scale].dtype} {list(known[scale].shape)}" if scale in known else "no such tensor"
            raise InputError(f"{at}: FP8 tensor {disk[name]} needs its block scales {scale} as float {list(want)} "
                             f"(weight_block_size {list(quantization.block)}); found {found}")
        scales[name] = known[scale]
    inputs = {n: tensors[disk[n]] for n in expected} if tensors else {}
    if tensors:
        inputs.update({n + SCALE_SUFFIX: tensors[ref.name] for n, ref in scales.items()})
    table = TablePlan(
        rows=recipe.spec.vocab_size,
        dtype=_table_dtype(table_dtype, dtype_of[recipe.embedding]),
        columns=recipe.columns(),
    )
    removed = tuple(TensorRef(disk[n], dtype_of[n], tuple(s)) for n, s in recipe.removed().items())
    # a removed FP8 weight goes with its scale; one the model still reads (a kept input) keeps it
    removed += tuple(TensorRef(ref.name, ref.dtype, tuple(ref.shape)) for n, ref in scales.items()
                     if n in recipe.removed())
    removed_names = {r.name for r in removed}
    renamed = text_only is not None
    if not tensors:
        shards: tuple[ShardPlan, ...] = ()
    elif max_shard_size is None:
        shards = _shards(tensors, removed_names, disk[recipe.embedding], source.published, renamed)
    else:
        shards = _resharded(tensors, removed_names, disk[recipe.embedding], table, max_shard_size, source.published,
                            renamed)
    everything = [*known.values(), *(text_only.dropped if text_only else ())]
    return Plan(
        source=source, recipe=recipe, table=table, removed=removed, shards=shards,
        inputs=inputs,
        params_before=sum(t.numel for t in everything) if known else None,
        bytes_before=sum(t.nbytes for t in everything) if known else None,
        quantization=quantization, dequantized=tuple(scales), text_only=text_only,
    )


def _text_tensors(tensors: dict, wrapper: Wrapper) -> tuple[dict, dict]:
    """A multimodal checkpoint's tensors as the text model names them (values renamed too: what the output
    writes), and the ones it has no name for (vision tower, projector), which are not written."""
    kept, dropped = {}, {}
    for name, entry in tensors.items():
        new = text_name(name, wrapper)
        info = entry[1] if isinstance(entry, tuple) else entry
        if new is None:
            dropped[name] = info
        elif new in kept:
            raise InputError(f"{info.name}: two tensors of the checkpoint would both be the text model's {new}")
        else:
            kept[new] = (entry[0], replace(info, name=new)) if isinstance(entry, tuple) else replace(entry, name=new)
    return kept, dropped


def _names_on_disk(recipe: Recipe, names: list[str], tensors: dict[str, object]) -> dict[str, str]:
    """The recipe's names as this checkpoint spells them. Some checkpoints were saved from the bare base model,
    without its prefix (the recipe's `base_prefix`, such as BLOOM's `transformer.`); transformers loads both
    spellings, and so do we: the fold reads, and the output removes, the names on disk."""
    prefix = recipe.base_prefix
    stripped = bool(prefix) and recipe.embedding not in tensors and recipe.embedding.removeprefix(prefix) in tensors
    out = {n: n.removeprefix(prefix) if stripped else n for n in names}
    for name, spelt in out.items():  # the recipe's other spellings (Recipe.spellings), where this one is missing
        if tensors and spelt not in tensors:
            alternates = (spelt.replace(ours, theirs, 1) for ours, theirs in recipe.spellings if ours in spelt)
            out[name] = next((a for a in alternates if a in tensors), spelt)
    return out


def _table_dtype(requested: str | None, embedding_dtype: str) -> str:
    if requested is None:
        return embedding_dtype
    if requested not in NAME_TO_ST:
        raise InputError(f"--table-dtype {requested!r}: choose one of {', '.join(NAME_TO_ST)}")
    return NAME_TO_ST[requested]


def _shards(tensors: dict[str, tuple[Path, TensorInfo]], removed: set[str], embedding: str,
            published: Mapping[Path, str], renamed: bool = False) -> tuple[ShardPlan, ...]:
    """Mirror the source's shards; the table goes where the embedding was. `renamed` tensors (text-only) are never
    copied as whole files: their names change."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for path, info in tensors.values():
        by_file.setdefault(path, []).append(info)
    table_home = tensors[embedding][0]
    single = len(by_file) == 1
    plans = []
    for path, infos in sorted(by_file.items()):
        kept = tuple(sorted((i for i in infos if i.name not in removed), key=lambda i: i.start))
        if kept or path == table_home:
            plans.append(ShardPlan(SINGLE_FILE if single else path.name, path, kept, -1 if renamed else len(infos),
                                   path == table_home, published_sha256=published.get(path)))
    return tuple(plans)


def parse_size(text: str) -> int:
    """--max-shard-size: bytes, or a number with a unit as transformers spells it ("2GB", "500MB", "4GiB")."""
    value = text.strip()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    number, multiplier = value, 1
    for unit, factor in units.items():
        if value.upper().endswith(unit):
            number, multiplier = value[: -len(unit)], factor
            break
    try:
        size = int(float(number) * multiplier)
    except ValueError:
        size = 0
    if size <= 0:
        raise InputError(f"--max-shard-size {text!r}: give a positive size such as 2GB, 500MB or 4GiB")
    return size


def _resharded(tensors: dict[str, tuple[Path, TensorInfo]], removed: set[str], embedding: str, table: TablePlan,
               max_shard_size: int, published: Mapping[Path, str], renamed: bool = False) -> tuple[ShardPlan, ...]:
    """Split the output afresh, in the source's order, the table where the embedding was (after it when kept).

    huggingface_hub's size-based split (what save_pretrained uses): a tensor larger than the limit, such as a big
    table, gets a file of its own. A file that comes out equal to a whole source shard is copied whole."""
    from huggingface_hub import split_state_dict_into_shards_factory

    shard_order = {path: i for i, path in enumerate(sorted({p for p, _ in tensors.values()}))}
    ordered = sorted(tensors.values(), key=lambda pi: (shard_order[pi[0]], pi[1].start))
    entries: dict[str, tuple[Path, TensorInfo] | None] = {}  # None stands for the table
    for path, info in ordered:
        if info.name not in removed:
            entries[info.name] = (path, info)
        if info.name == embedding:
            entries[table.name] = None
    split = split_state_dict_into_shards_factory(
        entries, get_storage_size=lambda e: table.ref.nbytes if e is None else e[1].nbytes,
        filename_pattern=SINGLE_FILE.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_size)
    counts: dict[Path, int] = {}
    for path, _ in tensors.values():
        counts[path] = counts.get(path, 0) + 1
    plans = []
    for name, names in split.filename_to_tensors.items():
        pieces = [entries[n] for n in names if entries[n] is not None]
        files = {p for p, _ in pieces}
        has_table = table.name in names
        whole = len(files) == 1 and not has_table and len(pieces) == counts[next(iter(files))] and not renamed
        home = pieces[0][0] if pieces else next(iter(tensors.values()))[0]
        plans.append(ShardPlan(name, home, tuple(i for _, i in pieces), len(pieces) if whole else -1, has_table,
                               () if whole else tuple(p for p, _ in pieces), published.get(home) if whole else None))
    return tuple(plans)
