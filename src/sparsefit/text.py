"""Plain-text rendering shared by reports, model cards and benchmarks: numbers and Markdown tables."""

from __future__ import annotations


def fmt(value, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list], digits: int = 4) -> str:
    """A Markdown table; cells that are not strings go through :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell if isinstance(cell, str) else fmt(cell, digits) for cell in row) + " |"
              for row in rows]  # fmt: skip
    return "\n".join(lines) + "\n"
