"""The one driver for every block-wise method: capture, the walk, checkpoints, ``--resume`` and progress.

Pruning (Wanda, SparseGPT, magnitude), EBFT, DSnoT and any later block-wise method hand their steps to
:func:`run_blocks`; none walks the model itself. The steps decide what happens to a block (targets, pruning,
reconstruction); the driver owns everything around them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from sparsefit.models.adapters import get_adapter
from sparsefit.progress import Bar, silent
from sparsefit.walk.capture import capture_inputs
from sparsefit.walk.checkpoint import BlockCheckpoint
from sparsefit.walk.walker import BlockContext, Step, walk_blocks


def run_blocks(
    model: nn.Module,
    calib_ids: torch.Tensor,
    steps: Sequence[Step],
    *,
    device: torch.device,
    batch_size: int = 8,
    checkpoint: BlockCheckpoint | None = None,
    resume: bool = False,
    progress: Bar = silent,
    label: str = "blocks",
) -> dict:
    """Walk ``model`` on the calibration windows ``calib_ids`` (N, L) with ``steps``; the model changes in place.

    With a ``checkpoint``, every finished block is saved (weights, the next block's inputs, the steps'
    carried activations, the reports) and ``resume`` continues from the last saved block. ``progress``
    gets one bar of ``len(blocks)`` with each block's note. Returns ``{"blocks": reports, "start",
    "capture_s", "total_s"}``; each report is ``{"block": i, **what the steps recorded, "time_s"}``.
    """
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    start, reports, carry = checkpoint.start(resume) if checkpoint is not None else (0, [], {})
    if checkpoint is not None:
        checkpoint.restore_blocks(blocks, start)
    began = time.perf_counter()
    captured, block_kwargs = capture_inputs(model, adapter, calib_ids, device=device, batch_size=batch_size)
    capture_s = time.perf_counter() - began
    inputs = carry.get("inputs", captured)
    for step in steps:
        restore = getattr(step, "restore", None)
        if restore is not None:
            restore(carry, captured)
    del captured, carry

    with progress(label, len(blocks)) as update:
        update(done=start)

        def done(ctx: BlockContext, outputs: torch.Tensor) -> None:
            reports.append({"block": ctx.index, **ctx.report})
            if checkpoint is not None:
                state = {"inputs": outputs}
                for step in steps:
                    state.update(getattr(step, "carry", dict)())
                for index in ctx.changed_blocks:  # a window of blocks trained earlier ones too
                    checkpoint.save_block(index, blocks[index])
                checkpoint.save(ctx.index, ctx.block, state, reports, total=len(blocks))
            update(done=ctx.index + 1, note=ctx.summary)

        try:
            walk_blocks(model, adapter, inputs, block_kwargs, steps, device=device, batch_size=batch_size,
                        start=start, on_block_done=done, note=lambda text: update(note=text))  # fmt: skip
        finally:
            model.to("cpu")
    return {"blocks": reports, "start": start, "capture_s": capture_s, "total_s": time.perf_counter() - began}
