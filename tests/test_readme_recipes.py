"""Every `featurestore ...` command of the README's Recipes section parses against the current CLI:
the command exists, every option it names exists and every value converts. Nothing is run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cli.main import app

# click's UsageError, whichever click typer parses with (typer 0.29 carries its own copy)
UsageError = typer.BadParameter.__base__
README = Path(__file__).resolve().parents[1] / "README.md"


def recipes_section() -> str:
    text = README.read_text()
    start = text.index("\n## Recipes\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def recipe_commands(section: str) -> list[str]:
    """The command lines of the section: lines of its sh blocks (joined over trailing backslashes)
    and inline code spans, that start with `featurestore `. An inline span of a table row that
    starts with `--` adds its options to the command before it (rows such as "add `--flag X`")."""
    commands: list[str] = []
    in_block = False
    pending = ""
    for line in section.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            joined = pending + line.strip()
            if joined.endswith("\\"):
                pending = joined[:-1] + " "
                continue
            pending = ""
            if joined.startswith("featurestore "):
                commands.append(joined)
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if span.startswith("featurestore "):
                commands.append(span)
            elif span.startswith("--") and line.startswith("|") and commands:
                commands.append(commands[-1] + " " + span)
    return commands


def parse(command: str) -> None:
    """Parse one command line with click's parser, as `featurestore` would, without invoking it;
    raises UsageError (e.g. NoSuchOption) for a wrong command, option or value."""
    words = shlex.split(command)
    assert words[0] == "featurestore", command
    name, *rest = words[1:]  # the recipes give no options of `featurestore` itself
    group = typer.main.get_command(app)
    top = typer.Context(group, info_name="featurestore")
    sub = group.get_command(top, name)
    if sub is None:
        raise UsageError(f"no command {name!r}")
    sub.make_context(name, rest, parent=top).close()


def test_recipes_has_the_papers_commands():
    commands = recipe_commands(recipes_section())
    used = {shlex.split(c)[1] for c in commands}
    assert {"extract", "sweep", "probe", "knn", "cka", "retrieve", "fewshot", "text-embed"} <= used
    heads = {w.split()[0] for c in commands for w in c.split("--head ")[1:]}
    assert {"diffssl-linear", "diffssl-attention", "diffssl-difformer", "uhead", "vermouth-uhead"} <= heads


@pytest.mark.parametrize("command", recipe_commands(recipes_section()))
def test_recipe_command_parses(command: str):
    parse(command)


@pytest.mark.parametrize("command", [
    "featurestore knn STORE --block b24 --timestep 150 --neighbours 20",  # no such option
    "featurestore knn STORE --block b24 --timestep 150 --k",  # option without its value
    "featurestore cka STORE --grid blocks --gram-memory lots",  # not a float
    "featurestore retrive STORE",  # no such command
])
def test_a_wrong_command_is_caught(command: str):
    with pytest.raises(UsageError):
        parse(command)
