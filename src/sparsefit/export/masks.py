"""Sparsity masks as packed bits in a safetensors file, for mask-preserving fine-tuning later.

File format (``masks.safetensors``):

- one ``uint8`` tensor per prunable block layer, named by its qualified module name
  (``model.layers.0.self_attn.q_proj``): the boolean mask ``weight != 0`` in (out, in) orientation
  (the orientation of :func:`sparsefit.models.weight_matrix`; GPT-2's Conv1D ``.weight`` is its transpose),
  packed along the last (input) dimension like ``np.packbits(mask, axis=-1, bitorder="little")``:
  bit ``j`` (least significant first) of byte ``k`` in a row is input column ``8 * k + j``; the unused
  high bits of a row's last byte are zero. Packed shape: ``(out, ceil(in / 8))``.
- safetensors metadata: ``format = "sparsefit-masks"``, ``version = "1"``, ``bitorder = "little"``,
  ``orientation = "out_in"``, and for every layer ``<name> = "[out, in]"`` (its unpacked shape).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsefit.atomic import write_file_atomically
from sparsefit.errors import UsageError
from sparsefit.walk.masks import model_masks

MASKS_FILE = "masks.safetensors"
FORMAT = "sparsefit-masks"
VERSION = "1"
BITORDER = "little"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor along its last dim into uint8 (little bit order), shape ``(..., ceil(n / 8))``."""
    array = mask.detach().to("cpu", torch.bool).numpy()
    return torch.from_numpy(np.packbits(array, axis=-1, bitorder=BITORDER))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` packed into ``packed``."""
    count = int(shape[-1])
    array = np.unpackbits(packed.detach().cpu().numpy(), axis=-1, count=count, bitorder=BITORDER)
    return torch.from_numpy(array.astype(bool)).reshape(tuple(shape))


def packed_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return (*tuple(shape[:-1]), math.ceil(int(shape[-1]) / 8))


def masks_bytes(masks: Mapping[str, torch.Tensor]) -> bytes:
    """The masks file's content (see the module docstring)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": FORMAT, "version": VERSION, "bitorder": BITORDER, "orientation": "out_in"}
    for name, mask in masks.items():
        if mask.dim() != 2:
            raise UsageError(f"mask of {name!r} has shape {list(mask.shape)}; masks must be 2-D (out, in)")
        tensors[name] = pack_bits(mask).contiguous()
        metadata[name] = json.dumps(list(mask.shape))
    return save(tensors, metadata=metadata)


def save_masks(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the masks of ``model`` (or a ``{name: bool mask}`` dict) to ``path`` atomically.

    ``path`` may be a folder, in which case the file is ``path/masks.safetensors``.
    """
    masks = model_masks(model) if isinstance(model, nn.Module) else dict(model)
    target = Path(path).expanduser()
    if target.is_dir():
        target = target / MASKS_FILE
    return write_file_atomically(target, masks_bytes(masks))


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{qualified layer name: BoolTensor (out, in)}`` from a masks file (or a folder holding one)."""
    from safetensors import safe_open

    from sparsefit.models.loading import read_safetensors_header

    target = Path(path).expanduser()
    if target.is_dir():
        target = target / MASKS_FILE
    if not target.is_file():
        raise UsageError(f"masks file {str(target)!r} does not exist; export with --masks to write one")
    read_safetensors_header(target)  # a truncated file: one line, before safetensors' own message
    bad = f"{str(target)!r} is not a valid sparsefit masks file"
    try:
        with safe_open(str(target), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise UsageError(f"{bad} (no format={FORMAT} in its metadata)")
            if metadata.get("bitorder") != BITORDER:
                raise UsageError(f"{bad} (bit order {metadata.get('bitorder')!r}; expected {BITORDER!r})")
            masks: dict[str, torch.Tensor] = {}
            for name in handle.keys():
                packed = handle.get_tensor(name)
                masks[name] = _unpack_checked(name, packed, metadata.get(name), bad)
    except UsageError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupted header
        text = str(exc).strip().splitlines()
        raise UsageError(f"{bad} ({text[0] if text else type(exc).__name__})") from None
    return masks


def _unpack_checked(name: str, packed: torch.Tensor, shape_text: str | None, bad: str) -> torch.Tensor:
    try:
        shape = json.loads(shape_text) if shape_text is not None else None
    except ValueError:
        shape = None
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise UsageError(f"{bad} (layer {name!r} has no valid [out, in] shape in the metadata)")
    if packed.dtype != torch.uint8 or tuple(packed.shape) != packed_shape(shape):
        raise UsageError(
            f"{bad} (layer {name!r}: packed tensor {packed.dtype} {list(packed.shape)} does not fit shape {shape})"
        )
    mask = unpack_bits(packed, shape)
    # The padding bits of each row's last byte are written as zeros: a set one means the data were damaged.
    if int(pack_bits(mask).ne(packed).sum()) != 0:
        raise UsageError(f"{bad} (layer {name!r}: padding bits are set; the file is damaged)")
    return mask
