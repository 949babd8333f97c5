"""sparsefit.prune: exact masks, N:M patterns, tie-breaking, Wanda/SparseGPT numerics, GPT-2 Conv1D, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from sparsefit.errors import UsageError
from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
from sparsefit.prune import (
    PRUNERS,
    Pattern,
    check_pattern,
    make_pruner,
    parse_pattern,
    select_mask,
    sparsegpt_solve,
    sparsity_report,
)

SPARSITIES = [0.0, 0.1, 0.3, 0.5, 0.7, 0.95]


def _linear(out_features: int = 32, in_features: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=False)


def _correlated_inputs(tokens: int, width: int, seed: int = 1) -> torch.Tensor:
    """Inputs with strongly correlated channels (low-rank plus noise), like real activations."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, width // 4, generator=g)
    mix = torch.randn(width // 4, width, generator=g)
    return latent @ mix + 0.1 * torch.randn(tokens, width, generator=g)


# --- patterns and argument checks -------------------------------------------------------------------------------


def test_parse_pattern_accepts_unstructured_and_nm():
    assert parse_pattern("unstructured") == Pattern(0, 0)
    assert not parse_pattern("unstructured").structured
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert parse_pattern(" 4:8 ") == Pattern(4, 8)
    assert parse_pattern("1:2").sparsity == 0.5
    assert parse_pattern("4:8").sparsity == 0.5
    assert str(parse_pattern("2:4")) == "2:4"


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "1:1", "x:y", "2:4:8", "", "half"])
def test_parse_pattern_rejects_garbage(text):
    with pytest.raises(UsageError) as info:
        parse_pattern(text)
    message = str(info.value)
    assert repr(text) in message and "N:M" in message and "\n" not in message


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.2, float("nan")])
def test_bad_sparsity_is_a_usage_error(sparsity):
    scores = torch.rand(4, 8)
    with pytest.raises(UsageError, match=r"outside \[0, 1\)"):
        select_mask(scores, sparsity, "unstructured")
    pruner = make_pruner("magnitude", _linear())
    with pytest.raises(UsageError, match=r"outside \[0, 1\)"):
        pruner.prune(sparsity, "unstructured")


def test_sparsity_message_names_the_value():
    with pytest.raises(UsageError, match=r"^sparsity 1\.2 is outside \[0, 1\)"):
        select_mask(torch.rand(2, 4), 1.2, "unstructured")


def test_pattern_width_must_be_divisible():
    pattern = parse_pattern("2:3")
    with pytest.raises(UsageError) as info:
        pattern.validate_width(64)
    assert "64" in str(info.value) and "M=3" in str(info.value)
    pattern.validate_width(63)  # fine
    layer = _linear(8, 64)
    for name in PRUNERS:
        with pytest.raises(UsageError, match="64"):
            make_pruner(name, layer).prune(None, "2:3")
    with pytest.raises(UsageError, match="64"):
        select_mask(torch.rand(8, 64), None, "2:3")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UsageError) as info:
        make_pruner("obs", _linear())
    assert "'obs'" in str(info.value)
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert name in str(info.value)


def test_make_pruner_options():
    layer = _linear()
    assert make_pruner("magnitude", layer).needs_calibration is False
    assert make_pruner("wanda", layer).needs_calibration is True
    pruner = make_pruner("sparsegpt", layer, update_weights=False, blocksize=16, percdamp=0.05)
    assert (pruner.update_weights, pruner.blocksize, pruner.percdamp) == (False, 16, 0.05)
    with pytest.raises(UsageError, match="blocksize"):
        make_pruner("magnitude", layer, blocksize=8)
    with pytest.raises(UsageError, match="percdamp"):
        make_pruner("sparsegpt", layer, percdamp=-1.0)


