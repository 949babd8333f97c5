"""Rich progress bars for the CLI; the library only sees plain callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def bar(description: str, total: int) -> Iterator:
    """Yield ``update(done=None, advance=1, note=None)`` driving one progress bar on stderr."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, note="")

        def update(done: int | None = None, advance: int = 1, note: str | None = None, total: int | None = None):
            fields = {"note": note} if note is not None else {}
            if total is not None:
                fields["total"] = total
            if done is None:
                progress.update(task, advance=advance, **fields)
            else:
                progress.update(task, completed=done, **fields)

        yield update
