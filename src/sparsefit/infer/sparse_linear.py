"""A linear layer that keeps its pruned weight compressed and multiplies without decompressing it.

The weight is stored as the compressed export stores it (a bitmask per row, little bit order, and the kept values
in row-major order) plus the start of each row's values. Decoding (a few tokens per call) runs the compiled
kernel; prefill (many tokens) unpacks the weight into a temporary dense matrix and calls torch's matmul, whose
cost the many tokens share, so the model never holds a dense copy between calls.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.export.masks import pack_bits, unpack_bits
from sparsefit.infer import kernel as compiled
from sparsefit.infer import layout

VALUES = tuple(layout.VALUE_KINDS)  # float32, bf16, int8
PREFILL_TOKENS = 16  # from this many tokens per call on, the unpacked dense matmul (prefill may stay dense)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with W as a bitmask and its kept values (float32, bf16 or int8 with per-row scales)."""

    def __init__(self, bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                 bias: torch.Tensor | None = None, value_dtype: str = "float32") -> None:  # fmt: skip
        super().__init__()
        if value_dtype not in VALUES:
            raise UsageError(f"sparse values {value_dtype!r}: use {', '.join(VALUES)}")
        out_features, in_features = (int(n) for n in shape)
        if tuple(bitmask.shape) != (out_features, (in_features + 7) // 8) or bitmask.dtype != torch.uint8:
            raise UsageError(f"bitmask of shape {tuple(bitmask.shape)} does not pack a "
                             f"[{out_features}, {in_features}] weight")  # fmt: skip
        self.in_features, self.out_features, self.value_dtype = in_features, out_features, value_dtype
        row_start = layout.row_starts(bitmask, in_features)
        if int(row_start[-1]) != values.numel():
            raise UsageError(f"bitmask keeps {int(row_start[-1])} weights but {values.numel()} values are given")
        values, scales = layout.stored_values(values, row_start, value_dtype)
        self.register_buffer("bitmask", bitmask.contiguous())
        self.register_buffer("values", values)
        self.register_buffer("row_start", row_start)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    value_dtype: str = "float32") -> SparseLinear:  # fmt: skip
        """From a dense ``[out, in]`` weight: its nonzeros are the kept weights."""
        weight = weight.detach().float().cpu()
        keep = weight != 0
        return cls(pack_bits(keep), weight[keep], tuple(weight.shape), bias, value_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, value_dtype: str = "float32") -> SparseLinear:
        return cls.from_weight(linear.weight, linear.bias, value_dtype)

    def weight_bytes(self) -> int:
        """Bytes the layer's weight takes (mask, values without their padding, row starts, scales): what it reads."""
        kept = (self.values.numel() - layout.PAD) * self.values.element_size()
        extra = self.scales.numel() * 4 if self.scales is not None else 0
        return self.bitmask.numel() + kept + self.row_start.numel() * 8 + extra

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense float32 matrix (its values as stored: bf16 and int8 dequantized)."""
        if compiled.problem() is None:
            shape = (self.out_features, self.in_features)
            return compiled.unpack(self.bitmask, self.values, self.row_start, self.scales, shape)
        keep = unpack_bits(self.bitmask, (self.out_features, self.in_features))
        values = self.values[: self.values.numel() - layout.PAD].float()
        if self.scales is not None:
            counts = (self.row_start[1:] - self.row_start[:-1]).long()
            values = values * torch.repeat_interleave(self.scales, counts)
        weight = torch.zeros(self.out_features, self.in_features)
        weight[keep] = values
        return weight

    def _bound_call(self) -> tuple:
        """The kernel call with this layer's buffers bound: ``(values pointer, function, leading arguments, bias
        pointer, isa)``, taken again only when the buffers moved (``.to()``, ``load_state_dict``).

        A decode step calls ~200 layers: binding the pointers once keeps the call's own cost small (the kernel call
        itself is ~2.5 us through ctypes; taking five buffers' pointers on every call doubled it).
        """
        buffers = self._buffers
        values = buffers["values"]
        bound = self.__dict__.get("_bound")
        if bound is None or bound[0] != values.data_ptr():
            scales, bias = buffers["scales"], buffers["bias"]
            lib = compiled.kernel()
            head = (buffers["bitmask"].data_ptr(), values.data_ptr(), compiled.KINDS[values.dtype],
                    buffers["row_start"].data_ptr(), scales.data_ptr() if scales is not None else None)  # fmt: skip
            bound = (values.data_ptr(), lib.lib.sf_sparse_linear, head,
                     bias.data_ptr() if bias is not None else None, lib.isa)  # fmt: skip
            self.__dict__["_bound"] = bound
        return bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, out = self.in_features, self.out_features
        tokens = x.numel() // inp if inp else 0
        if tokens >= PREFILL_TOKENS or x.device.type != "cpu" or x.requires_grad and torch.is_grad_enabled():
            bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return nn.functional.linear(x, self.dense_weight().to(x.device, x.dtype), bias)
        _, call, head, bias, isa = self._bound_call()
        x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        y = torch.empty(x.shape[:-1] + (out,))
        call(*head, x2.data_ptr(), bias, y.data_ptr(), out, inp, tokens, isa, torch.get_num_threads())
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        kept = self.values.numel() - layout.PAD
        density = kept / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, "
                f"values={self.value_dtype}")  # fmt: skip
