"""The sequential block walker shared by every block-wise method (Wanda, SparseGPT, DSnoT, EBFT).

For each decoder block in order: load it onto the device, run the steps (collect statistics and
prune, then recover), propagate the block's outputs as the next block's inputs, store it back.
Only one block is on the device at a time; activations stay on the CPU. Methods never walk the
model themselves: a step receives one :class:`BlockContext`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsefit.models.adapters import Adapter
from sparsefit.pipeline.capture import to_device


@dataclass
class BlockContext:
    """One decoder block and what the steps need to work on it."""

    index: int
    name: str  # qualified module name, e.g. "model.layers.3"
    block: nn.Module  # on ``device``
    inputs: torch.Tensor  # (N, L, H) on the CPU: the sparse model's own activations
    kwargs: dict  # masks, rotary tables, position ids: batch 1, on ``device``
    device: torch.device
    batch_size: int
    dense_outputs: torch.Tensor | None = None  # block(inputs) before pruning, set by the prune step
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name in block -> keep mask
    report: dict = field(default_factory=dict)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block on a batch already on the device (with autograd if enabled by the caller)."""
        out = self.block(hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_all(self, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The block on every window, batched; returns a CPU tensor shaped and typed like the inputs."""
        inputs = self.inputs if inputs is None else inputs
        outputs = torch.empty_like(inputs)
        param_dtype = next(self.block.parameters()).dtype
        for start in range(0, inputs.shape[0], self.batch_size):
            batch = inputs[start : start + self.batch_size].to(self.device, param_dtype)
            outputs[start : start + self.batch_size] = self.forward(batch).to("cpu", inputs.dtype)
        return outputs


BlockStep = Callable[[BlockContext], None]


def walk_blocks(
    model: nn.Module,
    adapter: Adapter,
    inputs: torch.Tensor,
    block_kwargs: list[dict],
    steps: Sequence[BlockStep],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    start: int = 0,
    on_block_done: Callable[[BlockContext, torch.Tensor], None] | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> torch.Tensor:
    """Run ``steps`` on every block from ``start``; return the last block's outputs (CPU).

    ``on_block_done(ctx, outputs)`` is called after each block is finished and back on the CPU: the
    place to checkpoint. ``progress(index, name)`` is called before each block.
    """
    device = torch.device(device)
    blocks = adapter.get_blocks(model)
    for index in range(start, len(blocks)):
        block = blocks[index]
        name = f"{adapter.blocks}.{index}"
        if progress:
            progress(index, name)
        began = time.perf_counter()
        block.to(device)
        ctx = BlockContext(
            index=index,
            name=name,
            block=block,
            inputs=inputs,
            kwargs=to_device(block_kwargs[index], device),
            device=device,
            batch_size=batch_size,
        )
        for step in steps:
            step(ctx)
        block.eval()
        outputs = ctx.run_all()
        block.to("cpu")
        ctx.report["time_s"] = time.perf_counter() - began
        ctx.dense_outputs = None
        if on_block_done:
            on_block_done(ctx, outputs)
        inputs = outputs
    return inputs
