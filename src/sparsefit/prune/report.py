"""Sparsity report: zeros per prunable decoder-block layer (embeddings and lm_head are never pruned)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
from sparsefit.prune.masks import check_pattern
from sparsefit.prune.pattern import parse_pattern
from sparsefit.walk.masks import model_layers

Blocks = Iterable[tuple[int, nn.Module]]


def _layers(model: nn.Module, blocks: Blocks | None) -> Iterable[tuple[str, nn.Module]]:
    if blocks is None:
        yield from model_layers(model).items()
        return
    path = get_adapter(model).blocks
    for index, block in blocks:
        for name, layer in prunable_layers(block).items():
            yield f"{path}.{index}.{name}", layer


def sparsity_report(model: nn.Module, blocks: Blocks | None = None) -> dict[str, Any]:
    """``{"layers": {name: {"shape", "zeros", "total", "sparsity"}}, "overall": float}`` over block layers.

    Names are qualified from the model root (``model.layers.0.self_attn.q_proj``); shapes are (out, in).
    ``blocks``: ``(index, block)`` pairs to read instead of the model's own (the streamed path's finished
    blocks, loaded one at a time), in one pass.
    """
    return _report(_layers(model, blocks), None)


def _report(items: Iterable[tuple[str, nn.Module]], pattern) -> dict[str, Any]:
    layers: dict[str, dict[str, Any]] = {}
    zeros_all = total_all = 0
    pattern_ok = True
    for name, module in items:
        weight = weight_matrix(module)
        zeros = int((weight == 0).sum().item())
        total = weight.numel()
        layers[name] = {"shape": list(weight.shape), "zeros": zeros, "total": total,
                        "sparsity": zeros / total if total else 0.0}  # fmt: skip
        zeros_all += zeros
        total_all += total
        if pattern is not None:
            pattern_ok = pattern_ok and check_pattern(weight, pattern)
    report = {"layers": layers, "overall": zeros_all / total_all if total_all else 0.0}
    if pattern is not None:
        report["pattern_ok"] = pattern_ok
    return report


def sparsity_summary(model: nn.Module, pattern: str, blocks: Blocks | None = None) -> dict:
    """:func:`sparsity_report` plus the pattern and, for N:M, whether every layer holds it (``pattern_ok``)."""
    parsed = parse_pattern(pattern)
    report = _report(_layers(model, blocks), parsed if parsed.structured and not parsed.slim else None)
    ordered = {"layers": report["layers"], "overall": report["overall"], "pattern": pattern}
    if parsed.slim:
        # No zeros to count: the share of the dense blocks' linear weights that slicing removed, when known.
        record = getattr(model, "sparsefit_structured", None)
        ordered["structured"] = record
        ordered["zeros_overall"] = ordered["overall"]
        ordered["overall"] = record["achieved"] if record else None
    if "pattern_ok" in report:
        ordered["pattern_ok"] = report["pattern_ok"]
    return ordered
