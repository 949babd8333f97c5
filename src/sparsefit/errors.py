"""The one exception type users see: a one-line message naming the bad value and what is accepted."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`UsageError` with ``message`` when ``condition`` is false."""
    if not condition:
        raise UsageError(message)
