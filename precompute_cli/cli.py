"""The `precompute` command: convert, inspect (and verify, convert-all). Errors become one sentence and an exit code."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from dataclasses import asdict, replace
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, ProgressColumn, SpinnerColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from precompute_cli import __version__, conversion, hub
from precompute_cli.block import KEY, PrecomputeBlock, is_converted
from precompute_cli.census import census, counts
from precompute_cli.check import MANIFEST, failures
from precompute_cli.check import check as check_folder
from precompute_cli.errors import InputError, PrecomputeError
from precompute_cli.execute import interrupt_on_sigterm
from precompute_cli.modelcard import CARD_NAME
from precompute_cli.plan import load_recipe, make_plan, parse_size
from precompute_cli.progress import STEPS, Progress
from precompute_cli.recipes import supported
from precompute_cli.recipes.multimodal import WRAPPERS, TextConfig
from precompute_cli.report import analysis, refused, render_analysis, render_conversion, render_converted
from precompute_cli.source import INDEX_NAME, peek, resolve
from precompute_cli.spec import Config
from precompute_cli.verify import DEFAULT_TOKENS, RUN_DTYPES, VerifyResult, render_verify, verify_checkpoint

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Precompute the first transformer layer into a per-token table.")
console = Console(stderr=True)

REVISION = typer.Option(None, "--revision", help="Hub branch, tag or commit.")
OFFLINE = typer.Option(False, "--offline", help="Resolve Hub ids from the local cache only (as HF_HUB_OFFLINE=1).")
TOKEN = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the saved login).")
QUIET = typer.Option(False, "-q", "--quiet", help="No progress display (there is none either when stdout is not "
                     "a terminal).")
Dtype = Enum("Dtype", {name: name for name in RUN_DTYPES}, type=str)  # --help lists the choices
# click's usage errors (typer may carry its own copy of click, so found through typer's BadParameter): exit 2
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_quiet = False  # set by -q/--quiet


def _print_version(value: bool) -> None:
    if value:
        print(f"precompute-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="On an error, print its traceback too (accepted anywhere "
                               "on the command line)."),
    quiet: bool = QUIET,
) -> None:
    """Precompute the first transformer layer into a per-token table."""
    _be_quiet(quiet)  # --debug is taken out of the arguments by main(), wherever it stands


def _be_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = _quiet or quiet


@app.command()
def convert(
    source: str = typer.Argument(..., help="Hub id, local folder, .safetensors file (config.json beside it)."),
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty, unless --overwrite)."),
    revision: str | None = REVISION,
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
    table_dtype: Dtype | None = typer.Option(None, help="The table's dtype (default: the embedding's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT (atomically)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; write nothing."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report (with --dry-run: the plan) "
                                          "as JSON to this path."),
    verify_after: bool = typer.Option(False, "--verify", help="Run `verify` on OUT right after converting "
                                      "(its result joins the --json report; exit 1 if it fails)."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="ORG/NAME",
                                           help="Upload OUT, with a generated model card, to this Hub repository."),
    private: bool = typer.Option(False, "--private", help="Create the --push-to-hub repository as private."),
    max_shard_size: str | None = typer.Option(None, "--max-shard-size", metavar="SIZE",
                                              help="Re-shard the output (e.g. 2GB, 500MB, 4GiB); "
                                                   "default: mirror the source's shards."),
    link: bool = typer.Option(False, "--link", help="Hard-link unchanged shards instead of copying them (same "
                              "file system; the output then shares those files with the source)."),
    device: str = typer.Option("cpu", "--device", metavar="[cpu|cuda|cuda:N]",
                               help="Where the table's GEMM runs (cuda where a GPU is)."),
    quiet: bool = QUIET,
    mla_table: str | None = typer.Option(None, "--mla-table", metavar="latent|full",
                                         help="MLA models (DeepSeek, Kimi-K2, GLM-lite, Mistral 4): store the normed "
                                              "latents (latent, the default) or also fold q_b_proj and kv_b_proj "
                                              "(full: a table about 27x wider); `inspect` compares both."),
    text_only: bool = typer.Option(False, "--text-only", help=f"Convert a multimodal checkpoint "
                                   f"({', '.join(WRAPPERS)}) to its text decoder alone; the output refuses image "
                                   "(and audio, video) inputs."),
) -> None:
    """Fold layer 0 into a table and write the converted checkpoint to OUT."""
    _be_quiet(quiet)
    table_dtype = table_dtype.value if table_dtype else None
    if dry_run:
        _dry_run(source, out, revision, offline, token, table_dtype, push_to_hub, private,
                 max_shard_size=parse_size(max_shard_size) if max_shard_size else None, json_path=json_path,
                 mla_table=mla_table, text_only=text_only)
        return
    if push_to_hub:
        hub.check_push_target(push_to_hub, offline, token)  # before converting, not after
    done = conversion.convert(
        source, out, revision=revision, offline=offline, token=token, table_dtype=table_dtype,
        max_shard_size=parse_size(max_shard_size) if max_shard_size else None, overwrite=overwrite, link=link,
        device=device, mla_table=mla_table, text_only=text_only, progress=_progress(),
        reported=lambda r: render_conversion(console, r),
        verify=(lambda original, folder: _verify(original, resolve(str(folder)))) if verify_after else None)
    report, verified = done.report, done.verified
    if json_path:
        extra = {"verify": verified.as_dict()} if verified else {}
        json_path.write_text(json.dumps({**report.as_dict(), **extra}, indent=2) + "\n")
    if verified and not verified.passed:
        raise PrecomputeError(verified.failure)
    if push_to_hub:
        url = hub.publish(out, push_to_hub, report.as_dict(), PrecomputeBlock.of(done.plan), private=private,
                          token=token, verify=verified.as_dict() if verified else None)
        console.print(f"[bold green]pushed[/] {out} to {url}")


@app.command()
def inspect(
    checkpoint: str | None = typer.Argument(None, help="Hub id, folder, .safetensors file or config.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
    assume_parallel: bool = typer.Option(False, "--assume-parallel",
                                         help="Analyse as if attention and FFN ran in parallel (paper, section 3)."),
    vocab_size: int | None = typer.Option(None, help="Analyse with this vocabulary size instead (from the config "
                                          "alone: totals are then estimated, not counted from the tensors)."),
    revision: str | None = REVISION,
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
    check: bool = typer.Option(False, "--check", help="Re-hash every file of a converted folder against the "
                               "SHA256SUMS that convert wrote into it; exit 2 if any file changed or is missing."),
    supported_types: bool = typer.Option(False, "--supported", help="Print the census of model types instead: "
                                         "each folded, or refused with its reason."),
    quiet: bool = QUIET,
) -> None:
    """Explain a checkpoint: its architecture and what converting it gains, or what a converted one holds."""
    _be_quiet(quiet)
    if supported_types:
        _census(as_json)
        return
    if checkpoint is None:
        raise InputError("inspect needs a CHECKPOINT (or --supported for the census of model types)")
    if check:
        _check(Path(checkpoint), as_json)
        return
    with peek(checkpoint, revision=revision, offline=offline, token=token) as found:  # downloads no weights
        src = found.source
        cfg = Config.load(src.config_path)
        if is_converted(cfg.data):
            block = PrecomputeBlock.read(cfg.data, cfg.path).as_dict()
            data = {"converted": True, KEY: block, **load_recipe(src).spec.as_dict()}
        else:
            recipe = load_recipe(src, vocab_size, text_only=True)  # a multimodal source: what --text-only gives
            reason = recipe.refusal()
            if reason:
                data = refused(recipe.spec, reason)
            elif vocab_size is not None:  # a vocabulary the tensors do not have: analyse the config alone
                data = analysis(make_plan(replace(src, shards=()), recipe), assume_parallel=assume_parallel)
            else:
                data = analysis(make_plan(src, recipe, headers=found.headers), assume_parallel=assume_parallel)
            data["supported_model_types"] = supported()
            if isinstance(recipe.cfg, TextConfig):
                data["multimodal"] = {"model_type": recipe.cfg.outer.model_type, "converts_with": "--text-only",
                                      "note": "the text decoder alone; image inputs are refused"}
    if as_json:
        print(json.dumps(data, indent=2))
    elif data.get("converted"):
        render_converted(console, data, title=checkpoint)
    else:
        render_analysis(console, data, title=f"{checkpoint}")


def _census(as_json: bool) -> None:
    rows = census()
    if as_json:
        print(json.dumps({"counts": counts(rows), "model_types": [r.as_dict() for r in rows]}, indent=2))
        return
    table = Table("model_type", "status", "what folds, or why not", title="precompute: model types")
    for r in rows:
        table.add_row(r.model_type, r.status, escape(r.note))
    console.print(table)
    console.print(", ".join(f"{n} {status}" for status, n in counts(rows).items()))


def _check(folder: Path, as_json: bool) -> None:
    with _progress() as update:
        results = check_folder(folder, update)
    bad = failures(results)
    if as_json:
        print(json.dumps({"folder": str(folder), "ok": not bad, "files": [asdict(r) for r in results]}, indent=2))
    else:
        for r in results:
            console.print(f"  {r.status:>8}  {escape(r.name)}", soft_wrap=True)
    if bad:
        listed = ", ".join(f"{r.name} ({r.status})" for r in bad)
        raise InputError(f"{folder / MANIFEST}: {len(bad)} of the files it lists failed the check: {listed}")
    console.print(f"[bold green]ok[/]: every file listed in {escape(str(folder / MANIFEST))} matches its sha256",
                  soft_wrap=True)


@app.command()
def verify(
    original: str = typer.Argument(..., help="The checkpoint before conversion (Hub id or path)."),
    converted: str = typer.Argument(..., help="The converted checkpoint (Hub id or path)."),
    tokens: int = typer.Option(DEFAULT_TOKENS, "--tokens", help="Greedy tokens to generate and compare."),
    prompt: str | None = typer.Option(None, "--prompt", help="Text to generate from (needs ORIGINAL's tokenizer)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON to this path."),
    dtype: Dtype = typer.Option("float32", "--dtype", help="The dtype to run the converted model in."),
    all_rows: bool = typer.Option(False, "--all-rows", help="Check every row of the table against transformers' "
                                  "layer 0 in float64, not the rows the runs used, the edges and a sample."),
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
    quiet: bool = QUIET,
) -> None:
    """Prove CONVERTED computes what ORIGINAL does: logits, top-1, greedy text, and table rows against float64."""
    _be_quiet(quiet)
    result = _verify(resolve(original, offline=offline, token=token), resolve(converted, offline=offline, token=token),
                     dtype=Dtype(dtype).value, tokens=tokens, prompt=prompt, all_rows=all_rows)
    if json_path:
        json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    if not result.passed:
        raise PrecomputeError(result.failure)


def _verify(original, converted, **options) -> VerifyResult:
    if _quiet_here():
        result = verify_checkpoint(original, converted, **options)
    else:
        with console.status(f"verifying {converted.ref} against {original.ref}"):
            result = verify_checkpoint(original, converted, **options)
    render_verify(console, result)
    return result


@app.command("convert-all")
def convert_all(
    config: Path = typer.Argument(..., help="Release file (TOML) listing the models; see configs/release.toml."),
    out_root: Path = typer.Argument(..., help="Folder for the outputs, the release state and release-summary.json."),
    push: bool = typer.Option(False, "--push", help="Upload each model to its `repo`, with a model card."),
    force: bool = typer.Option(False, "--force", help="Convert even the models unchanged since the last run."),
    only: str | None = typer.Option(None, "--only", metavar="NAME",
                                    help="Run only the model with this output name (one release job per model)."),
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
    quiet: bool = QUIET,
) -> None:
    """Convert and verify every model of a release file (and publish with --push); exit 1 if any failed."""
    _be_quiet(quiet)
    from precompute_cli.release import SUMMARY_NAME
    from precompute_cli.release import convert_all as run

    summary = run(config, out_root, push=push, offline=offline, token=token, force=force, report=_print_outcome,
                  progress=lambda label: _progress(label.removesuffix(": folding layer 0")),  # the model's name
                  only=only)
    counts = summary["counts"]
    console.print(f"{counts['converted']} converted, {counts['skipped']} skipped, {counts['failed']} failed; "
                  f"summary in {out_root / SUMMARY_NAME}")
    if counts["failed"]:
        raise PrecomputeError(f"{counts['failed']} of {len(summary['models'])} models failed "
                              f"(see {out_root / SUMMARY_NAME})")


def _print_outcome(o) -> None:
    """One line per model of convert-all, as it finishes."""
    facts = [o.revision.removeprefix("sha256:")[:12]] if o.revision else []
    if o.report:
        facts.append(f"{o.report['byte_delta_pct']:+.2f}% bytes")
    if o.verify:
        facts.append("verified" if o.verify.get("passed") else "verify FAILED")
    if o.pushed:
        facts.append(f"on the Hub as {o.pushed}")
    line = f"[bold]{o.status}[/] {escape(o.name)}" + (f" ({', '.join(facts)})" if facts else "")
    console.print(line + (f": {escape(o.error)}" if o.error else "") + "".join(f"; {n}" for n in o.notes),
                  soft_wrap=True)


def _dry_run(source: str, out: Path, revision: str | None, offline: bool, token: str | None,
             table_dtype: str | None, push_to: str | None, private: bool, max_shard_size: int | None = None,
             json_path: Path | None = None, mla_table: str | None = None,
             text_only: bool = False) -> None:
    """What would be downloaded, written and uploaded; nothing is (a Hub checkpoint not yet in the cache is
    sized from its safetensors headers on the Hub, and its config read through a temporary folder). `json_path`
    gets the same plan as JSON."""
    with peek(source, revision=revision, offline=offline, token=token) as found:
        pull = found.pull
        recipe = load_recipe(found.source, text_only=text_only, mla_table=mla_table)
        plan = make_plan(found.source, recipe, table_dtype, max_shard_size, found.headers)
    if found.headers is None:
        files = [s.name for s in plan.shards] + ["config.json"] + [a.name for a in plan.source.aux] + (
            [INDEX_NAME] if len(plan.shards) > 1 else [])
    else:
        files = [f.name for f in pull.files]
    data: dict[str, Any] = {
        "dry_run": True, "source": plan.source.ref, "revision": plan.source.revision, "out": str(out),
        "download": {"repo_id": pull.repo_id, "revision": pull.revision, "bytes": pull.download_bytes,
                     "complete_in_cache": pull.complete_in_cache,
                     "files": [{"name": f.name, "bytes": f.size, "cached": f.cached} for f in pull.files]}
        if pull else None,
        KEY: PrecomputeBlock.of(plan).as_dict(),
        "files": [{"name": shard.name, "action": "copy" if shard.unchanged else "rewrite",
                   "tensors_kept": len(shard.kept), "table": shard.has_table} for shard in plan.shards]
        + [{"name": aux.name, "action": "copy"} for aux in plan.source.aux],
        "bytes_before": plan.bytes_before, "bytes_after": plan.bytes_after,
        "upload": {"repo": push_to, "private": private, "files": sorted(set(files) | {MANIFEST, CARD_NAME})}
        if push_to else None,
    }
    _print_plan(data)
    if json_path:
        json_path.write_text(json.dumps(data, indent=2) + "\n")


def _print_plan(data: dict[str, Any]) -> None:
    pull = data["download"]
    if pull:
        console.print(f"[bold]download[/]: {pull['repo_id']} at commit {pull['revision']}: "
                      f"{pull['bytes']:,} bytes to fetch" + (" (all in the local cache)"
                                                             if pull["complete_in_cache"] else ""))
        for f in pull["files"]:
            console.print(f"  {f['name']}: " + ("cached" if f["cached"] else f"{f['bytes'] or 0:,} bytes"))
    console.print(f"[bold]dry run[/]: {data['source']} -> {data['out']} (nothing written)")
    console.print_json(json.dumps(data["precompute"]))
    for f in data["files"]:
        how = "copied verbatim" if "tensors_kept" not in f else "copy whole file" if f["action"] == "copy" else (
            f"{f['tensors_kept']} tensors copied" + (" + table" if f["table"] else ""))
        console.print(f"  {f['name']}: {how}")
    if data["bytes_before"] is not None:
        console.print(f"[bold]write[/]: {data['out']}: tensor bytes {data['bytes_before']:,} -> "
                      f"{data['bytes_after']:,} ({data['bytes_after'] - data['bytes_before']:+,})")
    if data["upload"]:
        up = data["upload"]
        console.print(f"[bold]upload[/]: {data['out']} -> {up['repo']}" + (" (private)" if up["private"] else "") +
                      f": {', '.join(up['files'])}")


def _quiet_here() -> bool:
    """No progress display with -q, or when stdout is not a terminal (a pipe, a file, CI)."""
    return _quiet or not sys.stdout.isatty()


class _Amount(ProgressColumn):
    """Bytes as 1.2/2.5 GB, table rows as 50,000/128,256 rows."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit")
        if unit == "bytes":
            return DownloadColumn().render(task)
        if unit == "rows" and task.total:
            return Text(f"{task.completed:,.0f}/{task.total:,.0f} rows", style="progress.download")
        return Text("")


