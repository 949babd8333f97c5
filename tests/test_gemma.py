"""Integration tests on the real Gemma-3-270M (slow: CI runs them), the second built-in architecture.

Gemma's tokenizer puts <bos> in front of every text and the model expects it: every calibration and perplexity
window starts with it (``sparsefit.data.window_prefix``). Calibration is kept tiny (8 x 128, one epoch of EBFT)
and perplexity short (1024 tokens at seqlen 512) so the file stays within a few minutes on 2 cores.
"""

import json

import pytest

from sparsefit.app.jobs import run_prune
from sparsefit.data import calibration_windows, get_corpus, test_stream, window_prefix
from sparsefit.evaluate.perplexity import perplexity
from sparsefit.models import load
from sparsefit.prune import PruneConfig

pytestmark = pytest.mark.slow

EVAL = dict(eval_ppl="wiki", eval_seqlen=512, eval_max_tokens=1024)
CONFIG = dict(method="wanda", sparsity=0.5, nsamples=8, seqlen=128, calib="wiki", device="cpu")


@pytest.fixture(scope="module")
def gemma():
    return load("gemma3-270m")


def test_loads_with_its_bos(gemma):
    model, tokenizer = gemma.model, gemma.tokenizer
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    assert window_prefix(tokenizer) == [tokenizer.bos_token_id] == [2]
    calib = calibration_windows(tokenizer, get_corpus("wiki"), 8, 128, 0)
    assert calib.shape == (8, 128) and (calib[:, 0] == 2).all() and (calib[:, 1:] != 2).all()


def test_dense_perplexity_needs_the_bos(gemma):
    stream = test_stream(gemma.tokenizer, get_corpus("wiki"))
    with_bos = perplexity(gemma.model, stream, seqlen=512, max_tokens=1024, prefix=[2])
    assert (with_bos.windows, with_bos.tokens) == (2, 2 * 511)
    # 17.23 on 2048 tokens; a ±25 % band on 1024 catches a broken protocol, not the text's variation.
    assert 17.23 * 0.75 < with_bos.value < 17.23 * 1.25, with_bos.value
    without = perplexity(gemma.model, stream[:, 1:], seqlen=512, max_tokens=1024)
    assert without.value > 1.5 * with_bos.value  # 32.85 on 2048 tokens: Gemma without its BOS is a much worse model


def test_wanda_50_with_interleaved_ebft(tmp_path):
    wanda = run_prune("gemma3-270m", PruneConfig(**CONFIG), tmp_path / "wanda", **EVAL)
    ebft = run_prune("gemma3-270m", PruneConfig(**CONFIG), tmp_path / "ebft", recover="ebft",
                     recover_options={"preset": "quick", "epochs": 1}, **EVAL)  # fmt: skip
    pruned, recovered = wanda["results"]["ppl"]["wiki"]["value"], ebft["results"]["ppl"]["wiki"]["value"]
    blocks = json.loads((tmp_path / "ebft" / "ebft.json").read_text())["blocks"]
    lines = [
        f"block {b['block']}: train {b['initial_loss']:.4g} -> {b['final_loss']:.4g}, "
        f"held-out {b['initial_heldout']:.4g} -> {b['final_heldout']:.4g}"
        for b in blocks
    ]
    print(f"wiki ppl @512: wanda {pruned:.2f}, wanda+ebft {recovered:.2f}", *lines, sep="\n")
    assert len(blocks) == 18
    assert recovered < pruned
    worse = [b["block"] for b in blocks if b["final_heldout"] > b["initial_heldout"]]
    assert not worse, f"EBFT made the held-out error of blocks {worse} worse:\n" + "\n".join(lines)


def test_cpu_preset_at_16x256_lowers_perplexity(tmp_path):
    """Issue 21: the `cpu` preset (what `auto` picks on a CPU) at 16 x 256 took wiki ppl from 81 to 192 when its rate
    was absolute (Gemma's weights are 5x smaller than SmolLM2's); relative to each weight's RMS it lowers it. The
    guard only warns here, so that the test checks recovery itself, not the fall back. Measured on 1,024 test tokens:
    55.6 -> 50.7 on an AVX-512 CPU (0.91; below 0.9 on an AVX2 one, whose float rounding differs)."""
    config = PruneConfig(**{**CONFIG, "nsamples": 16, "seqlen": 256})
    wanda = run_prune("gemma3-270m", config, tmp_path / "wanda", **EVAL)
    ebft = run_prune("gemma3-270m", config, tmp_path / "ebft", recover="ebft", recover_options={"preset": "cpu"},
                     guard="warn", **EVAL)  # fmt: skip
    pruned, recovered = wanda["results"]["ppl"]["wiki"]["value"], ebft["results"]["ppl"]["wiki"]["value"]
    print(f"wiki ppl @512: wanda {pruned:.2f}, wanda+ebft cpu {recovered:.2f}; guard {ebft['guard']}")
    assert recovered < 0.95 * pruned
    assert ebft["guard"]["recovered_loss"] < ebft["guard"]["pruned_loss"]
