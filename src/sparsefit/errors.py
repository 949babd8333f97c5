"""The exception types users see, each a one-line message: :class:`UsageError` names the bad value and what is
accepted (exit code 2); :class:`FileError` names the damaged file or the failed write (exit code 1)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""


class FileError(RuntimeError):
    """A file that sparsefit reads is damaged, or the file system failed a write (no space left, read-only): found
    while working, not a bad argument. The message names the file and what is wrong; the CLI prints it on one line
    and exits with code 1."""


class WriteError(FileError):
    """The file system failed a write (no space left, read-only): the run may continue from its checkpoint."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`UsageError` with ``message`` when ``condition`` is false."""
    if not condition:
        raise UsageError(message)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to ``limit`` characters:
    what a one-line error quotes of a library's error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
