"""Devices and moving tensors: the one place that turns a user's ``--device`` into a ``torch.device``."""

from __future__ import annotations

import torch
from torch import nn

from sparsefit import distributed
from sparsefit.errors import UsageError
from sparsefit.models.adapters import Adapter


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is cuda when present, else cpu."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is None and distributed.active():
        device = torch.device("cuda", distributed.local_rank())  # under torchrun: this rank's GPU
    return device


def to_device(value, device: torch.device | str):
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def move_non_block_modules(model: nn.Module, adapter: Adapter, device: torch.device | str) -> None:
    """Move embeddings, norms, rotary tables and the head to ``device``; the decoder blocks stay put."""
    blocks = adapter.get_blocks(model)
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        move_own_tensors(module, device)


def move_own_tensors(module: nn.Module, device: torch.device | str) -> None:
    """Move a module's own parameters and buffers (not its children's); meta tensors (not loaded) stay meta."""
    for _name, param in module.named_parameters(recurse=False):
        if not param.is_meta:
            param.data = param.data.to(device)
    for name, buf in list(module.named_buffers(recurse=False)):
        if not buf.is_meta:
            module._buffers[name] = buf.to(device)


def model_to(model: nn.Module, device: torch.device | str) -> None:
    """``model.to(device)`` for a model whose unloaded weights are on the meta device (the streamed skeleton)."""
    for module in model.modules():
        move_own_tensors(module, device)


def peak_gpu_mib() -> float | None:
    """The process's peak CUDA memory so far (MiB, ``torch.cuda.max_memory_allocated``); None when CUDA never ran."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
