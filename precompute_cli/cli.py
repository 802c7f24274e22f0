"""The `precompute` command: convert, inspect (and verify, convert-all). Errors become one sentence and an exit code."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click
import typer
from rich.console import Console

from precompute_cli import __version__
from precompute_cli.errors import PrecomputeError
from precompute_cli.execute import execute, precompute_block
from precompute_cli.plan import load_recipe, make_plan
from precompute_cli.recipes import supported
from precompute_cli.report import analysis, conversion_report, refused, render_analysis, render_conversion
from precompute_cli.source import resolve
from precompute_cli.spec import Config

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
) -> None:
    """Fold layer 0 into a table and write the converted checkpoint to OUT."""
    src = resolve(source, revision=revision, offline=offline, token=token)
    plan = make_plan(src, load_recipe(src), table_dtype)
    if dry_run:
        _print_plan(plan, out)
        return
    with _progress("folding layer 0") as update:
        result = execute(plan, out, overwrite=overwrite, progress=update)
    report = conversion_report(plan, result)
    render_conversion(console, report)
    if json_path:
        json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")


@app.command()
def inspect(
    checkpoint: str = typer.Argument(..., help="Hub id, folder, .safetensors file or config.json."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
    assume_parallel: bool = typer.Option(False, "--assume-parallel",
                                         help="Analyse as if attention and FFN ran in parallel (paper, section 3)."),
    vocab_size: int | None = typer.Option(None, help="Analyse with this vocabulary size instead."),
    revision: str | None = REVISION,
    offline: bool = OFFLINE,
    token: str | None = TOKEN,
) -> None:
    """Explain a checkpoint: its architecture and what converting it gains, or what a converted one holds."""
    src = resolve(checkpoint, revision=revision, offline=offline, token=token)
    cfg = Config.load(src.config_path)
    if "precompute" in cfg.data:
        data = {"converted": True, "precompute": cfg.data["precompute"],
                **{k: v for k, v in load_recipe(src).spec.as_dict().items()}}
        if as_json:
            print(json.dumps(data, indent=2))
        else:
            console.print_json(json.dumps(cfg.data["precompute"]))
        return
    recipe = load_recipe(src, vocab_size)
    reason = recipe.refusal()
    if reason:
        data = refused(recipe.spec, reason)
    else:
        data = analysis(make_plan(src, recipe), assume_parallel=assume_parallel)
    data["supported_model_types"] = supported()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        render_analysis(console, data, title=f"{checkpoint}")


def _print_plan(plan, out: Path) -> None:
    console.print(f"[bold]dry run[/]: {plan.source.ref} -> {out} (nothing written)")
    console.print_json(json.dumps(precompute_block(plan)))
    for shard in plan.shards:
        how = "copy whole file" if shard.unchanged else f"{len(shard.kept)} tensors copied" + (
            " + table" if shard.has_table else "")
        console.print(f"  {shard.name}: {how}")
    for aux in plan.source.aux:
        console.print(f"  {aux.name}: copied verbatim")


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
    try:
        app(args=args, standalone_mode=False)
    except PrecomputeError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("[bold red]interrupted[/]: nothing was written")
        sys.exit(130)
    except Exception as exc:  # an internal error: ours to fix
        if debug:
            traceback.print_exc()
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (run with --debug for a traceback)")
        sys.exit(1)
    sys.exit(0)
