"""Wanda (Sun et al.): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch

from sparsefit.distributed import active, all_reduce_sum
from sparsefit.models.adapters import weight_matrix
from sparsefit.prune.masks import Pruner, apply_mask, flatten_inputs, select_mask
from sparsefit.prune.pattern import Pattern


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(sum of squared inputs per input channel), float32 (out, in).

    ``sq_norms`` may be a sum or a mean over tokens: a per-matrix constant factor never changes the mask.
    """
    return weight.detach().float().abs() * sq_norms.to(weight.device, torch.float32).sqrt().reshape(1, -1)


class WandaPruner(Pruner):
    """Accumulates ||X_j||^2 per input channel; unstructured masks are chosen per output row."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module)
        # float64 running sum: cheap (one vector) and free of the drift of a long float32 running mean.
        self.sq_norms: torch.Tensor | None = torch.zeros(self.columns, dtype=torch.float64, device=self.device)
        self.tokens = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if self.sq_norms is None:
            raise RuntimeError("wanda pruner was freed; create a new one")
        x = flatten_inputs(inp.detach().to(self.device), self.columns)  # float32 (tokens, in)
        self.sq_norms += x.square().sum(dim=0).double()
        self.tokens += x.shape[0]

    def reduce(self) -> None:
        if active() and self.sq_norms is not None:
            tokens = torch.tensor([self.tokens], dtype=torch.float64, device=self.sq_norms.device)
            all_reduce_sum(self.sq_norms, tokens)
            self.tokens = int(tokens.item())

    def prune(self, sparsity: float | None, pattern: Pattern | str) -> torch.Tensor:
        sparsity, pattern = self._check(sparsity, pattern)
        if self.sq_norms is None or self.tokens == 0:
            raise RuntimeError("wanda needs calibration inputs: call add_batch before prune")
        keep = select_mask(wanda_scores(weight_matrix(self.module), self.sq_norms), sparsity, pattern, per_row=True)
        apply_mask(self.module, keep)
        return keep

    def free(self) -> None:
        self.sq_norms = None
