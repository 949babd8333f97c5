"""SparseGPT masks only (``update_weights=False``) gives the EBFT release's masks (issue 9, item 2).

The EBFT release's ``SparseGPT.fasterprune`` (sunggo/EBFT, lib/sparsegpt.py) runs the reference sweep with
``q = w.clone()``: pruned entries are never zeroed, so the error is zero, no weight changes, and every mask is chosen
from the original weights. ``_ebft_masks_only`` below transcribes that loop (a 1 in its mask means kept, as in the
release's ``layer.mask``); ``_old_sparsegpt_solve`` is sparsefit's solver as it was before the fix, which chose the
masks-only masks with the full OBS sweep and then discarded the update.
"""

from __future__ import annotations

import pytest
import torch

from sparsefit.prune import make_pruner, parse_pattern, sparsegpt_solve
from sparsefit.prune.masks import prune_lowest
from sparsefit.prune.sparsegpt import inverse_hessian_factor


def _ebft_masks_only(weight, hessian, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01, block_count=None):
    """The EBFT release's fasterprune on small tensors; returns its mask (True = kept).

    ``prune_n`` is the number KEPT per group of ``prune_m`` (the release takes the ``largest`` topk). For unstructured
    masks the release keeps ``tmp > sorted(tmp)[int(numel * sparsity)]``, pruning int(numel * sparsity) + 1 weights
    per block; ``block_count(i1, i2)``, when given, replaces that index by ``count - 1`` so that exactly ``count``
    weights are pruned (sparsefit's per-block counts).
    """
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(cols)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    M = torch.zeros(rows, cols)  # the release's layer.mask starts at zero
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        K1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            tmp = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            index = int(tmp.numel() * sparsity) if block_count is None else block_count(i1, i2) - 1
            assert index >= 0
            mask1 = tmp > torch.sort(tmp.flatten())[0][index]  # True = kept
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i : i + prune_m] ** 2 / torch.diag(Hinv1)[i : i + prune_m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=True)[1], True)
            q = w.clone()  # the release does not zero the pruned entries here ...
            K1[:, i] = mask1[:, i].float()  # ... it only records the mask
            err1 = (w - q) / d  # so the error is zero
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # and this changes nothing
            Err1[:, i] = err1
        M[:, i1:i2] = K1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # nor does this
    return M == 1


def _old_sparsegpt_solve(weight, hessian, sparsity, pattern, blocksize=128, percdamp=0.01, update_weights=True):
    """sparsefit's sparsegpt_solve before the fix (full OBS sweep; masks only discarded the update afterwards)."""
    original = weight.detach().float()
    w = original.clone()
    rows, cols = w.shape
    hinv, dead = inverse_hessian_factor(hessian, percdamp)
    w[:, dead] = 0
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    losses = torch.zeros(rows)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1, err1, losses1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        if pattern.structured:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
            scores = w1.square() / d1.reshape(1, -1).square()
            mask1 = ~prune_lowest(scores.reshape(-1), k, dim=0).reshape(rows, count)
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if pattern.structured and i % pattern.m == 0:
                group = w1[:, i : i + pattern.m].square() / d1[i : i + pattern.m].reshape(1, -1).square()
                mask1[:, i : i + pattern.m] = ~prune_lowest(group, pattern.m - pattern.n, dim=1)
            q = col.masked_fill(mask1[:, i], 0)
            q1[:, i] = q
            losses1[:, i] = (col - q).square() / d**2
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        prune[:, i1:i2] = mask1
        losses += losses1.sum(dim=1) / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep = ~prune
    if not update_weights:
        w = original.masked_fill(prune, 0)
    return w, keep, float(losses.sum())


