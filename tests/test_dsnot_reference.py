"""sparsefit's DSnoT against a plain transcription of the official loop.

The reference is ``prune_DSnoT`` in ``lib/prune.py`` of github.com/zyxxmu/DSnoT, run with ``main.py``'s defaults
(``--without_same_sign`` is declared ``type=bool, default=True``, so the unstructured loop never checks the sign of
the error; the N:M loop always does). The functions below redo that loop one row at a time with Python lists and
pointers, so that the vectorised ``dsnot_unstructured`` and ``dsnot_nm`` can be checked against something written
independently of them. They carry one thing that is not the reference's: where the reference would regrow a weight
that is kept, prune one that is already pruned, or read past the end of a list (narrow rows), they stop the row, as
sparsefit does, and say so (``cut``), so that the tests know when they ran the reference exactly.
"""

import math

import pytest
import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.prune import nm_mask, parse_pattern
from sparsefit.recover import get_method
from sparsefit.recover.dsnot import ChannelStats, DSnoTConfig, dsnot_layer, dsnot_nm, dsnot_unstructured

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the transcription ----------------------------------------------------------------------------------------


def regrowing_list(metric, ratio, kept):
    """Every column by ``W_j sum_j / var_j^p`` (the kept ones at 0), lowest first; ties keep column order."""
    key = [0.0 if kept[j] else ratio[j] for j in range(len(kept))]
    return sorted(range(len(kept)), key=lambda j: key[j])


def pruning_list(metric, wanda, kept):
    """The kept columns by Wanda score, lowest first, then those with a negative ``W_j sum_j`` as they are, those with
    a positive one reversed at the end, and in between one copy of the lowest-score kept column for each kept column
    whose ``W_j sum_j`` is 0 (what the reference's ``return_reorder_indice`` makes of them)."""
    by_score = sorted((j for j in range(len(kept)) if kept[j]), key=lambda j: wanda[j])
    negatives = [j for j in by_score if metric[j] < 0]
    positives = [j for j in by_score if metric[j] > 0]
    zeros = len(by_score) - len(negatives) - len(positives)
    return negatives + by_score[:1] * zeros + positives[::-1]


def reference_row(metric, ratio, wanda, kept, cycles, threshold, same_sign):
    """One row of the reference's unstructured loop; returns (kept, error, swaps, cut).

    ``metric`` is the row's ``W_j sum_j`` as a float32 tensor (the error is kept in float32, as the reference and
    sparsefit keep it); ``ratio``, ``wanda`` and ``kept`` are lists.
    """
    kept = list(kept)
    values = metric.tolist()
    error = metric.masked_fill(torch.tensor(kept), 0).sum()  # sum over the pruned weights
    initial_sign = torch.sign(error)
    regrowing = regrowing_list(values, ratio, kept)
    pruning = pruning_list(values, wanda, kept)
    regrow_next, prune_next = [0, len(regrowing) - 1], [0, len(pruning) - 1]  # [front, back]
    step = [1, -1]
    swaps = 0
    for _ in range(cycles):
        if not abs(error) > threshold:
            break
        g = 1 if error > 0 else 0  # e > 0: regrow from the back (largest positive ratio) ...
        q = 1 if error < 0 else 0  # ... and prune from the front (negative contributions, lowest score first)
        if not (0 <= regrow_next[g] < len(regrowing) and 0 <= prune_next[q] < len(pruning)):
            return kept, error, swaps, True
        r, p = regrowing[regrow_next[g]], pruning[prune_next[q]]
        after = error + metric[p] - metric[r]
        if same_sign and torch.sign(after) != initial_sign:
            break
        if kept[r] or not kept[p]:  # the reference would change the row's count of zeros here
            return kept, error, swaps, True
        kept[r], kept[p] = True, False
        error = after
        swaps += 1
        regrow_next[g] += step[g]
        prune_next[q] += step[q]
    return kept, error, swaps, False


