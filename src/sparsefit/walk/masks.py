"""Masks by qualified layer name: the one place that reads, applies and compares a sparse model's masks.

A keep mask is a bool tensor in (out, in) orientation (``weight_matrix``'s; GPT-2's Conv1D stores the
transpose), named by the layer's qualified module name (``model.layers.3.mlp.down_proj``). A sparse model's
masks are its exact zeros: a weight is kept when it is not exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix, weight_orientation

Masks = dict[str, torch.Tensor]


def model_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer of the decoder blocks, by qualified name, in block order."""
    adapter = get_adapter(model)
    return {
        f"{adapter.blocks}.{index}.{name}": layer
        for index, block in enumerate(adapter.get_blocks(model))
        for name, layer in prunable_layers(block).items()
    }


def block_masks(block: nn.Module) -> Masks:
    """Keep masks of one block, by the layer's name inside the block."""
    return {name: weight_matrix(layer) != 0 for name, layer in prunable_layers(block).items()}


def model_masks(model: nn.Module) -> Masks:
    """Keep masks of every prunable layer (one byte per weight), by qualified name."""
    return {name: weight_matrix(layer) != 0 for name, layer in model_layers(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every weight outside its mask in place; kept weights stay bit-identical (``masked_fill_``).

    ``masks`` may name any subset of the model's modules; a name that is not a module of the model or a
    shape that does not fit its weight is a UsageError (masks made for another model).
    """
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        if name not in modules:
            raise UsageError(f"mask layer {name!r} is not a module of this model; were the masks made for it?")
        weight = weight_matrix(modules[name])
        if tuple(weight.shape) != tuple(keep.shape):
            raise UsageError(
                f"mask of {name!r} has shape {list(keep.shape)} but the weight is {list(weight.shape)} (out, in)"
            )
        weight.masked_fill_(~keep.to(device=weight.device, dtype=torch.bool), 0)


def mask_gradients(layers: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> list:
    """Hooks that zero the gradient of every pruned weight of ``layers`` (by the same names as ``masks``).

    Masked before any clipping or optimizer step sees them, so a gradient norm counts only the kept weights and
    a pruned weight with zero moments stays exactly zero under AdamW. The mask is oriented like the stored weight
    by the layer's type (GPT-2's Conv1D stores (in, out)), never by comparing shapes: a square Conv1D has the same
    shape either way. Returns the hook handles; remove them when training ends.
    """
    handles = []
    for name, layer in layers.items():
        keep = masks[name].to(layer.weight.device)
        stored_keep = keep.t() if weight_orientation(layer) == "in_out" else keep
        handles.append(layer.weight.register_hook(lambda grad, m=stored_keep: grad * m))
    return handles


def same_zeros(model: nn.Module, masks: Masks) -> bool:
    """True when the model's zero positions are exactly the pruned positions of ``masks``."""
    return all(torch.equal(weight_matrix(layer).cpu() != 0, masks[name].cpu())
               for name, layer in model_layers(model).items())  # fmt: skip


def pruned_count(masks: Masks) -> int:
    return sum(int((~keep).sum()) for keep in masks.values())


def pruned_share(masks: Masks) -> float:
    """The share of the masked weights that are pruned (0 for no masks)."""
    total = sum(keep.numel() for keep in masks.values())
    return pruned_count(masks) / total if total else 0.0