# --- mask selection ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_unstructured_per_row_is_exact(sparsity):
    scores = torch.rand(37, 50, generator=torch.Generator().manual_seed(0))
    keep = select_mask(scores, sparsity, "unstructured", per_row=True)
    assert keep.dtype == torch.bool and keep.shape == (37, 50)
    pruned = 50 - keep.sum(dim=1)
    assert (pruned == int(50 * sparsity)).all()
    # The pruned entries are the lowest of their row.
    for row in range(37):
        if 0 < int(pruned[row]) < 50:
            assert scores[row][~keep[row]].max() < scores[row][keep[row]].min()


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_unstructured_per_layer_is_exact(sparsity):
    scores = torch.rand(37, 50, generator=torch.Generator().manual_seed(1))
    keep = select_mask(scores, sparsity, "unstructured", per_row=False)
    assert int((~keep).sum()) == int(37 * 50 * sparsity)
    if sparsity > 0:
        assert scores[~keep].max() < scores[keep].min()
        if sparsity >= 0.3:
            # One threshold for the whole matrix: rows end up with different counts.
            assert len(set((~keep).sum(dim=1).tolist())) > 1


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_mask_keeps_top_n_of_every_group(text, n, m):
    scores = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    keep = select_mask(scores, None, text)
    groups = keep.reshape(16, 64 // m, m)
    assert (groups.sum(dim=2) == n).all()  # direct count: exactly N kept per group
    expected = torch.zeros(16, 64 // m, m, dtype=torch.bool)
    expected.scatter_(2, scores.reshape(16, 64 // m, m).topk(n, dim=2).indices, True)
    assert torch.equal(groups, expected)
    assert check_pattern(scores * keep, text)
    # The sparsity argument is ignored for N:M.
    assert torch.equal(select_mask(scores, 0.9, text), keep)


def test_check_pattern_can_fail():
    weight = torch.randn(4, 16)
    assert not check_pattern(weight, "2:4")  # dense
    keep = select_mask(weight.abs(), None, "2:4")
    pruned = weight * keep
    assert check_pattern(pruned, "2:4") and check_pattern(pruned, "3:4")
    assert not check_pattern(pruned, "1:4")  # needs 3 zeros of 4
    pruned[2, 5] = 1.0  # restore one weight: its group now has only one zero
    assert not check_pattern(pruned, "2:4")
    assert not check_pattern(torch.zeros(4, 18), "4:8")  # width not a multiple of M
    assert check_pattern(weight, "unstructured")


def test_ties_are_broken_by_index_and_deterministic():
    ties = torch.ones(6, 16)
    for per_row in (True, False):
        first = select_mask(ties, 0.25, "unstructured", per_row=per_row)
        assert torch.equal(first, select_mask(ties.clone(), 0.25, "unstructured", per_row=per_row))
    per_row = select_mask(ties, 0.25, "unstructured", per_row=True)
    expected = torch.ones(6, 16, dtype=torch.bool)
    expected[:, :4] = False  # lower index pruned first
    assert torch.equal(per_row, expected)
    per_layer = select_mask(ties, 0.25, "unstructured", per_row=False)
    expected = torch.ones(96, dtype=torch.bool)
    expected[:24] = False
    assert torch.equal(per_layer, expected.reshape(6, 16))
    nm = select_mask(ties, None, "2:4")
    assert torch.equal(nm, torch.tensor([False, False, True, True]).repeat(6, 4))


def test_quantization_like_ties_give_exact_repeatable_masks():
    # Few distinct values, like dequantized Q4 weights.
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (64, 96), generator=g).float()
    masks = [select_mask(scores, 0.6, "unstructured", per_row=True) for _ in range(3)]
    assert all(torch.equal(masks[0], m) for m in masks)
    assert ((~masks[0]).sum(dim=1) == int(96 * 0.6)).all()
    # Within a row, a pruned score never exceeds a kept one, and among equal scores the lower index goes first.
    for row in range(64):
        s, k = scores[row], masks[0][row]
        assert s[~k].max() <= s[k].min()
        boundary = s[~k].max()
        tied = (s == boundary).nonzero().flatten()
        pruned_tied, kept_tied = tied[~k[tied]], tied[k[tied]]
        if len(kept_tied):
            assert pruned_tied.max() < kept_tied.min()


# --- magnitude and Wanda -------------------------------------------------------------------------------------------


def test_magnitude_prunes_per_layer_in_place():
    layer = _linear(32, 64)
    original = layer.weight.detach().clone()
    keep = make_pruner("magnitude", layer).prune(0.5, "unstructured")
    assert int((layer.weight == 0).sum()) == 32 * 64 // 2
    assert torch.equal(layer.weight.detach(), original * keep)
    k = 32 * 64 // 2
    threshold = original.abs().flatten().sort().values[k]  # the smallest kept magnitude
    assert torch.equal(keep, original.abs() >= threshold)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_mask_matches_direct_computation(pattern):
    layer = _linear(32, 64, seed=4)
    original = layer.weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    channel_scale = torch.rand(64, generator=g) * 3  # makes the input norms matter
    batches = [torch.randn(2, 7, 64, generator=g) * channel_scale for _ in range(3)]
    batches.append(torch.randn(5, 64, generator=g) * channel_scale)  # a 2-D batch too
    pruner = make_pruner("wanda", layer)
    for batch in batches:
        pruner.add_batch(batch)
    keep = pruner.prune(0.5, pattern)
    pruner.free()

    tokens = torch.cat([b.reshape(-1, 64) for b in batches])
    scores = original.abs() * tokens.square().sum(dim=0).sqrt()
    expected = torch.zeros(32, 64, dtype=torch.bool)
    if pattern == "unstructured":
        expected.scatter_(1, scores.topk(32, dim=1).indices, True)
    else:
        grouped = expected.view(32, 16, 4)
        grouped.scatter_(2, scores.reshape(32, 16, 4).topk(2, dim=2).indices, True)
    assert torch.equal(keep, expected)
    assert torch.equal(layer.weight.detach(), original * expected)
    # Differs from plain magnitude: the activations change the ranking.
    assert not torch.equal(keep, select_mask(original.abs(), 0.5, pattern, per_row=True))


def test_wanda_without_calibration_refuses():
    with pytest.raises(RuntimeError, match="add_batch"):
        make_pruner("wanda", _linear()).prune(0.5, "unstructured")


# --- SparseGPT -----------------------------------------------------------------------------------------------------


def _reference_fasterprune(w, h, sparsity, prunen, prunem, blocksize, percdamp):
    """A compact port of the reference SparseGPT.fasterprune (``prunen`` = weights PRUNED per group).

    The unstructured threshold uses ``<`` (the reference has ``<=``, which prunes one extra weight per block);
    with distinct scores this prunes exactly int(rows * block * sparsity) per block.
    """
    w = w.clone().float()
    h = h.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    idx = torch.arange(cols)
    h[idx, idx] += percdamp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp < thresh
        else:
            mask1 = torch.zeros_like(w1) == 1
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = w1[:, i : i + prunem] ** 2 / torch.diag(hinv1)[i : i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w, ~pruned


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / 1  # scale does not matter to the solver


@pytest.mark.parametrize("pattern,prunen,prunem", [("unstructured", 0, 0), ("2:4", 2, 4), ("4:8", 4, 8)])
def test_sparsegpt_matches_reference_port(pattern, prunen, prunem):
    layer = _linear(32, 64, seed=6)
    x = _correlated_inputs(256, 64)
    h = _hessian(x)
    ours, keep, _ = sparsegpt_solve(layer.weight.detach(), h, 0.5, parse_pattern(pattern), blocksize=16)
    ref, ref_keep = _reference_fasterprune(layer.weight.detach(), h, 0.5, prunen, prunem, 16, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sparsity,blocksize", [(0.0, 16), (0.3, 24), (0.5, 128), (0.7, 16), (0.9, 24), (0.55, 7)])
def test_sparsegpt_unstructured_sparsity_is_exact(sparsity, blocksize):
    layer = _linear(30, 96, seed=7)
    pruner = make_pruner("sparsegpt", layer, blocksize=blocksize)
    pruner.add_batch(_correlated_inputs(200, 96).reshape(4, 50, 96))
    keep = pruner.prune(sparsity, "unstructured")
    assert int((~keep).sum()) == int(30 * 96 * sparsity)
    assert int((layer.weight == 0).sum()) == int(30 * 96 * sparsity)
    assert torch.equal(layer.weight.detach() != 0, keep)


def test_sparsegpt_zero_sparsity_changes_nothing():
    layer = _linear(16, 64, seed=8)
    original = layer.weight.detach().clone()
    pruner = make_pruner("sparsegpt", layer)
    pruner.add_batch(_correlated_inputs(128, 64))
    keep = pruner.prune(0.0, "unstructured")
    assert keep.all()
    torch.testing.assert_close(layer.weight.detach(), original, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_update_beats_masks_only(pattern):
    x = _correlated_inputs(512, 64, seed=9)
    dense = _linear(48, 64, seed=10)
    updated, masked = copy.deepcopy(dense), copy.deepcopy(dense)
    keeps = {}
    for name, layer, update in (("update", updated, True), ("masks", masked, False)):
        pruner = make_pruner("sparsegpt", layer, update_weights=update, blocksize=32)
        for chunk in x.reshape(8, 64, 64):
            pruner.add_batch(chunk.unsqueeze(0))
        keeps[name] = pruner.prune(0.5, pattern)
        pruner.free()
    # Masks only chooses from the original weights (the EBFT release), the sweep from updated ones: the masks
    # differ, the counts do not.
    assert not torch.equal(keeps["update"], keeps["masks"])
    assert int((~keeps["update"]).sum()) == int((~keeps["masks"]).sum())
    keep = keeps["masks"]
    # Masks only: kept weights bit-identical, pruned ones exactly zero.
    assert torch.equal(masked.weight.detach(), dense.weight.detach() * keep)
    assert torch.equal(masked.weight.detach()[keep], dense.weight.detach()[keep])
    # Update: kept weights change, pruned ones are zero, and the layer output is reconstructed better.
    keep = keeps["update"]
    assert (updated.weight.detach()[~keep] == 0).all()
    assert not torch.allclose(updated.weight.detach()[keep], dense.weight.detach()[keep])
    with torch.no_grad():
        target = dense(x)
        err_update = (target - updated(x)).norm()
        err_masks = (target - masked(x)).norm()
    assert err_update < 0.8 * err_masks, (float(err_update), float(err_masks))
    if pattern != "unstructured":
        assert check_pattern(updated.weight.detach(), pattern)
        assert check_pattern(masked.weight.detach(), pattern)


def test_sparsegpt_update_flag_on_prune_overrides_constructor():
    layer = _linear(16, 64, seed=11)
    original = layer.weight.detach().clone()
    pruner = make_pruner("sparsegpt", layer)  # update_weights=True by default
    pruner.add_batch(_correlated_inputs(128, 64))
    keep = pruner.prune(0.5, "unstructured", update_weights=False)
    assert torch.equal(layer.weight.detach(), original * keep)


def test_sparsegpt_dead_inputs_are_handled():
    layer = _linear(16, 64, seed=12)
    x = _correlated_inputs(128, 64)
    x[:, 5] = 0  # an input channel that never fires
    pruner = make_pruner("sparsegpt", layer)
    pruner.add_batch(x)
    keep = pruner.prune(0.5, "unstructured")
    assert int((~keep).sum()) == 16 * 32
    assert not keep[:, 5].any()  # zero score: pruned first
    assert torch.isfinite(layer.weight).all()


def test_sparsegpt_cholesky_failure_is_a_usage_error():
    weight = torch.randn(8, 16)
    with pytest.raises(UsageError, match="increase percdamp") as info:
        sparsegpt_solve(weight, -torch.eye(16), 0.5, parse_pattern("unstructured"))
    assert "\n" not in str(info.value)
    pruner = make_pruner("sparsegpt", _linear(8, 16))
    pruner.add_batch(torch.full((4, 16), float("nan")))
    with pytest.raises(UsageError, match="increase percdamp"):
        pruner.prune(0.5, "unstructured")


def test_sparsegpt_blocksize_must_fit_nm():
    pruner = make_pruner("sparsegpt", _linear(8, 64), blocksize=6)
    pruner.add_batch(torch.randn(32, 64))
    with pytest.raises(UsageError, match="blocksize 6"):
        pruner.prune(None, "4:8")


# --- GPT-2 Conv1D and the sparsity report --------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_gpt2_conv1d(method, pattern):
    model = make_tiny_model("gpt2")
    module = model.transformer.h[0].attn.c_attn
    assert tuple(module.weight.shape) == (64, 192)  # stored (in, out)
    original = weight_matrix(module).clone()  # (out, in)
    pruner = make_pruner(method, module, **({"blocksize": 32} if method == "sparsegpt" else {}))
    x = _correlated_inputs(96, 64).reshape(2, 48, 64)
    if pruner.needs_calibration:
        pruner.add_batch(x)
    keep = pruner.prune(0.5, pattern)
    assert keep.shape == (192, 64)
    stored = module.weight.detach()  # the module's actual parameter, (in, out)
    assert int((stored == 0).sum()) == 192 * 64 // 2
    assert (stored.t()[~keep] == 0).all()
    if method != "sparsegpt":
        assert torch.equal(stored.t(), original * keep)
    if pattern == "2:4":
        assert check_pattern(weight_matrix(module), pattern)
    with torch.no_grad():
        out = module(x)
        expected = x @ (weight_matrix(module)).t() + module.bias
    torch.testing.assert_close(out, expected)


def test_sparsity_report_on_tiny_llama():
    model = make_tiny_model("llama")
    embed_before = model.model.embed_tokens.weight.detach().clone()
    before = sparsity_report(model)
    assert before["overall"] == 0.0
    blocks = get_adapter(model).get_blocks(model)
    for block in blocks:
        for module in prunable_layers(block).values():
            make_pruner("magnitude", module).prune(0.3, "unstructured")
    report = sparsity_report(model)
    layers = report["layers"]
    assert len(layers) == 2 * 7
    assert "lm_head" not in layers and not any("embed" in name for name in layers)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q["shape"] == [64, 64] and q["total"] == 4096 and q["zeros"] == int(4096 * 0.3)
    k = layers["model.layers.1.self_attn.k_proj"]
    assert k["shape"] == [32, 64] and k["zeros"] == int(2048 * 0.3)
    down = layers["model.layers.1.mlp.down_proj"]
    assert down["shape"] == [64, 128] and down["zeros"] == int(8192 * 0.3)
    assert down["sparsity"] == pytest.approx(int(8192 * 0.3) / 8192)
    zeros = sum(v["zeros"] for v in layers.values())
    total = sum(v["total"] for v in layers.values())
    assert total == 2 * (2 * 4096 + 2 * 2048 + 3 * 8192)
    assert report["overall"] == pytest.approx(zeros / total) and 0.299 < report["overall"] < 0.3
    assert torch.equal(model.model.embed_tokens.weight.detach(), embed_before)  # tied lm_head untouched too
