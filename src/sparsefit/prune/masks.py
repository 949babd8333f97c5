"""Mask selection from scores (per row, per layer, N:M), pattern checks, and the small pruner base class.

Masks are boolean (out, in) tensors, True = keep. Selection is exact (the number of pruned weights is
``int(count * sparsity)``) and deterministic: scores are ranked with a stable sort, so among equal scores the
lower index is pruned first. Quantized checkpoints carry many exact ties, so this matters in practice.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsefit.models.adapters import weight_matrix
from sparsefit.prune.pattern import Pattern, check_sparsity, parse_pattern


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (out, in) tensor, got shape {tuple(scores.shape)}")


def prune_lowest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Keep mask that prunes the ``k`` lowest scores along ``dim`` (ties: lower index pruned first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.argsort(scores, dim=dim, stable=True).narrow(dim, 0, k)
        keep.scatter_(dim, order, False)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune exactly ``int(in * sparsity)`` per row (``per_row``) or ``int(numel * sparsity)`` per matrix."""
    _check_scores(scores)
    sparsity = check_sparsity(sparsity)
    if per_row:
        return prune_lowest(scores, int(scores.shape[1] * sparsity), dim=1)
    flat = prune_lowest(scores.reshape(-1), int(scores.numel() * sparsity), dim=0)
    return flat.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    _check_scores(scores)
    pattern.validate_width(scores.shape[1])
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    return prune_lowest(groups, pattern.m - pattern.n, dim=2).reshape(rows, cols)


def select_mask(
    scores: torch.Tensor, sparsity: float | None, pattern: Pattern | str, per_row: bool = True
) -> torch.Tensor:
    """Bool keep mask (out, in) from ``scores`` (higher = more important).

    Unstructured: exact ``sparsity`` per output row (``per_row=True``, Wanda) or over the whole matrix
    (``per_row=False``, magnitude). N:M: the pattern alone decides; ``sparsity`` is ignored (None allowed).
    """
    pattern = parse_pattern(pattern)
    if pattern.structured:
        if sparsity is not None:
            check_sparsity(sparsity)  # still reject garbage so a typo never passes silently
        return nm_mask(scores, pattern)
    if sparsity is None:
        raise ValueError("unstructured pruning needs a sparsity in [0, 1)")
    return unstructured_mask(scores, sparsity, per_row=per_row)


def check_pattern(weight: torch.Tensor, pattern: Pattern | str) -> bool:
    """True when every group of ``m`` consecutive inputs in each row of ``weight`` (out, in) has >= m-n zeros.

    Unstructured patterns impose no layout, so any matrix passes.
    """
    pattern = parse_pattern(pattern)
    if not pattern.structured:
        return True
    if weight.dim() != 2 or weight.shape[1] % pattern.m != 0:
        return False
    rows, cols = weight.shape
    zeros = (weight == 0).reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
    return bool((zeros >= pattern.m - pattern.n).all())


def flatten_inputs(inp: torch.Tensor, in_features: int) -> torch.Tensor:
    """A layer's input activations (..., in) as a float32 (tokens, in) matrix."""
    if inp.shape[-1] != in_features:
        raise ValueError(f"input has {inp.shape[-1]} features, the layer expects {in_features}")
    return inp.reshape(-1, in_features).float()


def apply_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Zero the pruned weights of ``module`` in place (works through GPT-2 Conv1D's transposed view)."""
    weight = weight_matrix(module)
    weight.masked_fill_(~keep.to(weight.device), 0)


class Pruner:
    """One layer's pruner: ``add_batch`` its inputs, then ``prune`` (in place), then ``free``.

    Under torchrun each rank adds its own windows; ``reduce`` sums the statistics over the ranks before ``prune``.

    Subclasses set ``needs_calibration`` and implement ``prune``; statistics live on the weight's device.
    """

    needs_calibration: bool = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        weight = weight_matrix(module)
        self.rows, self.columns = weight.shape
        self.device = weight.device

    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate statistics from the layer's inputs, shape (..., in_features)."""

    def reduce(self) -> None:
        """Sum the statistics over the ranks (every rank calls it, in the same order); nothing in one process."""

    def prune(self, sparsity: float | None, pattern: Pattern | str) -> torch.Tensor:
        """Zero pruned weights in place and return the bool keep mask (out, in)."""
        raise NotImplementedError

    def free(self) -> None:
        """Drop the accumulated statistics."""

    def _check(self, sparsity: float | None, pattern: Pattern | str) -> tuple[float | None, Pattern]:
        # Validate before any work so bad input fails fast with the user's value in the message.
        pattern = parse_pattern(pattern)
        pattern.validate_width(self.columns)
        if sparsity is not None or not pattern.structured:
            sparsity = check_sparsity(sparsity)
        return sparsity, pattern
