"""Integration tests on the real SmolLM2-135M (slow: CI runs them; each within a minute on one core)."""

import copy

import pytest
import torch

from sparsefit.data import calibration_windows, get_corpus, test_stream
from sparsefit.evaluate.perplexity import perplexity
from sparsefit.models import get_adapter, load, prunable_layers, weight_matrix
from sparsefit.prune import PruneConfig, parse_pattern, prune_model, sparsity_report
from sparsefit.recover import RecoveryContext, get_method

pytestmark = pytest.mark.slow

EVAL = dict(seqlen=512, max_tokens=2048)


@pytest.fixture(scope="module")
def smol():
    loaded = load("smollm2-135m")
    stream = test_stream(loaded.tokenizer, get_corpus("wiki"))
    # 8 x 64 windows for Wanda and EBFT: each test within half a minute on one core (a larger calibration is
    # bench/robust.py's and bench/generalize.py's).
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), 8, 64, 0)
    return loaded, stream, calib


def test_dense_perplexity_equals_plain_transformers(smol):
    loaded, stream, _ = smol
    assert 200_000 < stream.shape[1] < 240_000  # measured: 218,970 tokens in the wiki test split
    ours = perplexity(loaded.model, stream, **EVAL, batch_size=4)  # the four windows in one batch
    windows = stream[:, :2048].view(-1, 512)
    with torch.no_grad():
        losses = torch.stack([loaded.model(input_ids=w[None], labels=w[None]).loss for w in windows])
    assert (ours.windows, ours.tokens) == (4, 2048)
    assert ours.value == pytest.approx(torch.exp(losses.mean()).item(), rel=1e-5)
    # Measured 17.50 (16.40 on 8,192 tokens; DESIGN's 13.9 is another selection of Wikipedia leads). A band of
    # ±15 % catches a broken protocol, not float noise.
    assert 17.50 * 0.85 < ours.value < 17.50 * 1.15, ours.value


@pytest.fixture(scope="module")
def pruned(smol):
    """Wanda 50 % from 8 x 64 windows of wiki, its masks and its perplexity."""
    loaded, stream, calib = smol
    model = copy.deepcopy(loaded.model)
    prune_model(model, calib, PruneConfig(method="wanda", sparsity=0.5, nsamples=8, seqlen=64, device="cpu"))
    masks = {
        (i, name): (weight_matrix(layer) != 0).clone()
        for i, block in enumerate(get_adapter(model).get_blocks(model))
        for name, layer in prunable_layers(block).items()
    }
    return model, masks, perplexity(model, stream, **EVAL).value


def test_wanda_50(pruned):
    model, _, ppl = pruned
    assert sparsity_report(model)["overall"] == 0.5  # exact: 576 and 1536 inputs halve evenly in every row
    # Measured 46.64 on these 2,048 tokens at seqlen 512 (dense 17.50; 47.03 from 16 x 256 windows). A ±12% band:
    # wide enough for BLAS and version noise, narrow enough to catch a wrong score or mask.
    assert 46.64 * 0.88 < ppl < 46.64 * 1.12, ppl


def test_ebft_after_wanda_keeps_the_masks_and_lowers_perplexity(smol, pruned):
    loaded, stream, calib = smol
    model, masks, before = pruned
    ctx = RecoveryContext(model=model, teacher=loaded.model, tokenizer=loaded.tokenizer, calib_ids=calib,
                          pattern=parse_pattern("unstructured"), device=torch.device("cpu"),
                          options={"preset": "quick", "epochs": 1})  # fmt: skip
    result = get_method("ebft").run(ctx)
    blocks = result["blocks"]
    lines = "\n".join(f"block {b['block']}: train {b['initial_loss']:.4g} -> {b['final_loss']:.4g}, held-out "
                      f"{b['initial_heldout']:.4g} -> {b['final_heldout']:.4g}, attempts {b['attempts']}, "
                      f"reverted {b['reverted']}" for b in blocks)  # fmt: skip
    print(lines)
    # No block ends worse on its held-out windows (the guard), and nearly every one ends better: with 3 steps at
    # `quick`'s rate a block may need the guard's lower rate or stay as pruned (measured: all 30 better).
    assert all(b["final_heldout"] <= b["initial_heldout"] for b in blocks), lines
    assert sum(b["final_heldout"] < b["initial_heldout"] for b in blocks) >= 27, lines
    recovered = perplexity(model, stream, **EVAL).value
    print(f"wiki ppl @512: wanda {before:.2f}, wanda+ebft {recovered:.2f}")
    # Measured 46.64 -> 40.81 (0.875x) from 3 steps per block.
    assert recovered < before * 0.93, (before, recovered)
    for (i, name), keep in masks.items():
        assert torch.equal(weight_matrix(get_adapter(model).get_blocks(model)[i].get_submodule(name)) != 0, keep)
