"""The one exception type users see: a one-line message naming the bad value and what is accepted."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`UsageError` with ``message`` when ``condition`` is false."""
    if not condition:
        raise UsageError(message)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to ``limit`` characters:
    what a one-line error quotes of a library's error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
