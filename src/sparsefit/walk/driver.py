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

from sparsefit import distributed
from sparsefit.distributed import WindowShard
from sparsefit.models.adapters import get_adapter
from sparsefit.progress import Bar, silent
from sparsefit.walk.activations import Activations
from sparsefit.walk.blocks import InMemoryBlocks
from sparsefit.walk.capture import capture_inputs
from sparsefit.walk.checkpoint import BlockCheckpoint
from sparsefit.walk.device import model_to
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
    source: InMemoryBlocks | None = None,
    activations: Activations | None = None,
) -> dict:
    """Walk ``model`` on the calibration windows ``calib_ids`` (N, L) with ``steps``; the model changes in place.

    With a ``checkpoint``, every finished block is saved (weights, the next block's inputs, the steps'
    carried activations, the reports) and ``resume`` continues from the last saved block. ``progress``
    gets one bar of ``len(blocks)`` with each block's note. Returns ``{"blocks": reports, "start",
    "capture_s", "total_s"}``; each report is ``{"block": i, **what the steps recorded, "time_s"}``.

    ``source`` says where the blocks live (default: in ``model``). A :class:`StreamedBlocks` source loads
    each block from its shards when the walk reaches it and stores it in the checkpoint's folder when it is
    finished (its weights then leave memory); without a checkpoint a streamed walk stores nothing (a read-only
    pass, such as OWL's pre-pass). ``activations`` keeps the activation sets in a dtype, spilled to disk
    beyond a memory budget (default: float32 in memory).

    Under torchrun every rank walks the same blocks on its share of the windows (:class:`WindowShard`); the steps
    reduce what they collect, and rank 0 alone stores blocks and checkpoints (each rank keeps its own activations).
    """
    shard = WindowShard.of(calib_ids.shape[0])
    calib_ids = shard.take(calib_ids)
    adapter = get_adapter(model)
    source = source if source is not None else InMemoryBlocks(model)
    activations = activations if activations is not None else Activations()
    blocks = source.blocks
    start, reports, carry = checkpoint.start(resume) if checkpoint is not None else (0, [], {})
    storing = checkpoint is not None or not source.streamed
    # A window of N blocks trains N-1 earlier blocks again: those stay loaded (and come back on a resume).
    keep = max((getattr(step, "keep_blocks", 0) for step in steps), default=0)
    if source.streamed:
        source.begin(checkpoint.folder if checkpoint is not None else None)
        for index in range(max(0, start - keep), start):
            source.reload(index)
    elif checkpoint is not None:
        checkpoint.restore_blocks(blocks, start)
    if checkpoint is not None:
        activations.begin(checkpoint.folder)
    began = time.perf_counter()
    with source.modules(*adapter.embeddings):
        captured, block_kwargs = capture_inputs(model, adapter, calib_ids, device=device, batch_size=batch_size,
                                                store=activations)  # fmt: skip
    capture_s = time.perf_counter() - began
    inputs = activations.adopt(carry["inputs"]) if "inputs" in carry else captured
    for step in steps:
        restore = getattr(step, "restore", None)
        if restore is not None:
            restore({k: activations.adopt(v) for k, v in carry.items()}, captured)
    del captured, carry

    with progress(label, len(blocks)) as update:
        update(done=start)

        def done(ctx: BlockContext, outputs: torch.Tensor) -> None:
            reports.append({"block": ctx.index, **ctx.report})
            if source.streamed and storing:
                changed = [*ctx.changed_blocks, ctx.index]
                distributed.on_main(lambda: [source.store(index) for index in changed], "storing a block")
            if checkpoint is not None:
                state = {"inputs": outputs}
                for step in steps:
                    state.update(getattr(step, "carry", dict)())
                if not source.streamed:
                    for index in ctx.changed_blocks:  # a window of blocks trained earlier ones too
                        distributed.on_main(lambda i=index: checkpoint.save_block(i, blocks[i]), "checkpointing")
                checkpoint.save(ctx.index, None if source.streamed else ctx.block, state, reports, total=len(blocks))
            if ctx.index - keep >= 0:
                source.release(ctx.index - keep)
            update(done=ctx.index + 1, note=ctx.summary)

        try:
            walk_blocks(model, adapter, inputs, block_kwargs, steps, device=device, batch_size=batch_size,
                        start=start, on_block_done=done, note=lambda text: update(note=text), source=source,
                        activations=activations, shard=shard)  # fmt: skip
        finally:
            model_to(model, "cpu")
            for index in range(len(blocks)):
                source.release(index)
    return {"blocks": reports, "start": start, "capture_s": capture_s, "total_s": time.perf_counter() - began}
