"""Sparsity report: zeros per prunable decoder-block layer (embeddings and lm_head are never pruned)."""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsefit.models.adapters import weight_matrix
from sparsefit.prune.masks import check_pattern
from sparsefit.prune.pattern import parse_pattern
from sparsefit.walk.masks import model_layers


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """``{"layers": {name: {"shape", "zeros", "total", "sparsity"}}, "overall": float}`` over block layers.

    Names are qualified from the model root (``model.layers.0.self_attn.q_proj``); shapes are (out, in).
    """
    layers: dict[str, dict[str, Any]] = {}
    zeros_all = total_all = 0
    for name, module in model_layers(model).items():
        weight = weight_matrix(module)
        zeros = int((weight == 0).sum().item())
        total = weight.numel()
        layers[name] = {"shape": list(weight.shape), "zeros": zeros, "total": total,
                        "sparsity": zeros / total if total else 0.0}  # fmt: skip
        zeros_all += zeros
        total_all += total
    return {"layers": layers, "overall": zeros_all / total_all if total_all else 0.0}


def sparsity_summary(model: nn.Module, pattern: str) -> dict:
    """:func:`sparsity_report` plus the pattern and, for N:M, whether every layer holds it (``pattern_ok``)."""
    report = sparsity_report(model)
    report["pattern"] = pattern
    parsed = parse_pattern(pattern)
    if parsed.slim:
        # No zeros to count: the share of the dense blocks' linear weights that slicing removed, when known.
        record = getattr(model, "sparsefit_structured", None)
        report["structured"] = record
        report["zeros_overall"] = report["overall"]
        report["overall"] = record["achieved"] if record else None
        return report
    if parsed.structured:
        layers = model_layers(model).values()
        report["pattern_ok"] = all(check_pattern(weight_matrix(layer), parsed) for layer in layers)
    return report
