"""Capture what each decoder block receives: the first block's hidden states and every block's kwargs.

The masks, rotary embeddings and position ids a block receives do not depend on the hidden states,
only on the window shape, so one pass with every block replaced by a recorder collects them (Gemma 3
gives each block its own mask and rotary table, so they are recorded per block). Caches are dropped:
a block called again with ``past_key_values`` attends to the keys of every earlier batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from sparsefit.models.adapters import Adapter
from sparsefit.walk.activations import Activations
from sparsefit.walk.device import move_non_block_modules, to_device

_DROPPED_KWARGS = ("past_key_values", "layer_past", "use_cache", "output_attentions", "cache_position")


class _StopForward(Exception):
    pass


def _hidden_name(block: nn.Module) -> str:
    return list(inspect.signature(type(block).forward).parameters)[1]


def _named_call(block: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call as keyword arguments (hidden states excluded), with caches dropped."""
    forward = type(block).forward
    bound = inspect.signature(forward).bind(block, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop("self", None)
    extra = named.pop("kwargs", {}) or {}
    named.update(extra)
    named.pop(_hidden_name(block), None)
    for key in _DROPPED_KWARGS:
        named.pop(key, None)
    return {k: v for k, v in named.items() if v is not None}


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    store_dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
    store: Activations | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Return the first block's inputs, shape (N, L, H) on the CPU, and each block's kwargs (batch 1, CPU).

    kwargs are recorded from a batch of one window and broadcast over any batch size later. With ``store``, the
    inputs are one set of it (its dtype, on disk beyond its budget) instead of ``store_dtype`` in memory.
    """
    blocks = adapter.get_blocks(model)
    move_non_block_modules(model, adapter, device)
    base = model.base_model
    block_kwargs: list[dict] = [{} for _ in blocks]

    def recorder(index: int, block: nn.Module):
        def forward(*args, **kwargs):
            block_kwargs[index] = to_device(_named_call(block, args, kwargs), "cpu")
            if index == len(blocks) - 1:
                raise _StopForward  # the final norm and head are not needed (on the streamed path, not loaded)
            return args[0] if args else kwargs[_hidden_name(block)]

        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i, block)
        try:
            base(input_ids=input_ids[:1].to(device), use_cache=False)
        except _StopForward:
            pass
    finally:
        for block in blocks:
            del block.forward  # drop the instance attribute; the class's forward is back

    # Now only the first block's hidden states: stop the forward as soon as block 0 is reached.
    first = blocks[0]
    chunks: list[torch.Tensor] = []
    dtype = store.dtype if store is not None else store_dtype
    captured: list[torch.Tensor] = []  # the whole set, allocated by ``store`` once the hidden size is known

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs[_hidden_name(module)]
        if store is None:
            chunks.append(hidden.detach().to("cpu", dtype))
        else:
            if not captured:
                captured.append(store.empty((input_ids.shape[0], *hidden.shape[1:]), dtype))
            captured[0][start : start + hidden.shape[0]] = hidden.detach().to("cpu", dtype)
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                base(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            if progress:
                progress(min(batch_size, input_ids.shape[0] - start))
    finally:
        handle.remove()
    return (torch.cat(chunks) if store is None else captured[0]), block_kwargs
