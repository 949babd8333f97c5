"""Rendering of ``sparsefit compare``'s result: the Markdown table and a self-contained HTML page with SVG charts."""

from __future__ import annotations

import html

from sparsefit.text import markdown_table


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (the same in Markdown and HTML)."""
    corpora = result["settings"]["eval_corpora"]
    header = ["method", "status"]
    header += [f"ppl {c}" for c in corpora]
    header += [f"gap closed {c} (lin / log)" for c in corpora]
    header += ["tokens/block", "time s", "peak MB", "trainable", "sparsity"]
    rows = [["dense", "–", *[_fmt(result["dense"]["ppl"].get(c)) for c in corpora], *["–"] * len(corpora),
             "–", "–", "–", "–", "–"]]  # fmt: skip

    def row(label: str, entry: dict) -> list[str]:
        gaps = [f"{_pct(entry.get('gap_closed', {}).get(c))} / {_pct(entry.get('gap_closed_log', {}).get(c))}"
                for c in corpora]  # fmt: skip
        return [label, entry.get("status", "ok"), *[_fmt(entry.get("ppl", {}).get(c)) for c in corpora], *gaps,
                _fmt(entry.get("tokens_per_block")), _fmt(entry.get("time_s"), 1), _fmt(entry.get("peak_mem_mb"), 0),
                _fmt(entry.get("trainable_params")), _fmt(entry.get("sparsity"), 4)]  # fmt: skip

    for name, entry in result["methods"].items():
        rows.append(row(name, entry))
        if "unmerged" in entry:
            rows.append(row(f"{name} (unmerged adapter)", {"status": "ok", **entry["unmerged"]}))
    return header, rows


def _notes(result: dict) -> list[str]:
    s = result["settings"]
    what = f"{s['pattern']}" if s["pattern"] != "unstructured" else f"{s['sparsity']:.0%} unstructured"
    if s.get("structured"):  # heads and channels removed: the asked and achieved share, the widths kept
        st = s["structured"]
        what = (f"structured {s['sparsity']:.0%} (achieved {st['achieved']:.1%} of block weights: heads "
                f"{st['kept']['heads']}/{st['dense']['heads']}, KV {st['kept']['kv_heads']}/{st['dense']['kv_heads']}, "
                f"FFN {st['kept']['intermediate']}/{st['dense']['intermediate']}; {st.get('compensation_note', '')})")
    notes = [
        f"model `{result['model']}`, {s['prune']} {what}; calibration `{s['calib']}` {s['nsamples']} x {s['seqlen']} "
        f"tokens (seed {s['seed']}), the same windows for every method",
        "interleaved (the mode of record): a block-wise method (DSnoT, EBFT) prunes and recovers each block in turn, "
        "its masks and statistics from its own recovered inputs, time and memory including that pruning; two-step "
        "and the whole-model methods: on the one set of masks of `none`",
        f"budget: {s['budget_tokens']:,} {s['budget_note']}",
        f"perplexity: windows of {s['eval_seqlen']} tokens, first {_fmt(s['eval_max_tokens'])} test tokens per corpus",
        "gap closed: (pruned - method) / (pruned - dense) in perplexity (lin) and in log-perplexity (log)",
        f"peak memory: {s['peak_mem']}",
        f"device {s['device']}, dtype {s['dtype']}; `none` is the pruned model (its time and memory are the pruning's)",
    ]
    if "lora" in result["methods"]:
        notes.append("lora: the saved model is merged and re-masked; the unmerged row is the adapter as trained")
    for name, entry in result["methods"].items():
        if entry.get("status") == "failed":
            notes.append(f"{name} failed: {entry.get('error')}")
        if entry.get("teacher_restored"):
            notes.append(f"{name} changed the dense teacher; it was reloaded before the next method")
        if entry.get("status") == "ok" and entry.get("masks_kept") is False and not name.startswith("dsnot"):
            notes.append(f"{name} changed the zero positions of the masks")
    return notes


def compare_markdown(result: dict) -> str:
    header, rows = table_rows(result)
    lines = ["# sparsefit compare", "", markdown_table(header, rows)]
    lines += [*[f"- {note}" for note in _notes(result)], ""]
    return "\n".join(lines)


def _bar_chart(title: str, series: list[tuple[str, dict[str, float | None]]], corpora: list[str]) -> str:
    """A grouped bar chart as inline SVG: one group per method, one bar per corpus; zero line; values labelled."""
    colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"]
    values = [v for _, vals in series for v in vals.values() if v is not None]
    low, high = min([0.0, *values]), max([1.0, *values])
    width, height, left, top, bottom = max(420, 90 * len(series) + 80), 300, 50, 30, 60
    plot_h = height - top - bottom
    group_w = (width - left - 20) / max(1, len(series))
    bar_w = group_w * 0.8 / max(1, len(corpora))

    def y(value: float) -> float:
        return top + (high - value) / (high - low) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'font-family="sans-serif" font-size="11"><title>{html.escape(title)}</title>',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']  # fmt: skip
    for tick in (low, 0.0, 0.5, 1.0, high):
        if low <= tick <= high:
            parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                         f'stroke="{"#333" if tick == 0 else "#ddd"}"/>'
                         f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.0%}</text>')  # fmt: skip
    for g, (label, vals) in enumerate(series):
        x0 = left + g * group_w + group_w * 0.1
        for c, corpus in enumerate(corpora):
            value = vals.get(corpus)
            if value is None:
                continue
            top_y, bottom_y = sorted((y(value), y(0.0)))
            x = x0 + c * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{bar_w - 2:.1f}" height="{bottom_y - top_y:.1f}" '
                         f'fill="{colors[c % len(colors)]}"><title>{html.escape(label)} {html.escape(corpus)}: '
                         f'{value:.1%}</title></rect>')  # fmt: skip
        parts.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                     f'{html.escape(label)}</text>')  # fmt: skip
    for c, corpus in enumerate(corpora):
        x = left + c * 110
        parts.append(f'<rect x="{x}" y="{height - 22}" width="10" height="10" fill="{colors[c % len(colors)]}"/>'
                     f'<text x="{x + 14}" y="{height - 13}">{html.escape(corpus)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def compare_html(result: dict) -> str:
    """A self-contained page: the table, two inline SVG bar charts (gap closed, log and linear), the notes."""
    header, rows = table_rows(result)
    corpora = result["settings"]["eval_corpora"]
    ok = [(name, entry) for name, entry in result["methods"].items() if entry.get("status") == "ok"]
    charts = [
        _bar_chart("Share of the perplexity gap closed, in log-perplexity",
                   [(name, entry.get("gap_closed_log", {})) for name, entry in ok], corpora),
        _bar_chart("Share of the perplexity gap closed, linear",
                   [(name, entry.get("gap_closed", {})) for name, entry in ok], corpora),
    ]  # fmt: skip
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr" + (' class="failed"' if row[1] == "failed" else "") + ">"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )  # fmt: skip
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in _notes(result))
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}tr.failed td{background:#fde2e2}svg{display:block;margin:1em 0}")  # fmt: skip
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sparsefit compare</title><style>{style}"
            f"</style></head><body><h1>sparsefit compare</h1><table><thead><tr>{head}</tr></thead><tbody>{body}"
            f"</tbody></table>{''.join(charts)}<ul>{notes}</ul></body></html>\n")  # fmt: skip