def reference_row_nm(metric, ratio, wanda, kept, m, cycles, threshold, same_sign):
    """One row of the reference's N:M loop (which always checks the sign unless ``same_sign`` is False)."""
    kept = list(kept)
    values = metric.tolist()
    error = metric.masked_fill(torch.tensor(kept), 0).sum()
    initial_sign = torch.sign(error)
    regrowing = regrowing_list(values, ratio, kept)
    score = [wanda[j] if kept[j] else math.inf for j in range(len(kept))]  # pruned: inf, and set to inf when pruned
    regrow_next, step = [0, len(regrowing) - 1], [1, -1]
    swaps = 0
    for _ in range(cycles):
        if not abs(error) > threshold:
            break
        g = 1 if error > 0 else 0
        if not 0 <= regrow_next[g] < len(regrowing):
            return kept, error, swaps, True
        r = regrowing[regrow_next[g]]
        group = range(r - r % m, r - r % m + m)
        p = min(group, key=lambda j: score[j])  # the group's lowest score, the first one on a tie
        after = error + metric[p] - metric[r]
        if same_sign and torch.sign(after) != initial_sign:
            break
        if kept[r] or score[p] == math.inf:  # regrowing a kept weight, or no weight left to prune in the group
            return kept, error, swaps, True
        kept[r], kept[p] = True, False
        score[p] = math.inf
        error = after
        swaps += 1
        regrow_next[g] += step[g]
    return kept, error, swaps, False


def reference(w, x, keep, config, m=None):
    """The transcription over every row of a layer: (keep, error after, swaps, rows cut)."""
    mean, var, sq = x.sum(0), x.var(0, unbiased=False), x.square().sum(0)
    metric = w * mean
    ratio = metric / var.pow(config.var_power)
    wanda = w.abs() * sq.sqrt()
    same_sign = (m is not None) if config.same_sign is None else config.same_sign
    rows, errors, swaps, cut = [], [], 0, 0
    for i in range(w.shape[0]):
        args = (metric[i], ratio[i].tolist(), wanda[i].tolist(), keep[i].tolist())
        if m is None:
            row = reference_row(*args, config.max_cycles, config.threshold, same_sign)
        else:
            row = reference_row_nm(*args, m, config.max_cycles, config.threshold, same_sign)
        rows.append(row[0])
        errors.append(float(row[1]))
        swaps += row[2]
        cut += row[3]
    return torch.tensor(rows), torch.tensor(errors), swaps, cut


# --- layers ---------------------------------------------------------------------------------------------------


def random_layer(rows, cols, sparsity=0.5, pattern=None, seed=0, tokens=32):
    """Weights of LLM scale, inputs with nonzero channel means, a Wanda mask; (w, x, keep)."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) + torch.randn(cols, generator=g)
    scores = w.abs() * x.square().sum(0).sqrt()
    if pattern is not None:
        return w, x, nm_mask(scores, parse_pattern(pattern))
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, : int(cols * sparsity)], False)
    return w, x, keep


def run(w, x, keep, config, pattern=None):
    args = (w, w * keep, keep, x.sum(0), x.var(0, unbiased=False), x.square().sum(0), config)
    return dsnot_nm(*args, parse_pattern(pattern)) if pattern else dsnot_unstructured(*args)


def assert_same(result, expected, keep_before):
    keep, error, swaps, _ = expected
    assert result.swaps == swaps
    assert torch.equal(result.keep, keep)
    assert torch.allclose(result.error_after, error, rtol=1e-5, atol=1e-5)
    assert torch.equal(result.keep.sum(1), keep_before.sum(1))  # exact sparsity, row by row


# --- the vectorised functions give the transcription's masks ---------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("same_sign", [None, True])
def test_unstructured_matches_the_reference(sparsity, same_sign):
    """Wide rows: the lists never run out, so this is the reference's loop exactly (no row cut)."""
    w, x, keep = random_layer(24, 512, sparsity, seed=1, tokens=128)
    config = DSnoTConfig(same_sign=same_sign)
    expected = reference(w, x, keep, config)
    assert expected[3] == 0 and expected[2] > 0
    assert_same(run(w, x, keep, config), expected, keep)


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
def test_unstructured_narrow_rows_stop_where_the_reference_would_break_the_sparsity(sparsity):
    w, x, keep = random_layer(24, 40, sparsity, seed=2)
    config = DSnoTConfig(threshold=0.0)
    expected = reference(w, x, keep, config)
    assert expected[3] > 0  # some rows got past the weights of the right sign: the deliberate difference ran
    assert_same(run(w, x, keep, config), expected, keep)


