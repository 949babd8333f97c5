"""The sequential block walker shared by every block-wise method (Wanda, SparseGPT, DSnoT, EBFT).

For each decoder block in order: load it onto the device, run the steps (collect statistics and
prune, then recover), propagate the block's outputs as the next block's inputs, store it back.
Only one block is on the device at a time; activations stay on the CPU. Methods never walk the
model themselves: a step receives one :class:`BlockContext`. :func:`sparsefit.walk.driver.run_blocks`
adds capture, checkpoints, resume and progress around this loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsefit.distributed import WindowShard
from sparsefit.models.adapters import Adapter
from sparsefit.walk.activations import Activations
from sparsefit.walk.device import to_device


def _no_note(_text: str) -> None:
    return None


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
    dense_outputs: torch.Tensor | None = None  # the reconstruction target, set by a target or prune step
    # The dense model's own activations at this depth (its inputs and this dense block's outputs), set by a target
    # step with a dense-path share: the windows that build their own target (a sub-block, N blocks) mix from them.
    dense_path_inputs: torch.Tensor | None = None
    dense_path_outputs: torch.Tensor | None = None
    teacher_block: nn.Module | None = None  # the dense version of this block, on ``device``, when a step needs it
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name in block -> keep mask
    report: dict = field(default_factory=dict)
    note: Callable[[str], None] = _no_note  # a short progress note (current loss, swaps) for the block's bar
    summary: str = ""  # the note that stays on the bar once the block is done
    blocks: nn.ModuleList | None = None  # every block of the model (a window of blocks trains several)
    block_kwargs: Sequence[dict] = ()  # every block's kwargs, on the CPU
    changed_blocks: list[int] = field(default_factory=list)  # earlier blocks a step changed (to checkpoint again)
    activations: Activations = field(default_factory=Activations)  # where new activation sets are allocated
    shard: WindowShard | None = None  # which of all the windows ``inputs`` holds (under torchrun, a share)

    def __post_init__(self) -> None:
        if self.shard is None:
            self.shard = WindowShard(self.inputs.shape[0])

    def kwargs_of(self, index: int) -> dict:
        """Block ``index``'s kwargs on the device."""
        return self.kwargs if index == self.index else to_device(self.block_kwargs[index], self.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block on a batch already on the device (with autograd if enabled by the caller)."""
        return call_block(self.block, hidden, self.kwargs)

    @torch.no_grad()
    def run_all(self, inputs: torch.Tensor | None = None, block: nn.Module | None = None,
                kwargs: dict | None = None) -> torch.Tensor:  # fmt: skip
        """``block`` (default: this block) on every window, batched; a CPU tensor shaped and typed like the inputs."""
        inputs = self.inputs if inputs is None else inputs
        block = self.block if block is None else block
        kwargs = self.kwargs if kwargs is None else kwargs
        outputs = self.activations.empty_like(inputs)
        param_dtype = next(block.parameters()).dtype
        for start in range(0, inputs.shape[0], self.batch_size):
            batch = inputs[start : start + self.batch_size].to(self.device, param_dtype)
            outputs[start : start + self.batch_size] = call_block(block, batch, kwargs).to("cpu", inputs.dtype)
        return outputs


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class BlockStep:
    """One step of the walk, called with each block's :class:`BlockContext`.

    A step that carries activations from block to block (the dense path's inputs) returns them from
    :meth:`carry` after each block and gets them back in :meth:`restore` when a walk resumes, so that
    ``--resume`` continues bit-identically. Plain functions ``f(ctx)`` are steps too.
    """

    def __call__(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def carry(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, carry: dict[str, torch.Tensor], first_inputs: torch.Tensor) -> None:
        """``carry`` as saved after the last finished block (empty on a fresh walk); ``first_inputs``: block 0's."""


Step = BlockStep | Callable[[BlockContext], None]


def walk_blocks(
    model: nn.Module,
    adapter: Adapter,
    inputs: torch.Tensor,
    block_kwargs: list[dict],
    steps: Sequence[Step],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    start: int = 0,
    on_block_done: Callable[[BlockContext, torch.Tensor], None] | None = None,
    note: Callable[[str], None] = _no_note,
    source=None,
    activations: Activations | None = None,
    shard: WindowShard | None = None,
) -> torch.Tensor:
    """Run ``steps`` on every block from ``start``; return the last block's outputs (CPU).

    ``on_block_done(ctx, outputs)`` is called after each block is finished and back on the CPU: the
    place to checkpoint (``ctx.changed_blocks`` names earlier blocks a step changed too).
    ``note(text)`` receives the steps' progress notes. ``source`` (a :mod:`sparsefit.walk.blocks` source, default
    the model's own blocks) gives each block when the walk reaches it. ``shard``: which of all the calibration
    windows ``inputs`` holds (default: all of them; under torchrun, this rank's share).
    """
    device = torch.device(device)
    blocks = adapter.get_blocks(model)
    for index in range(start, len(blocks)):
        block = source.load(index) if source is not None else blocks[index]
        began = time.perf_counter()
        block.to(device)
        ctx = BlockContext(
            index=index,
            name=f"{adapter.blocks}.{index}",
            block=block,
            inputs=inputs,
            kwargs=to_device(block_kwargs[index], device),
            device=device,
            batch_size=batch_size,
            note=note,
            blocks=blocks,
            block_kwargs=block_kwargs,
            activations=activations if activations is not None else Activations(),
            shard=shard,
        )
        for step in steps:
            step(ctx)
        block.eval()
        outputs = ctx.run_all()
        block.to("cpu")
        if ctx.teacher_block is not None:
            ctx.teacher_block.to("cpu")
        ctx.report["time_s"] = time.perf_counter() - began
        ctx.dense_outputs = ctx.teacher_block = ctx.dense_path_inputs = ctx.dense_path_outputs = None
        if on_block_done:
            on_block_done(ctx, outputs)
        inputs = outputs
    return inputs
