"""Progress bars for long work, drawn on stderr so ``--json`` output on stdout stays machine-readable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


class Bar:
    """One progress task: ``advance(n)`` adds to it, ``show(done, status)`` sets it."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, amount: float) -> None:
        self._progress.update(self._task, advance=amount)

    def show(self, completed: float, status: str = "") -> None:
        self._progress.update(self._task, completed=completed, status=status)


@contextmanager
def progress_bar(description: str, total: int, visible: bool = True) -> Iterator[Bar]:
    """A bar on stderr counting up to ``total`` (tokens, steps, …) while the block runs; it clears itself on
    exit so that a final table or error line stands alone. ``visible=False`` draws nothing (quiet callers,
    ranks other than 0)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=stderr_console, transient=True, disable=not visible) as progress:
        yield Bar(progress, progress.add_task(description, total=total, status=""))
