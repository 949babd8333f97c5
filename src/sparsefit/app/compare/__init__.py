"""``sparsefit compare``: every recovery method on the same masks and windows (run), its peak memory (memory),
and the table and page it writes (render)."""

from sparsefit.app.compare.render import compare_html, compare_markdown, table_rows
from sparsefit.app.compare.run import NONE, parse_methods, run_compare, tokens_per_block

__all__ = ["NONE", "compare_html", "compare_markdown", "parse_methods", "run_compare", "table_rows", "tokens_per_block"]
