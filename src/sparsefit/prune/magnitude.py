"""Magnitude pruning: score |W|, ranked over the whole matrix (as the Wanda repository's baseline does)."""

from __future__ import annotations

import torch

from sparsefit.models.adapters import weight_matrix
from sparsefit.prune.masks import Pruner, apply_mask, select_mask
from sparsefit.prune.pattern import Pattern


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32, shape (out, in)."""
    return weight.detach().float().abs()


class MagnitudePruner(Pruner):
    """Needs no calibration data; unstructured masks are chosen per layer (one threshold for the matrix)."""

    needs_calibration = False

    def prune(self, sparsity: float | None, pattern: Pattern | str) -> torch.Tensor:
        sparsity, pattern = self._check(sparsity, pattern)
        keep = select_mask(magnitude_scores(weight_matrix(self.module)), sparsity, pattern, per_row=False)
        apply_mask(self.module, keep)
        return keep
