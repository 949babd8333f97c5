"""Hugging Face export: a plain ``save_pretrained`` checkpoint with exact zeros, plus a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sparsefit.atomic import check_output, write_atomically
from sparsefit.export.masks import MASKS_FILE, masks_bytes
from sparsefit.export.run_folder import load_run_model, read_run
from sparsefit.text import markdown_table
from sparsefit.walk.masks import model_masks

NOT_MEASURED = "not measured"


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, masks: bool = False) -> Path:
    """Export a run folder as a Hugging Face checkpoint that plain transformers loads; returns ``out``.

    ``out`` gets ``model.safetensors`` (pruned weights are exact zeros), config and tokenizer files,
    ``README.md`` (model card), ``run.json``, ``sparsity.json`` and, with ``masks``, ``masks.safetensors``.
    """

    run_json, sparsity_json = read_run(run_dir)
    check_output(out, overwrite, [("run folder", run_dir)])  # fail before the slow load
    model, tokenizer = load_run_model(run_dir)
    card = model_card(run_json, sparsity_json, masks=masks)

    def writer(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / "run.json").write_text(json.dumps(run_json, indent=2))
        (tmp / "sparsity.json").write_text(json.dumps(sparsity_json, indent=2))
        if masks:
            (tmp / MASKS_FILE).write_bytes(masks_bytes(model_masks(model)))

    return write_atomically(out, writer, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- model card


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return NOT_MEASURED if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 1e4 or value == 0:
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else NOT_MEASURED


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return markdown_table(header, [[str(c) for c in row] for row in rows]).rstrip("\n").split("\n")


def _block_of(name: str) -> tuple[int | None, str]:
    """(block index, layer name inside the block) from ``model.layers.3.mlp.up_proj``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :]) or name
    return None, name


