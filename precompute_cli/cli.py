"""The `precompute` command: convert, inspect (and verify, convert-all). Errors become one sentence and an exit code."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from precompute_cli import __version__, conversion, hub
from precompute_cli.census import census, counts
from precompute_cli.check import MANIFEST, failures
from precompute_cli.check import check as check_folder
from precompute_cli.errors import InputError, PrecomputeError
from precompute_cli.execute import interrupt_on_sigterm, precompute_block
from precompute_cli.modelcard import CARD_NAME
from precompute_cli.plan import load_recipe, make_plan, parse_size
from precompute_cli.recipes import supported
from precompute_cli.recipes.multimodal import TextConfig
from precompute_cli.report import analysis, refused, render_analysis, render_conversion
from precompute_cli.source import INDEX_NAME, peek, resolve
from precompute_cli.spec import Config
from precompute_cli.verify import DEFAULT_TOKENS, RUN_DTYPES, VerifyResult, render_verify, verify_checkpoint

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Precompute the first transformer layer into a per-token table.")
console = Console(stderr=True)

REVISION = typer.Option(None, "--revision", help="Hub branch, tag or commit.")
OFFLINE = typer.Option(False, "--offline", help="Resolve Hub ids from the local cache only (as HF_HUB_OFFLINE=1).")
TOKEN = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the saved login).")


@app.command()
def convert(
    source: str = typer.Argument(..., help="Hub id, local folder, .safetensors file (config.json beside it)."),
    out: Path = typer.Argument(..., help="Output folder (must not exist or be empty, unless --overwrite)."),
    revision: str | None = REVISION,
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
    table_dtype: str | None = typer.Option(None, help="float32, bfloat16, float16 (default: the checkpoint's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT (atomically)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; write nothing."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this path."),
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
    device: str = typer.Option("cpu", "--device", help="Where the table's GEMM runs: cpu, or cuda where a GPU is."),
    text_only: bool = typer.Option(False, "--text-only", help="Convert a multimodal checkpoint (gemma3, mistral3, "
                                   "llama4) to its text decoder alone; the output refuses image inputs."),
) -> None:
    """Fold layer 0 into a table and write the converted checkpoint to OUT."""
    if dry_run:
        _dry_run(source, out, revision, offline, token, table_dtype, push_to_hub, private,
                 max_shard_size=parse_size(max_shard_size) if max_shard_size else None, text_only=text_only)
        return
    if push_to_hub:
        hub.check_push_target(push_to_hub, offline, token)  # before converting, not after
    done = conversion.convert(
        source, out, revision=revision, offline=offline, token=token, table_dtype=table_dtype,
        max_shard_size=parse_size(max_shard_size) if max_shard_size else None, overwrite=overwrite, link=link,
        device=device, text_only=text_only, progress=_progress("folding layer 0"),
        reported=lambda r: render_conversion(console, r),
        verify=(lambda original, folder: _verify(original, resolve(str(folder)))) if verify_after else None)
    report, verified = done.report, done.verified
    if json_path:
        extra = {"verify": verified.as_dict()} if verified else {}
        json_path.write_text(json.dumps({**report.as_dict(), **extra}, indent=2) + "\n")
    if verified and not verified.passed:
        raise PrecomputeError(verified.failure)
    if push_to_hub:
        url = hub.publish(out, push_to_hub, report.as_dict(), precompute_block(done.plan), private=private, token=token,
                          verify=verified.as_dict() if verified else None)
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
) -> None:
    """Explain a checkpoint: its architecture and what converting it gains, or what a converted one holds."""
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
        if "precompute" in cfg.data:
            data = {"converted": True, "precompute": cfg.data["precompute"], **load_recipe(src).spec.as_dict()}
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
        console.print_json(json.dumps(data["precompute"]))
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
    results = check_folder(folder)
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
    dtype: str = typer.Option("float32", "--dtype", help=f"Run the converted model in {', '.join(RUN_DTYPES)}."),
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
) -> None:
    """Prove CONVERTED computes what ORIGINAL does: logits, top-1, greedy text, and table rows against float64."""
    result = _verify(resolve(original, offline=offline, token=token), resolve(converted, offline=offline, token=token),
                     dtype=dtype, tokens=tokens, prompt=prompt)
    if json_path:
        json_path.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    if not result.passed:
        raise PrecomputeError(result.failure)


def _verify(original, converted, **options) -> VerifyResult:
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
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
) -> None:
    """Convert and verify every model of a release file (and publish with --push); exit 1 if any failed."""
    from precompute_cli.release import SUMMARY_NAME
    from precompute_cli.release import convert_all as run

    summary = run(config, out_root, push=push, offline=offline, token=token, force=force, progress=_progress,
                  report=_print_outcome)
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


def _print_plan(plan, out: Path) -> None:
    console.print(f"[bold]dry run[/]: {plan.source.ref} -> {out} (nothing written)")
    console.print_json(json.dumps(precompute_block(plan)))
    for shard in plan.shards:
        how = "copy whole file" if shard.unchanged else f"{len(shard.kept)} tensors copied" + (
            " + table" if shard.has_table else "")
        console.print(f"  {shard.name}: {how}")
    for aux in plan.source.aux:
        console.print(f"  {aux.name}: copied verbatim")


def _dry_run(source: str, out: Path, revision: str | None, offline: bool, token: str | None,
             table_dtype: str | None, push_to: str | None, private: bool, max_shard_size: int | None = None,
             text_only: bool = False) -> None:
    """What would be downloaded, written and uploaded; nothing is (a Hub checkpoint not yet in the cache is
    sized from its safetensors headers on the Hub, and its config read through a temporary folder)."""
    with peek(source, revision=revision, offline=offline, token=token) as found:
        pull = found.pull
        if pull:
            console.print(f"[bold]download[/]: {pull.repo_id} at commit {pull.revision}: "
                          f"{pull.download_bytes:,} bytes to fetch" + (" (all in the local cache)"
                                                                       if pull.complete_in_cache else ""))
            for f in pull.files:
                console.print(f"  {f.name}: " + ("cached" if f.cached else f"{f.size or 0:,} bytes"))
        plan = make_plan(found.source, load_recipe(found.source, text_only=text_only), table_dtype, max_shard_size,
                         found.headers)
        _print_plan(plan, out)
    if found.headers is None:
        files = [s.name for s in plan.shards] + ["config.json"] + [a.name for a in plan.source.aux] + (
            [INDEX_NAME] if len(plan.shards) > 1 else [])
    else:
        files = [f.name for f in pull.files]
    if plan.bytes_before is not None:
        console.print(f"[bold]write[/]: {out}: tensor bytes {plan.bytes_before:,} -> {plan.bytes_after:,} "
                      f"({plan.bytes_after - plan.bytes_before:+,})")
    if push_to:
        console.print(f"[bold]upload[/]: {out} -> {push_to}" + (" (private)" if private else "") +
                      f": {', '.join(sorted(set(files) | {MANIFEST, CARD_NAME}))}")


class _progress:
    """A rich progress bar over vocabulary rows (on stderr, so --json output stays clean)."""

    def __init__(self, label: str):
        from rich.progress import BarColumn, Progress, TimeRemainingColumn

        self.bar = Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total}",
                            TimeRemainingColumn(), console=console, transient=True)
        self.label = label

    def __enter__(self):
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=None)

        def update(done: int, total: int) -> None:
            self.bar.update(task, completed=done, total=total)

        return update

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every failure into a message and an exit code (see README)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if args in (["--version"], ["-V"]):
        print(f"precompute-cli {__version__}")
        sys.exit(0)
    previous = interrupt_on_sigterm()
    try:
        code = app(args=args, standalone_mode=False)
    except PrecomputeError as exc:
        if debug:
            traceback.print_exc()
        _say("error", str(exc))
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
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
