"""Progress of long stage-2 commands on stderr: a rich bar with ETA per unit of work ((t, block),
epoch, images read) and one-line logs (a trained head's epochs). Never on stdout, so `--json` output
stays clean; `--quiet` (`set_quiet(True)`) turns both off. Extraction has its own bar
(pipelines/extract/runner.py) with image rates.

Bars nest: a bar opened while another is drawn (a sweep's kNN inside its (t, block) bar, an epoch's
images inside the epochs) is one more line under it, removed when its block ends."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_quiet = False
_drawn: Progress | None = None  # the outermost bar's display while its block runs


def set_quiet(quiet: bool) -> None:
    """Turn bars and logs off (True) or on (False) for this process."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def log(line: str) -> None:
    """One line on stderr (an epoch's loss and accuracy, say), unless quiet; printed above a bar
    being drawn."""
    if not _quiet:
        print(line, file=sys.stderr, flush=True)


@contextmanager
def bar(command: str, description: str, total: int) -> Iterator[Callable[..., None]]:
    """A bar `command description [###   ] done/total elapsed ETA` on stderr while the block runs.

    Yields `advance(n=1, description=None)`: n more units done, optionally a new description (the
    (t, block) now running). Drawn only when stderr is a terminal and not quiet; the yielded
    function works either way. Inside another bar's block, it is a line of that display."""
    global _drawn
    outer = _drawn is None
    if outer:
        _drawn = Progress(
            TextColumn("[bold]{task.fields[command]}[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=_quiet or not sys.stderr.isatty(), transient=False,
            redirect_stdout=False,  # rich would send stdout to the bar's stderr while it is drawn
        )
    progress = _drawn
    task = progress.add_task(description, total=total, command=command)

    def advance(n: int = 1, description: str | None = None) -> None:
        progress.update(task, advance=n, **({"description": description} if description is not None else {}))

    try:
        if outer:
            with progress:
                yield advance
        else:
            yield advance
    finally:
        if outer:
            _drawn = None
        else:
            progress.remove_task(task)
