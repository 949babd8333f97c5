"""The dense side of a block-wise walk: the teacher's block and the reconstruction targets.

``sparse-path``: the dense block run on the sparse model's own inputs (EBFT's official target).
``dense-path``: the dense model's own activations at that depth; the dense inputs are carried
block to block beside the sparse ones.
``mix`` or ``mix:W``: ``(1 - W) * sparse-path + W * dense-path`` (W = 0.5 by default). For a mean-squared
error this is the same fit as the two losses weighted ``1 - W`` and ``W`` (they differ by a constant), the
weighting that no reference exposes: the sparse path asks each block to repair its own inputs' damage only,
the dense path to undo the earlier blocks' too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
from sparsefit.walk.blocks import InMemoryBlocks
from sparsefit.walk.walker import BlockContext, BlockStep

TARGETS = {"sparse-path": 0.0, "dense-path": 1.0, "mix": 0.5}  # the named targets and their dense-path share


def dense_share(target: str) -> float:
    """The dense path's share ``W`` of a target: sparse-path 0, dense-path 1, mix 0.5, ``mix:W`` W (0 < W < 1)."""
    if target in TARGETS:
        return TARGETS[target]
    kind, _, weight = str(target).partition(":")
    try:
        share = float(weight) if kind == "mix" else None
    except ValueError:
        share = None
    if share is None or not 0.0 < share < 1.0:
        raise UsageError(f"target {target!r} is not one of sparse-path, dense-path, mix, or mix:W with 0 < W < 1 "
                         "(W: the dense path's share)")  # fmt: skip
    return share


def mix_targets(sparse_path: torch.Tensor, dense_path: torch.Tensor, share: float, out: torch.Tensor,
                batch: int = 64) -> torch.Tensor:  # fmt: skip
    """``(1 - share) * sparse_path + share * dense_path`` into ``out`` (either may live on disk), in float32."""
    for start in range(0, out.shape[0], batch):
        rows = slice(start, start + batch)
        mixed = torch.lerp(sparse_path[rows].float(), dense_path[rows].float(), share)
        out[rows] = mixed.to(out.dtype)
    return out


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
        self.share = None if target is None else dense_share(target)  # one line naming the bad target
        self.teacher = teacher
        self.target = target
        self.keep_block = keep_block
        self.dense_inputs: torch.Tensor | None = None

    def restore(self, carry: dict[str, torch.Tensor], first_inputs: torch.Tensor) -> None:
        if self.share:
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
        if self.keep_block:
            # Only for a step that reads it: a teacher's block held through a fit is a second copy of the block in
            # memory (issue 22: a streamed recovery's peak).
            ctx.teacher_block = block
        if self.share is None:
            return
        dense_path = None
        if self.share > 0:
            if self.dense_inputs is None:
                self.dense_inputs = ctx.activations.clone(ctx.inputs)
            ctx.dense_path_inputs = self.dense_inputs
            dense_path = ctx.dense_path_outputs = self.dense_inputs = ctx.run_all(self.dense_inputs, block)
        if self.share == 1:
            ctx.dense_outputs = dense_path
            return
        sparse_path = ctx.run_all(ctx.inputs, block)
        if dense_path is not None:
            sparse_path = mix_targets(sparse_path, dense_path, self.share, out=sparse_path)
        ctx.dense_outputs = sparse_path
