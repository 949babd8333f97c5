"""SparseGPT (Frantar & Alistarh): OBS-style pruning with the inverse Hessian of the layer-wise squared error.

Follows the reference ``SparseGPT.fasterprune``: H = 2/n sum X X^T in float32, dead inputs fixed, 1% mean-diagonal
dampening, upper Cholesky factor of H^-1, column blocks of ``blocksize``. Unstructured masks are chosen per block
from w^2 / diag(Hinv)^2; N:M masks every M columns inside the loop. Two deliberate differences: the per-block
prune counts are exact and add up to exactly ``int(numel * sparsity)`` (the reference's ``<=`` threshold prunes
one extra weight per block and every tie), and ties are broken by a stable sort.

Masks only (``update_weights=False``) gives the masks of the EBFT release's ``fasterprune``: it runs the same sweep but
never changes a weight (its ``q`` is an unpruned copy, so the error is zero and nothing reaches later columns), so
every mask comes from the original weights (dead inputs zeroed) and the same Hinv factor: per block from
w^2 / diag(Hinv)^2, or per group of M for N:M. The new weight is the original with the pruned entries zeroed. The
differences from that release are the two above (it keeps ``tmp > thresh``, the same rule as the reference's ``<=``
prune, and its N:M ``topk`` breaks ties in no set order) and one more: kept weights of dead inputs (only possible
when they outnumber the pruned count, their score being 0) keep their value, where the release zeroes them.
"""

from __future__ import annotations

import math

import torch

from sparsefit.distributed import active, all_reduce_sum
from sparsefit.errors import UsageError
from sparsefit.models.adapters import weight_matrix
from sparsefit.prune.masks import Pruner, flatten_inputs, prune_lowest
from sparsefit.prune.pattern import Pattern


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dampen ``hessian`` (a copy) and return (upper Cholesky factor of its inverse, dead-input mask)."""
    h = hessian.detach().float().clone()
    cols = h.shape[0]
    diag = torch.arange(cols, device=h.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1  # inputs that never fire: make H invertible; their weights are zeroed by the caller
    h[diag, diag] += percdamp * torch.mean(torch.diag(h))

    def fail() -> UsageError:
        return UsageError(
            f"sparsegpt: Cholesky factorization of the {cols}x{cols} Hessian failed with percdamp {percdamp}; "
            "increase percdamp (e.g. 0.1) or use more calibration data"
        )

    if not torch.isfinite(h).all():
        raise fail()
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise fail()
    hinv = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info.item() != 0 or not torch.isfinite(upper).all():
        raise fail()
    return upper, dead


def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    update_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune one (out, in) weight matrix given its Hessian; pure (the inputs are not modified).

    Returns (new float32 weight, bool keep mask, reconstruction loss estimate). With ``update_weights=False``
    (the EBFT release's "masks only" path) no weight is updated, so the masks come from the original weights, and
    the new weight is the original one with the pruned entries zeroed; the loss is then the exact
    sum of dW H dW^T / 2 over the rows, with dW the change to the weight.
    """
    original = weight.detach().float()
    w = original.clone()
    rows, cols = w.shape
    hinv, dead = inverse_hessian_factor(hessian, percdamp)
    w[:, dead] = 0
    if not update_weights:
        keep = _masks_only_keep(w, torch.diag(hinv), sparsity, pattern, blocksize)
        new = original.masked_fill(~keep, 0)
        delta = new - original
        loss = (delta @ hessian.detach().float() * delta).sum() / 2
        return new, keep, float(loss)

    prune = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = pruned, as in the reference
    losses = torch.zeros(rows, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        losses1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)

        if pattern.structured:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # Exact count per block whose running total is int(rows * i2 * s): the blocks add up to exactly
            # int(numel * s), the same count select_mask(per_row=False) would prune.
            k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
            scores = w1.square() / d1.reshape(1, -1).square()
            mask1 = ~prune_lowest(scores.reshape(-1), k, dim=0).reshape(rows, count)

        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if pattern.structured and i % pattern.m == 0:
                # Scores of the next M columns, using the weights as updated so far.
                group = w1[:, i : i + pattern.m].square() / d1[i : i + pattern.m].reshape(1, -1).square()
                mask1[:, i : i + pattern.m] = ~prune_lowest(group, pattern.m - pattern.n, dim=1)
            q = col.masked_fill(mask1[:, i], 0)  # no boolean indexing: avoids a host sync per column on GPU
            q1[:, i] = q
            losses1[:, i] = (col - q).square() / d**2
            err = (col - q) / d
            # OBS update: spread the error of removing column i over the not-yet-processed columns.
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err

        w[:, i1:i2] = q1
        prune[:, i1:i2] = mask1
        losses += losses1.sum(dim=1) / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    return w, ~prune, float(losses.sum())


