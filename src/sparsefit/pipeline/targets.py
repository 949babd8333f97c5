"""Reconstruction targets for recovery steps, computed before a block is pruned or from a teacher.

``sparse-path``: the dense block run on the sparse model's own inputs (EBFT's official target).
``dense-path``: the dense model's own activations at that depth; the dense inputs are carried
block to block beside the sparse ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsefit.models.adapters import get_adapter
from sparsefit.pipeline.walker import BlockContext


@dataclass
class TargetStep:
    """Set ``ctx.dense_outputs``. Put it before the prune step (interleaved) or alone (two-step).

    ``teacher``: a dense model of the same architecture whose block ``i`` gives the targets; None
    means the block itself, still dense because this step runs before pruning.
    ``dense_inputs``: for ``dense-path``, the dense model's inputs to the current block (CPU).
    """

    target: str = "sparse-path"
    teacher: nn.Module | None = None
    dense_inputs: torch.Tensor | None = None

    def __call__(self, ctx: BlockContext) -> None:
        teacher_block = ctx.block
        if self.teacher is not None:
            teacher_block = get_adapter(self.teacher).get_blocks(self.teacher)[ctx.index].to(ctx.device)
        source = ctx.inputs
        if self.target == "dense-path":
            if self.dense_inputs is None:
                self.dense_inputs = ctx.inputs.clone()
            source = self.dense_inputs
        probe = BlockContext(
            index=ctx.index,
            name=ctx.name,
            block=teacher_block,
            inputs=source,
            kwargs=ctx.kwargs,
            device=ctx.device,
            batch_size=ctx.batch_size,
        )
        ctx.dense_outputs = probe.run_all()
        if self.target == "dense-path":
            self.dense_inputs = ctx.dense_outputs
        if self.teacher is not None:
            teacher_block.to("cpu")
