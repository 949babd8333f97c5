"""Sparsity report: zeros per prunable decoder-block layer (embeddings and lm_head are never pruned)."""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """``{"layers": {name: {"shape", "zeros", "total", "sparsity"}}, "overall": float}`` over block layers.

    Names are qualified from the model root (``model.layers.0.self_attn.q_proj``); shapes are (out, in).
    """
    adapter = get_adapter(model)
    layers: dict[str, dict[str, Any]] = {}
    zeros_all = total_all = 0
    for index, block in enumerate(adapter.get_blocks(model)):
        for name, module in prunable_layers(block).items():
            weight = weight_matrix(module)
            zeros = int((weight == 0).sum().item())
            total = weight.numel()
            layers[f"{adapter.blocks}.{index}.{name}"] = {
                "shape": list(weight.shape),
                "zeros": zeros,
                "total": total,
                "sparsity": zeros / total if total else 0.0,
            }
            zeros_all += zeros
            total_all += total
    return {"layers": layers, "overall": zeros_all / total_all if total_all else 0.0}
