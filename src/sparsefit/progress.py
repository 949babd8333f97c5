"""Progress as plain callbacks: what the library reports, with no idea how it is shown.

A :data:`Bar` is ``bar(description, total)``: a context manager that yields ``update(done=None, advance=1,
note=None, total=None)`` (``total`` changes the bar's length once it is known). The CLI passes one that
draws rich bars (``sparsefit.cli_progress``); the library's default, :func:`silent`, draws nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

Update = Callable[..., None]
Bar = Callable[[str, int], AbstractContextManager[Update]]


def _ignore(done=None, advance=1, note=None, total=None) -> None:
    return None


@contextmanager
def silent(description: str, total: int) -> Iterator[Update]:
    """A bar that shows nothing."""
    yield _ignore