def sparsity_by_block(sparsity_json: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-block sparsity table: one row per block, one column per layer kind."""
    layers = sparsity_json.get("layers") or {}
    blocks: dict[int | None, dict[str, dict]] = {}
    for name, info in layers.items():
        if isinstance(info, dict):
            index, inner = _block_of(name)
            blocks.setdefault(index, {})[inner] = info
    kinds = list(dict.fromkeys(inner for block in blocks.values() for inner in block))
    # Short column names (q_proj) unless two kinds share one (GPT-2's attn.c_proj and mlp.c_proj).
    short = [k.split(".")[-1] for k in kinds]
    labels = short if len(set(short)) == len(short) else kinds
    header = ["block", *labels, "all"]
    rows: list[list[str]] = []
    for index, block in blocks.items():
        zeros = sum(int(block[k].get("zeros", 0)) for k in block)
        total = sum(int(block[k].get("total", 0)) for k in block)
        row = ["—" if index is None else str(index)]
        row += [_pct(block[k].get("sparsity")) if k in block else "—" for k in kinds]
        row.append(_pct(zeros / total) if total else NOT_MEASURED)
        rows.append(row)
    return header, rows


def _results_sections(results: dict[str, Any]) -> list[str]:
    lines = ["## Results", ""]
    ppl = results.get("ppl") or {}
    lines += ["### Perplexity", ""]
    if isinstance(ppl, dict) and ppl:
        rows = []
        for corpus, r in ppl.items():
            r = r if isinstance(r, dict) else {"value": r}
            rows.append([corpus, _num(r.get("value")), _num(r.get("seqlen")), _num(r.get("tokens"))])
        lines += _table(["corpus", "perplexity", "seqlen", "tokens"], rows)
    else:
        lines.append(f"Perplexity: {NOT_MEASURED}.")
    lines += ["", "### Zero-shot", ""]
    tasks = results.get("tasks") or {}
    if isinstance(tasks, dict) and tasks:
        metrics = ["acc", "acc_norm"]
        for r in tasks.values():
            if isinstance(r, dict):
                metrics += [k for k in r if k not in metrics and k != "n"]
        rows = []
        for task, r in tasks.items():
            r = r if isinstance(r, dict) else {"acc": r}
            rows.append([task, *(_num(r[m]) if m in r else "—" for m in metrics), _num(r.get("n"))])
        lines += _table(["task", *metrics, "n"], rows)
    else:
        lines.append(f"Zero-shot: {NOT_MEASURED}.")
    return lines + [""]


def model_card(
    run_json: dict[str, Any], sparsity_json: dict[str, Any], *, masks: bool = False, export_format: str = "hf"
) -> str:
    """A Markdown model card (``README.md``) from a run's ``run.json`` and ``sparsity.json``.

    Missing results read "not measured"; nothing in ``run.json`` is required.
    """
    config = run_json.get("config") if isinstance(run_json.get("config"), dict) else {}
    source = run_json.get("source_model") or NOT_MEASURED
    method = config.get("method") or "unknown method"
    pattern = sparsity_json.get("pattern") or config.get("pattern") or "unstructured"
    target = config.get("sparsity")
    overall = sparsity_json.get("overall")
    title_sparsity = _pct(target if target is not None else overall).replace(".00%", "%")
    tags = ["sparsefit", "pruned", "sparse", str(method)]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in dict.fromkeys(tags)]
    lines += ["---", "", f"# {source}: {title_sparsity} {pattern} sparse ({method})", ""]
    if export_format == "compressed":
        lines += [
            "This is a **sparsefit compressed** checkpoint: every pruned weight matrix is stored as a packed "
            "bitmask plus its nonzero values (`model.sparse.safetensors`), everything else dense. "
            "Load it with `from sparsefit.export import load_compressed; model, tokenizer = load_compressed(path)`; "
            "the weights come back bit-exact.",
            "",
        ]
    else:
        lines += [
            "The pruned weights are stored as **exact zeros** in an ordinary safetensors checkpoint, so plain "
            "`transformers` loads it with no sparsefit import. Stored densely, the zeros save neither memory nor "
            "time until a sparse format or kernel uses them.",
            "",
        ]
    command = run_json.get("command")
    lines += ["## How it was made", ""]
    rows = [
        ["source model", source],
        ["sparsefit command", command or NOT_MEASURED],
        ["method", method],
        ["target sparsity", _pct(target) if target is not None else "—"],
        ["pattern", pattern],
        ["measured sparsity (prunable block layers)", _pct(overall)],
    ]
    if "calib" in config:
        calib = f"{config['calib']}"
        if "nsamples" in config and "seqlen" in config:
            calib += f", {config['nsamples']} × {config['seqlen']} tokens"
        rows.append(["calibration", calib])
    shown = {"method", "sparsity", "pattern", "calib", "nsamples", "seqlen"}
    rows += [[key, json.dumps(value) if isinstance(value, (dict, list)) else value]
             for key, value in config.items() if key not in shown]
    lines += _table(["setting", "value"], rows) + [""]
    results = run_json.get("results") if isinstance(run_json.get("results"), dict) else {}
    lines += _results_sections(results)
    lines += ["## Sparsity per block", ""]
    header, block_rows = sparsity_by_block(sparsity_json)
    if block_rows:
        lines += [
            "Share of exact zeros per prunable layer of each decoder block; embeddings, norms and the "
            "output layer are dense.",
            "",
            *_table(header, block_rows),
            "",
            f"Overall: {_pct(overall)}.",
        ]
    else:
        lines.append(f"Per-layer sparsity: {NOT_MEASURED}.")
    lines += ["", "## Usage", ""]
    if export_format == "compressed":
        lines += ["```python", "from sparsefit.export import load_compressed", "",
                  'model, tokenizer = load_compressed("PATH/TO/THIS/FOLDER")', "```"]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```"]
    if masks:
        lines += [
            "",
            "`masks.safetensors` holds the sparsity masks (`weight != 0`, (out, in) orientation) as packed bits, "
            "little bit order (`np.packbits(mask, axis=-1, bitorder=\"little\")`), with each layer's shape in the "
            "metadata. Keep them fixed during fine-tuning: "
            "`from sparsefit.export import load_masks; masks = load_masks(\"masks.safetensors\")`.",
        ]
    versions = run_json.get("versions")
    timings = run_json.get("timings")
    if versions or timings:
        lines += ["", "## Provenance", ""]
        if isinstance(versions, dict) and versions:
            lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
        if isinstance(timings, dict) and timings:
            lines.append("Timings (s): " + ", ".join(f"{k} {_num(v)}" for k, v in timings.items()) + ".")
    return "\n".join(lines) + "\n"
