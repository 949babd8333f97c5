"""Plain-text rendering shared by reports, model cards and benchmarks: numbers and Markdown tables."""

from __future__ import annotations


def fmt(value, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def cell(value, digits: int = 4) -> str:
    """One table cell: strings as they are (a ``|`` escaped, on one line), anything else through :func:`fmt`."""
    text = value if isinstance(value, str) else fmt(value, digits)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list], digits: int = 4) -> str:
    """A Markdown table, one row per line, ending in a newline."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(value, digits) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
