"""Evaluation of a model bigger than memory: token windows walked block by block, then the model's own head.

The embeddings give every window's hidden states; each block in turn runs on all of them (one block in memory);
the hidden states of every window are kept between blocks, as in calibration (in an :class:`Activations` store: a
dtype, on disk beyond a budget). Windows are grouped by length, so nothing is padded. Perplexity and zero-shot
both use this walk (:func:`sparsefit.evaluate.perplexity.streamed_perplexity`,
:func:`sparsefit.evaluate.zeroshot.streamed_loglikelihoods`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from sparsefit.walk.activations import Activations
from sparsefit.walk.capture import capture_inputs
from sparsefit.walk.device import model_to, to_device
from sparsefit.walk.walker import call_block


@torch.no_grad()
def walk_hidden(
    source,
    groups: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    activations: Activations | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[torch.Tensor]:
    """The last block's outputs (CPU, ``activations``' dtype) of each group of windows, a LongTensor (n, L) each.

    ``source`` is a :class:`sparsefit.walk.blocks.StreamedBlocks`. Each block runs on one window at a time, as the
    in-memory forward does with batch 1. ``progress(done, total)`` counts blocks.
    """
    model, adapter = source.model, source.adapter
    device = torch.device(device)
    store = activations if activations is not None else Activations()
    hidden, kwargs = [], []
    with source.modules(*adapter.embeddings):
        for ids in groups:
            states, block_kwargs = capture_inputs(model, adapter, ids, device=device, batch_size=1, store=store)
            hidden.append(states)
            kwargs.append(block_kwargs)
    for index in range(len(source)):
        block = source.load(index).to(device)
        dtype = next(block.parameters()).dtype
        try:
            for states, block_kwargs in zip(hidden, kwargs, strict=True):
                on_device = to_device(block_kwargs[index], device)
                for row in range(states.shape[0]):
                    out = call_block(block, states[row : row + 1].to(device, dtype), on_device)
                    states[row : row + 1] = out.to("cpu", states.dtype)
        finally:
            block.to("cpu")
            source.release(index)
        if progress is not None:
            progress(index + 1, len(source))
    return hidden


@contextmanager
def streamed_head(source, device: str | torch.device = "cpu") -> Iterator[Callable[..., torch.Tensor]]:
    """Yield ``head(input_ids (1, L), hidden (1, L, H), logits_to_keep=0)``: the logits the model's own forward gives
    after its last block (final norm, output layer, any soft-capping) when the last block hands over ``hidden``.

    Every block passes its input through and the last one returns the streamed hidden states; only the embeddings,
    the final norm and the head are loaded.
    """
    model, adapter = source.model, source.adapter
    device = torch.device(device)
    blocks = adapter.get_blocks(model)
    current: list[torch.Tensor] = []

    def passthrough(index: int):
        def forward(*args, **kwargs):
            if index == len(blocks) - 1:
                return current[0]
            return args[0] if args else next(iter(kwargs.values()))

        return forward

    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters

    def head(input_ids: torch.Tensor, hidden: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        current[:] = [hidden.to(device, next(model.get_output_embeddings().parameters()).dtype)]
        extra = {"logits_to_keep": logits_to_keep} if keeps and logits_to_keep else {}
        return model(input_ids=input_ids.to(device), use_cache=False, **extra).logits

    with source.modules(*adapter.embeddings, *source.head_paths()):
        model_to(model, device)
        try:
            for index, block in enumerate(blocks):
                block.forward = passthrough(index)
            yield head
        finally:
            for block in blocks:
                block.__dict__.pop("forward", None)
            model_to(model, "cpu")