def _layer(rows, cols, seed, dead=()):
    """Random float weights (no exact score ties) and a random correlated Hessian H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(4 * cols, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    x = x + 0.3 * torch.randn(4 * cols, cols, generator=g)
    x[:, list(dead)] = 0
    return weight, 2 * x.t() @ x / x.shape[0]


def _sparsefit_counts(rows, sparsity):
    return lambda i1, i2: int(rows * i2 * sparsity) - int(rows * i1 * sparsity)


CASES = [  # rows, cols, blocksize, seed, dead inputs
    (32, 64, 16, 0, ()),
    (24, 96, 128, 1, ()),
    (40, 80, 32, 2, (3, 50)),
    (16, 100, 24, 3, ()),  # a short last block
]
PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)]


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("rows,cols,blocksize,seed,dead", CASES)
def test_unstructured_masks_equal_ebft(sparsity, rows, cols, blocksize, seed, dead):
    weight, h = _layer(rows, cols, seed, dead)
    unstructured = parse_pattern("unstructured")
    new, keep, loss = sparsegpt_solve(weight, h, sparsity, unstructured, blocksize, update_weights=False)
    ebft = _ebft_masks_only(weight, h, sparsity, blocksize=blocksize, block_count=_sparsefit_counts(rows, sparsity))
    assert torch.equal(keep, ebft)
    assert int((~keep).sum()) == int(rows * cols * sparsity)
    assert torch.equal(new, weight * keep)  # the original weights, pruned entries zeroed
    delta = new - weight
    torch.testing.assert_close(loss, float((delta @ h * delta).sum() / 2), rtol=1e-5, atol=0)
    # Against the release's own threshold rule: it prunes the same weights plus at most one per block.
    release = _ebft_masks_only(weight, h, sparsity, blocksize=blocksize)
    assert (release <= keep).all()
    for i1 in range(0, cols, blocksize):
        extra = int((keep[:, i1 : i1 + blocksize] & ~release[:, i1 : i1 + blocksize]).sum())
        assert extra in (0, 1)


@pytest.mark.parametrize("pattern,prune_n,prune_m", [("2:4", 2, 4), ("4:8", 4, 8)])
@pytest.mark.parametrize("rows,cols,blocksize,seed,dead", CASES[:3])
def test_nm_masks_equal_ebft(pattern, prune_n, prune_m, rows, cols, blocksize, seed, dead):
    weight, h = _layer(rows, cols, seed + 10, dead)
    new, keep, _ = sparsegpt_solve(weight, h, None, parse_pattern(pattern), blocksize, update_weights=False)
    ebft = _ebft_masks_only(weight, h, None, prune_n=prune_n, prune_m=prune_m, blocksize=blocksize)
    assert torch.equal(keep, ebft)
    assert torch.equal(keep.reshape(rows, -1, prune_m).sum(dim=2), torch.full((rows, cols // prune_m), prune_n))
    assert torch.equal(new, weight * keep)


def test_pruner_masks_only_uses_ebft_masks():
    torch.manual_seed(20)
    layer = torch.nn.Linear(64, 32, bias=False)
    original = layer.weight.detach().clone()
    x = torch.randn(256, 16) @ torch.randn(16, 64) + 0.3 * torch.randn(256, 64)
    pruner = make_pruner("sparsegpt", layer, update_weights=False, blocksize=32)
    pruner.add_batch(x)
    h = pruner.hessian.clone()
    keep = pruner.prune(0.5, "unstructured")
    assert torch.equal(keep, _ebft_masks_only(original, h, 0.5, blocksize=32, block_count=_sparsefit_counts(32, 0.5)))
    assert torch.equal(layer.weight.detach(), original * keep)


@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
def test_old_full_sweep_masks_differ_from_ebft(pattern, sparsity):
    """The fix matters: on a toy layer the old masks-only masks (chosen on updated weights) are not the release's."""
    weight, h = _layer(32, 64, 30)
    _, old_keep, _ = _old_sparsegpt_solve(weight, h, sparsity, parse_pattern(pattern), 16, update_weights=False)
    _, new_keep, _ = sparsegpt_solve(weight, h, sparsity, parse_pattern(pattern), 16, update_weights=False)
    assert int((~old_keep).sum()) == int((~new_keep).sum())
    assert (old_keep != new_keep).float().mean() > 0.01


@pytest.mark.parametrize("pattern,sparsity", [*PATTERNS, ("4:8", None)])
@pytest.mark.parametrize("rows,cols,blocksize,seed,dead", CASES)
def test_update_path_is_unchanged(pattern, sparsity, rows, cols, blocksize, seed, dead):
    m = parse_pattern(pattern).m
    if m and (blocksize % m or cols % m):
        pytest.skip("N:M needs blocks and rows that are multiples of M")
    weight, h = _layer(rows, cols, seed + 40, dead)
    new, keep, loss = sparsegpt_solve(weight, h, sparsity, parse_pattern(pattern), blocksize)
    old, old_keep, old_loss = _old_sparsegpt_solve(weight, h, sparsity, parse_pattern(pattern), blocksize)
    assert torch.equal(new, old) and torch.equal(keep, old_keep) and loss == old_loss
