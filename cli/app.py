"""The typer app, shared option parsing and error handling of every `featurestore` command."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

import typer

app = typer.Typer(help="Extract diffusion features once into a zarr store; probe, compare and retrieve from the cache.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
backbones_app = typer.Typer(help="The registered backbones and their block tables.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")

EXIT_ERROR = 1
EXIT_SOME_FAILED = 3  # extraction finished, but some images could not be read


def user_errors(command: Callable) -> Callable:
    """Bad input (a manifest, a store, weights, an option) ends with one clear line and exit 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper


def parse_timesteps(text: str | None) -> list[int] | None:
    """`10,100,300`; None or empty: the backbone's defaults."""
    if not text:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"timesteps must be integers separated by commas, got {text!r}") from None


def parse_blocks(text: str) -> list[str] | None:
    return None if text.strip() == "all" else [b.strip() for b in text.split(",") if b.strip()]


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
