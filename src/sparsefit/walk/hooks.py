"""Forward hooks, owned in one place so that none outlives the pass that needs it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def layer_inputs(layers: dict[str, nn.Module], callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``callback(name, input)`` with every input each layer sees while the context is open."""
    handles = []
    for name, layer in layers.items():

        def hook(module, args, _name=name):
            callback(_name, args[0].detach())

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
