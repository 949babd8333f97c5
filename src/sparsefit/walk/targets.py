"""The dense side of a block-wise walk: the teacher's block and the reconstruction targets.

``sparse-path``: the dense block run on the sparse model's own inputs (EBFT's official target).
``dense-path``: the dense model's own activations at that depth; the dense inputs are carried
block to block beside the sparse ones.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
from sparsefit.walk.blocks import InMemoryBlocks
from sparsefit.walk.walker import BlockContext, BlockStep

TARGETS = ("sparse-path", "dense-path")


def check_teacher(sparse: nn.Module, teacher: nn.Module, same_shapes: bool = True) -> None:
    """The teacher must be the sparse model's dense twin: same architecture, same block shapes (``same_shapes``
    False: a structured model, whose blocks are smaller, only the architecture and block count)."""
    s_type, t_type = sparse.config.model_type, teacher.config.model_type
    if s_type != t_type:
        raise UsageError(f"teacher architecture {t_type!r} differs from the sparse model's {s_type!r}")
    s_blocks, t_blocks = get_adapter(sparse).get_blocks(sparse), get_adapter(teacher).get_blocks(teacher)
    if len(s_blocks) != len(t_blocks):
        raise UsageError(f"teacher has {len(t_blocks)} blocks, the sparse model {len(s_blocks)}")
    if not same_shapes:
        return
    for index, (s_block, t_block) in enumerate(zip(s_blocks, t_blocks, strict=True)):
        s_layers, t_layers = prunable_layers(s_block), prunable_layers(t_block)
        for name, layer in s_layers.items():
            shape = tuple(weight_matrix(layer).shape)
            other = tuple(weight_matrix(t_layers[name]).shape) if name in t_layers else None
            if shape != other:
                raise UsageError(f"teacher layer {index}.{name} has shape {other}, the sparse model's is {shape}")


class TeacherStep(BlockStep):
    """Set ``ctx.teacher_block`` and, with a ``target``, ``ctx.dense_outputs``; runs before any step changes the block.

    ``teacher``: a dense model of the same architecture whose block ``i`` is the dense block; None means the
    block itself, still dense because this step runs before pruning (the interleaved order); a block source
    (:class:`StreamedBlocks` of the dense folder) gives a second copy of just that block, read from its shards.
    ``keep_block``: set ``ctx.teacher_block`` (a copy of the block when there is no teacher) for steps that
    read the dense weights or collect statistics on the dense block (DSnoT).
    """

    def __init__(
        self, teacher: nn.Module | InMemoryBlocks | None = None, target: str | None = None, keep_block: bool = False
    ):
        if target is not None and target not in TARGETS:
            raise UsageError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        self.teacher = teacher
        self.target = target
        self.keep_block = keep_block
        self.dense_inputs: torch.Tensor | None = None

    def restore(self, carry: dict[str, torch.Tensor], first_inputs: torch.Tensor) -> None:
        if self.target == "dense-path":
            # None: the first block's dense inputs equal the sparse model's (embeddings are not pruned), copied
            # from the first block's inputs when it is reached.
            self.dense_inputs = carry.get("dense_inputs")

    def carry(self) -> dict[str, torch.Tensor]:
        return {"dense_inputs": self.dense_inputs} if self.dense_inputs is not None else {}

    def __call__(self, ctx: BlockContext) -> None:
        if isinstance(self.teacher, InMemoryBlocks):
            block = self.teacher.original(ctx.index).to(ctx.device)  # a streamed teacher: its shards, one block
        elif self.teacher is not None:
            block = get_adapter(self.teacher).get_blocks(self.teacher)[ctx.index].to(ctx.device)
        elif self.keep_block:
            block = copy.deepcopy(ctx.block)
        else:
            block = ctx.block
        if self.keep_block or self.teacher is not None:
            ctx.teacher_block = block
        if self.target is None:
            return
        if self.target == "dense-path":
            if self.dense_inputs is None:
                self.dense_inputs = ctx.activations.clone(ctx.inputs)
            ctx.dense_outputs = ctx.run_all(self.dense_inputs, block)
            self.dense_inputs = ctx.dense_outputs
        else:
            ctx.dense_outputs = ctx.run_all(ctx.inputs, block)
