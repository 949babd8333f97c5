"""The sparse layer's compact layout, shared by the layer and the kernel's self-test (a file below both): a bitmask
per row (the compressed export's bit order), the kept values in row-major order with :data:`PAD` entries after the
last, each row's start, and per-row scales for int8 values."""

from __future__ import annotations

import numpy as np
import torch

from sparsefit.export.masks import BITORDER

VALUE_KINDS = {"float32": 0, "bf16": 1, "int8": 2}  # the kernel's value-type codes
PAD = 16  # values past the last kept one that the vector path may load (and masks): every buffer carries them


def padded(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.new_zeros(PAD)])


def quantize_rows(values: torch.Tensor, row_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (max |w| / 127): the kept values and the rows' scales."""
    rows = row_start.numel() - 1
    counts = (row_start[1:] - row_start[:-1]).long()
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    peak = torch.zeros(rows).scatter_reduce(0, row_of, values.abs().float(), "amax", include_self=True)
    scales = (peak / 127).clamp_min(torch.finfo(torch.float32).tiny)
    quantized = torch.round(values.float() / scales[row_of]).clamp(-127, 127).to(torch.int8)
    return quantized, scales


def row_starts(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Where each row's values start (and, last, their count) from the packed ``[out, ceil(in / 8)]`` bitmask."""
    counts = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=in_features, bitorder=BITORDER)
                              .sum(-1, dtype=np.int64))  # fmt: skip
    row_start = torch.zeros(bitmask.shape[0] + 1, dtype=torch.int64)
    row_start[1:] = counts.cumsum(0)
    return row_start


def stored_values(
    values: torch.Tensor, row_start: torch.Tensor, value_dtype: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(values as the kernel reads them, padded; per-row scales or None)`` for a value type."""
    values, scales = values.reshape(-1).float(), None
    if value_dtype == "int8":
        values, scales = quantize_rows(values, row_start)
    elif value_dtype == "bf16":
        values = values.to(torch.bfloat16)
    return padded(values), scales