def _masks_only_keep(
    w: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float | None, pattern: Pattern, blocksize: int
) -> torch.Tensor:
    """Keep mask of the sweep without weight updates: the scores never change, so each block is decided at once."""
    rows, cols = w.shape
    scores = w.square() / hinv_diag.reshape(1, -1).square()  # the same float32 ops as the sweep's block scores
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = scores[:, i1:i2]
        if pattern.structured:
            # Groups of M start at the block's first column, as in the sweep (blocks are multiples of M in practice).
            pruned, m = pattern.m - pattern.n, pattern.m
            full = (i2 - i1) // m * m
            groups = block[:, :full].reshape(rows, full // m, m)
            keep[:, i1 : i1 + full] = prune_lowest(groups, pruned, dim=2).reshape(rows, full)
            if full < i2 - i1:
                keep[:, i1 + full : i2] = prune_lowest(block[:, full:], pruned, dim=1)
        else:
            k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)  # the sweep's exact per-block count
            keep[:, i1:i2] = prune_lowest(block.reshape(-1), k, dim=0).reshape(rows, i2 - i1)
    return keep


class SparseGPTPruner(Pruner):
    """Accumulates H = 2/n sum X X^T (float32, running average as in the reference), then solves layer-wise."""

    def __init__(
        self, module: torch.nn.Module, blocksize: int = 128, percdamp: float = 0.01, update_weights: bool = True
    ) -> None:
        super().__init__(module)
        if int(blocksize) != blocksize or blocksize < 1:
            raise UsageError(f"sparsegpt blocksize {blocksize!r} is invalid; use a positive integer such as 128")
        if not isinstance(percdamp, (int, float)) or not 0.0 <= percdamp < float("inf"):
            raise UsageError(f"sparsegpt percdamp {percdamp!r} is invalid; use a non-negative fraction such as 0.01")
        self.blocksize = int(blocksize)
        self.percdamp = float(percdamp)
        self.update_weights = bool(update_weights)
        self.hessian: torch.Tensor | None = torch.zeros(
            self.columns, self.columns, dtype=torch.float32, device=self.device
        )
        self.nsamples = 0
        self.loss: float | None = None  # the solver's estimate of the layer's squared error, after prune

    def add_batch(self, inp: torch.Tensor) -> None:
        if self.hessian is None:
            raise RuntimeError("sparsegpt pruner was freed; create a new one")
        # The reference counts batch rows, not tokens: a 2-D input is one sample.
        batch = 1 if inp.dim() <= 2 else math.prod(inp.shape[:-2])
        x = flatten_inputs(inp.detach().to(self.device), self.columns)
        # Running average keeps H's scale independent of the amount of data (as float32 sums would not be).
        self.hessian *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = x * (2 / self.nsamples) ** 0.5
        self.hessian += x.t() @ x

    def reduce(self) -> None:
        """H over every rank's samples: the running averages weighted by their sample counts (float32 sums, in
        another order than one process's running average: equal up to rounding)."""
        if not active() or self.hessian is None:
            return
        self.hessian *= self.nsamples
        count = torch.tensor([float(self.nsamples)], dtype=torch.float32, device=self.hessian.device)
        all_reduce_sum(self.hessian, count)
        self.nsamples = int(count.item())
        self.hessian /= max(self.nsamples, 1)

    def prune(
        self, sparsity: float | None, pattern: Pattern | str, update_weights: bool | None = None
    ) -> torch.Tensor:
        sparsity, pattern = self._check(sparsity, pattern)
        if pattern.structured and self.blocksize % pattern.m != 0:
            raise UsageError(f"sparsegpt blocksize {self.blocksize} must be a multiple of M={pattern.m} for {pattern}")
        if self.hessian is None or self.nsamples == 0:
            raise RuntimeError("sparsegpt needs calibration inputs: call add_batch before prune")
        update = self.update_weights if update_weights is None else bool(update_weights)
        target = weight_matrix(self.module)
        new, keep, self.loss = sparsegpt_solve(
            target, self.hessian, sparsity, pattern, self.blocksize, self.percdamp, update
        )
        if update:
            target.copy_(new.to(target.dtype))
        else:
            # Only zero the pruned entries: kept weights stay bit-identical (no float32 round trip).
            target.masked_fill_(~keep, 0)
        return keep

    def free(self) -> None:
        self.hessian = None