def test_weights_of_zero_contribution_sit_where_the_reference_puts_them():
    """Channels whose inputs sum to exactly 0: their kept weights fill the middle of the pruning list with copies of
    the lowest-score kept weight, their pruned ones the middle of the regrowing list, among the kept weights."""
    w, x, _ = random_layer(24, 40, seed=9)
    x[:, :10] = torch.tensor([1.0, -1.0, 2.0, -2.0]).repeat(8).reshape(32, 1)  # sums exactly 0, variance 2.5
    scores = w.abs() * x.square().sum(0).sqrt()
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :20], False)
    config = DSnoTConfig(threshold=0.0)
    expected = reference(w, x, keep, config)
    assert expected[3] > 0
    assert_same(run(w, x, keep, config), expected, keep)


@pytest.mark.parametrize("same_sign", [None, False])
@pytest.mark.parametrize(("cols", "threshold", "seed"), [(256, 0.1, 3), (16, 0.0, 4)])
def test_nm_2_4_matches_the_reference(same_sign, cols, threshold, seed):
    w, x, keep = random_layer(24, cols, pattern="2:4", seed=seed)
    config = DSnoTConfig(threshold=threshold, same_sign=same_sign)
    expected = reference(w, x, keep, config, m=4)
    assert expected[2] > 0
    if cols == 256:
        assert expected[3] == 0
    result = run(w, x, keep, config, "2:4")
    assert_same(result, expected, keep)
    assert torch.equal(result.keep.reshape(24, -1, 4).sum(2), keep.reshape(24, -1, 4).sum(2))  # 2 in every group


def test_nm_1_4_stops_a_row_when_a_group_has_nothing_left_to_prune():
    w, x, keep = random_layer(24, 16, pattern="1:4", seed=5)
    config = DSnoTConfig(threshold=0.0, same_sign=False)
    expected = reference(w, x, keep, config, m=4)
    assert expected[3] > 0
    result = run(w, x, keep, config, "1:4")
    assert_same(result, expected, keep)
    assert (result.keep.reshape(24, -1, 4).sum(2) == 1).all()


# --- values, and what the reference's default buys ------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_only_regrown_weights_change_value_and_take_the_dense_one(pattern):
    """Kept weights that differ from the teacher's (as after SparseGPT's update) keep their own values."""
    rows, cols = 16, 64
    w, x, keep = random_layer(rows, cols, 0.5, pattern=None if pattern == "unstructured" else pattern, seed=6)
    g = torch.Generator().manual_seed(7)
    sparse_w = (w + 0.005 * torch.randn(rows, cols, generator=g)) * keep
    dense, layer = nn.Linear(cols, rows, bias=False), nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        dense.weight.copy_(w)
        layer.weight.copy_(sparse_w)
    stats = ChannelStats(cols)
    stats.add(x)
    new_keep, report = dsnot_layer(layer, dense, stats, DSnoTConfig(threshold=0.0), parse_pattern(pattern))
    after = layer.weight.detach()
    assert report["swaps"] > 0
    assert torch.equal(new_keep, after != 0)
    assert torch.equal(new_keep.sum(1), keep.sum(1))
    stayed, regrown = new_keep & keep, new_keep & ~keep
    assert regrown.any()
    assert torch.equal(after[stayed], sparse_w[stayed])
    assert torch.equal(after[regrown], w[regrown])
    # The error it reports is the one the new weights make: sum_j (W_dense - W_new)_j sum_j, with kept values' own.
    recomputed = ((w - after) * x.sum(0)).sum(1).abs().sum()
    assert math.isclose(report["abs_error_after"], float(recomputed), rel_tol=1e-4, abs_tol=1e-4)


def test_the_reference_default_makes_more_swaps_and_a_smaller_error_than_the_same_sign_variant():
    """Issue 9's figure at a quarter of the scale: the reference's loop carries rows on past a sign change."""
    w, x, keep = random_layer(64, 256, 0.6, seed=8, tokens=128)
    reference_default = run(w, x, keep, DSnoTConfig())
    same_sign = run(w, x, keep, DSnoTConfig(same_sign=True))
    assert reference_default.swaps > 2 * same_sign.swaps
    assert reference_default.error_after.abs().mean() < same_sign.error_after.abs().mean() / 2
    assert (torch.sign(reference_default.error_after) != torch.sign(reference_default.error_before)).any()
    assert (torch.sign(same_sign.error_after) == torch.sign(same_sign.error_before)).all()


def test_same_sign_is_an_option():
    assert get_method("dsnot").configure({"same_sign": True}).same_sign is True
    assert get_method("dsnot").configure({}).same_sign is None
    with pytest.raises(UsageError, match="same_sign"):
        get_method("dsnot").configure({"same_sign": "sometimes"})
