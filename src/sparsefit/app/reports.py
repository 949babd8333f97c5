"""Reports of the application layer: the share of the gap closed, and the `sparsefit run` report."""

from __future__ import annotations

import json
import math

from sparsefit.app.guard import GuardResult
from sparsefit.text import markdown_table


def gap_closed(dense: float, pruned: float, recovered: float, log: bool = False) -> float | None:
    """Share of the dense-to-pruned perplexity gap that ``recovered`` closes (1 = back to dense; < 0 = worse).

    ``log``: the same share in log-perplexity (mean loss per token), where a 44x blow-up is not 44 units; DESIGN.md
    says why both are reported. None when a value is not finite or positive, or pruning left perplexity unchanged.
    """
    values = (dense, pruned, recovered)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or min(values) <= 0:
        return None
    if log:
        dense, pruned, recovered = math.log(dense), math.log(pruned), math.log(recovered)
    gap = pruned - dense
    return None if gap == 0 else (pruned - recovered) / gap


def gap_closed_both(dense: float, pruned: float, recovered: float) -> dict:
    return {"linear": gap_closed(dense, pruned, recovered), "log": gap_closed(dense, pruned, recovered, log=True)}


def task_score(result: dict) -> float:
    """The headline number of a task's result: acc_norm, else acc (zero-shot), else exact_match (generative)."""
    return next(result[key] for key in ("acc_norm", "acc", "exact_match") if key in result)


def recipe_report(summary: dict, method_section: str | None) -> str:
    """``report.md`` of `sparsefit run`: dense / pruned / recovered side by side, the gap closed, the timings."""
    rows = summary["rows"]
    corpora = list(rows["dense"].get("ppl", {}))
    tasks = list(rows["dense"].get("tasks", {}))
    header = ["model", *[f"ppl {c}" for c in corpora], *tasks, "sparsity"]
    table = []
    for name, row in rows.items():
        table.append([name, *[round(row["ppl"][c]["value"], 3) for c in corpora],
                      *[round(task_score(row["tasks"][t]), 4) for t in tasks],
                      round(row.get("sparsity", 0.0), 4)])  # fmt: skip
    recipe = summary["recipe"]
    ev = recipe["eval"]
    first = rows["dense"]["ppl"][corpora[0]] if corpora else None
    lines = [
        f"# sparsefit run `{recipe['name']}`\n",
        *([f"First tuned on a task: {json.dumps(recipe['finetune'])}."] if recipe.get("finetune") else []),
        f"Model `{recipe['model']}`; pruning {json.dumps(recipe['prune'])}; recovery {json.dumps(recipe['recover'])}"
        + (f"; then the global pass {json.dumps(recipe['polish'])}." if recipe.get("polish") else "."),
        f"Perplexity: WikiText-2 protocol on each corpus's test split, seqlen {ev['seqlen']}, "
        f"{first['tokens'] if first else 0} tokens per corpus (max_tokens {ev['max_tokens']}). "
        f"Device {summary['device']}.\n",
        markdown_table(header, table),
    ]
    if "gap_closed" in summary:
        gap_rows = [[c, g["linear"], g["log"]] for c, g in summary["gap_closed"].items()]
        lines += ["Share of the dense-to-pruned gap that recovery closes:\n",
                  markdown_table(["corpus", "linear", "log-perplexity"], gap_rows)]  # fmt: skip
    if "guard" in summary:  # the model guard's verdict on the recovered model (app/guard.py)
        lines.append(GuardResult(**summary["guard"]).line() + ".\n")
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items()) + "\n")
    if method_section:
        lines.append(method_section.replace("\n# ", "\n## ").replace("# ", "## ", 1))
    return "\n".join(lines)