class _progress:
    """Long work's progress on stderr (so --json output stays clean), one line per step; entering it gives the hook
    the work reports through (precompute_cli.progress), or None when quiet.

    A Hub download, while the source is resolved, draws huggingface_hub's own bars (bytes, time left); ours start
    with the first step after it, and when quiet, theirs are silenced too."""

    def __init__(self, label: str = ""):
        self.label = f"{label}: " if label else ""
        self.bar = None
        self.hub_bars: bool | None = None

    def __enter__(self) -> Progress | None:
        if _quiet_here():
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

            self.hub_bars = not are_progress_bars_disabled()
            disable_progress_bars()
            return None
        from rich.progress import Progress as Bars

        bar = Bars(SpinnerColumn(), "[progress.description]{task.description}", BarColumn(), _Amount(),
                   TimeRemainingColumn(), console=console, transient=True)
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step == "resolving":  # a download, if any, is drawn by huggingface_hub
                return
            if self.bar is None:
                self.bar = bar
                bar.__enter__()
            if step not in tasks:
                label, unit = STEPS.get(step, (step, ""))
                tasks[step] = bar.add_task(f"{escape(self.label)}{label}", total=None, unit=unit)
                bar.refresh()  # drawn as it starts, not at the next tick
            task = tasks[step]  # several threads report: keep the furthest
            bar.update(task, completed=max(done, bar.tasks[task].completed), total=total or None)

        return update

    def __exit__(self, *exc):
        if self.hub_bars:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
        return self.bar.__exit__(*exc) if self.bar else None


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every failure into a message and an exit code (see README)."""
    global _quiet
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    _quiet = False
    previous = interrupt_on_sigterm()
    try:
        code = app(args=args, standalone_mode=False)
    except PrecomputeError as exc:
        if debug:
            traceback.print_exc()
        _say("error", str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _CLICK_ERROR as exc:  # a usage error: click's message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = INTERRUPTED
    except Exception as exc:  # an internal error: ours to fix
        if debug:
            traceback.print_exc()
        _say("internal error", f"{type(exc).__name__}: {exc} (run with --debug for a traceback)")
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code == INTERRUPTED:  # typer turns KeyboardInterrupt into a returned 130, so both paths end here
        _say("interrupted", "stopped before finishing; no partial output was left behind")
    sys.exit(code if isinstance(code, int) else 0)


INTERRUPTED = 130  # 128 + SIGINT, also used for SIGTERM (README: exit codes)


def _say(label: str, sentence: str) -> None:
    """One line on stderr: the sentence verbatim (no rich markup inside it, no wrapping), so CI logs can grep it."""
    # control characters (a newline in a hostile tensor name or path) are shown escaped, keeping it one line
    sentence = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in sentence)
    console.print(f"[bold red]{label}:[/] {escape(sentence)}", soft_wrap=True)
