"""Recover an already-pruned model block by block against a dense teacher (the two-step mode)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
from sparsefit.pipeline.capture import capture_inputs
from sparsefit.pipeline.targets import TargetStep
from sparsefit.pipeline.walker import BlockContext, BlockStep, walk_blocks


def check_teacher(sparse: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be the sparse model's dense twin: same architecture, same block shapes."""
    s_type, t_type = sparse.config.model_type, teacher.config.model_type
    if s_type != t_type:
        raise UsageError(f"teacher architecture {t_type!r} differs from the sparse model's {s_type!r}")
    s_blocks, t_blocks = get_adapter(sparse).get_blocks(sparse), get_adapter(teacher).get_blocks(teacher)
    if len(s_blocks) != len(t_blocks):
        raise UsageError(f"teacher has {len(t_blocks)} blocks, the sparse model {len(s_blocks)}")
    for index, (s_block, t_block) in enumerate(zip(s_blocks, t_blocks, strict=True)):
        s_layers, t_layers = prunable_layers(s_block), prunable_layers(t_block)
        for name, layer in s_layers.items():
            shape = tuple(weight_matrix(layer).shape)
            other = tuple(weight_matrix(t_layers[name]).shape) if name in t_layers else None
            if shape != other:
                raise UsageError(f"teacher layer {index}.{name} has shape {other}, the sparse model's is {shape}")


def recover_model(
    model: nn.Module,
    teacher: nn.Module,
    calib_ids: torch.Tensor,
    recover_steps: Sequence[BlockStep],
    *,
    target: str = "sparse-path",
    device: torch.device,
    batch_size: int = 8,
    start: int = 0,
    carry: dict[str, torch.Tensor] | None = None,
    on_block_done: Callable[[BlockContext, torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> dict:
    """Walk the sparse ``model``; each block's targets come from ``teacher``'s block on the same depth.

    ``on_block_done(ctx, outputs, carry)`` receives what a resume needs (``inputs``, and
    ``dense_inputs`` for the dense-path target).
    """
    check_teacher(model, teacher)
    adapter = get_adapter(model)
    began = time.perf_counter()
    captured, block_kwargs = capture_inputs(model, adapter, calib_ids, device=device, batch_size=batch_size)
    carry = carry or {}
    inputs = carry.get("inputs", captured)
    targets = TargetStep(target=target, teacher=teacher, dense_inputs=carry.get("dense_inputs"))
    if target == "dense-path" and targets.dense_inputs is None:
        # The teacher's own activations at block 0 equal the sparse model's: embeddings are not pruned.
        targets.dense_inputs = captured
    del captured

    def done(ctx: BlockContext, outputs: torch.Tensor) -> None:
        if on_block_done:
            state = {"inputs": outputs}
            if targets.dense_inputs is not None:
                state["dense_inputs"] = targets.dense_inputs
            on_block_done(ctx, outputs, state)

    walk_blocks(
        model,
        adapter,
        inputs,
        block_kwargs,
        [targets, *recover_steps],
        device=device,
        batch_size=batch_size,
        start=start,
        on_block_done=done,
        progress=progress,
    )
    model.to("cpu")
    return {"total_s": time.perf_counter() - began}
