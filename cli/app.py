"""The typer app, shared option parsing and error handling of every `featurestore` command."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Optional

import click
import typer
import typer.core

EXIT_ERROR = 1
EXIT_SOME_FAILED = 3  # extraction finished, but some images could not be read
EXIT_NONFINITE = 4  # extraction finished, but some stored features are inf/NaN (takes precedence over 3)
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (`| head -1`): 128 + SIGPIPE, as shells report it


class Commands(typer.core.TyperGroup):
    """Every command's two endings that are not errors, handled here once (click and typer would
    turn them into a bare exit code): Ctrl-C prints one line, "interrupted", with the notes the
    interrupted code added (extract: what is saved, how to resume), and exits 130; a reader that
    closes stdout early ends the command quietly, with exit 141."""

    def invoke(self, ctx: click.Context):
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
            return result
        except KeyboardInterrupt as exc:
            notes = getattr(exc, "__notes__", [])
            typer.echo("interrupted" + (": " + "; ".join(notes) if notes else ""), err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit succeeds
            raise typer.Exit(EXIT_BROKEN_PIPE) from None


app = typer.Typer(help="Extract diffusion features once into a zarr store; probe, compare and retrieve from the cache.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=Commands)
backbones_app = typer.Typer(help="The registered backbones and their block tables.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")
datasets_app = typer.Typer(help="The datasets that --dataset accepts (data_manifests/*.yaml).", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
heads_app = typer.Typer(help="Saved probe heads: import official trained heads.", no_args_is_help=True)
app.add_typer(heads_app, name="heads")


def _print_version(value: bool) -> None:
    if value:
        from featurestore.store import version_text

        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version (and git commit of a checkout), then exit.")] = False,
) -> None:
    """Options of `featurestore` itself, before any command."""

# Declarations several commands share (each command keeps its own default value).
StoreArgument = Annotated[str, typer.Argument(help="Store path or URL.")]
RunOption = Annotated[Optional[str], typer.Option(help="Run id (needed when the store holds several).")]
HoldoutOption = Annotated[Optional[float], typer.Option(help="Instead of splits: test on about this fraction (each image drawn with this probability from the seed).")]
ResultsOption = Annotated[Optional[str], typer.Option(help="Results folder (default: the store's own <store>.results/).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON.")]
# the trained heads' architecture (probe, fewshot)
WidthOption = Annotated[int, typer.Option(help="attention, difformer: token width; uhead: pyramid width.")]
DepthOption = Annotated[int, typer.Option(help="attention, difformer: transformer layers.")]
AttnHeadsOption = Annotated[int, typer.Option(help="attention, difformer, uhead: attention heads.")]
HiddenOption = Annotated[int, typer.Option(help="mlp: hidden width.")]
ExpertRunOption = Annotated[Optional[str], typer.Option(
    help="uhead: run id of an expert (e.g. a ResNet under timestep none) in this store.")]
ExpertWidthOption = Annotated[int, typer.Option(help="uhead: channels of each adapted expert map.")]
PoolingOption = Annotated[str, typer.Option(help="uhead: attention (learned query) | conv (1x1 conv + mean).")]
QuietFlag = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bar or per-epoch lines on stderr (they never go to stdout).")]
AllowIncompleteFlag = Annotated[bool, typer.Option(
    "--allow-incomplete", help="Use only the extracted images of an incomplete run (default: refuse it; "
                               "re-running the same extract resumes it). The output counts the images pending.")]


def user_errors(command: Callable) -> Callable:
    """Bad input (a manifest, a store, weights, an option) ends with one clear line and exit 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            raise  # not an error of the input: `Commands` ends quietly
        except (ValueError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper


def parse_ints(text: str, option: str) -> list[int]:
    """`1,4,16` -> [1, 4, 16]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes integers separated by commas, got {text!r}") from None


def one_value(values: list[str], option: str) -> str:
    """The value of an option that takes one, whichever spelling gave it (`--block` or `--blocks`):
    `a,b` or the option given twice is refused in one line."""
    items = split_items(values)
    if len(items) != 1:
        raise ValueError(f"{option} takes one value here, got {','.join(values)!r}; run the command once per value")
    return items[0]


def parse_timesteps(values: list[str] | None) -> list[int] | None:
    """Extraction timesteps, repeated or comma-separated (`10,100 --timesteps 300`); none given:
    None (the backbone's defaults)."""
    return parse_ints(",".join(values), "--timesteps") or None if values else None


def parse_timestep(text: str) -> int | None:
    """A timestep as the store keys it: an integer, or `none` for experts that ignore t."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--timestep takes integers or 'none' (experts), got {text!r}") from None


def parse_stored_timesteps(values: list[str] | None) -> list[int | None] | None:
    """Stored timesteps, repeated or comma-separated; none given or `all`: None (every timestep of
    the run)."""
    items = split_items(values)
    return None if items in ([], ["all"]) else [parse_timestep(t) for t in items]


def split_items(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values as one list, without repeats."""
    return list(dict.fromkeys(v.strip() for text in values or [] for v in text.split(",") if v.strip()))


def parse_lrs(values: list[str] | None) -> list[float]:
    """Learning rates, repeated or comma-separated; each must be a finite positive number."""
    from pipelines.heads.training import check_number

    try:
        lrs = [float(v) for v in split_items(values)]
    except ValueError:
        raise ValueError(f"--lr takes numbers, got {values!r}") from None
    for lr in lrs:
        check_number("--lr", lr, positive=True)
    return lrs


def parse_blocks(values: list[str] | None) -> list[str] | None:
    """Block names, repeated or comma-separated; none given or `all`: None (every block)."""
    items = split_items(values)
    return None if items in ([], ["all"]) else items


def parse_pool(text: str | None) -> dict[str, int]:
    """`4` pools every block to 4x4; `block1=2,block3=1` names blocks."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return {"*": int(text)}
        return {name.strip(): int(size) for name, size in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise typer.BadParameter(f"--pool takes SIZE or BLOCK=SIZE,..., got {text!r}") from None
