"""Structured pruning: heads and FFN channels removed, a smaller plain Hugging Face model, recovered with EBFT."""

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_byte_tokenizer, make_tiny_model
from sparsefit.cli import main
from sparsefit.errors import UsageError
from sparsefit.models import get_adapter
from sparsefit.prune import PruneConfig, parse_pattern, prune_model, sparsity_summary
from sparsefit.prune.structured import (
    InputStats,
    Widths,
    choose_heads,
    flap_channel_scores,
    flap_head_scores,
    model_widths,
    plan_widths,
    slice_block,
    wanda_channel_scores,
    wanda_head_scores,
)
from sparsefit.recover import RecoveryContext, get_method
from sparsefit.walk import capture_inputs

IDS = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
SMOLLM2 = Widths(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536)


def structured(method="flap", sparsity=0.3, **kw):
    return PruneConfig(method=method, sparsity=sparsity, pattern="structured", nsamples=IDS.shape[0],
                       seqlen=IDS.shape[1], device="cpu", batch_size=3, **kw)  # fmt: skip


# ------------------------------------------------------------------------------------------------ widths


@pytest.mark.parametrize("sparsity, heads, intermediate", [(0.10, 9, 1331), (0.20, 6, 1254), (0.26, 6, 1132),
                                                           (0.35, 6, 947)])  # fmt: skip
def test_plan_for_smollm2_is_closest_to_the_asked_share(sparsity, heads, intermediate):
    plan = plan_widths(SMOLLM2, sparsity)
    assert (plan.kept.heads, plan.kept.kv_heads, plan.kept.intermediate) == (heads, 3, intermediate)
    assert abs(plan.achieved - sparsity) <= 3 * 576 / SMOLLM2.params  # within half a channel's share, both sides
    groups = plan_widths(SMOLLM2, 0.26, gqa="groups")
    assert (groups.kept.heads, groups.kept.kv_heads) == (6, 2)


def test_plan_refuses_what_leaves_nothing_or_splits_unevenly():
    with pytest.raises(UsageError, match="leaves no attention head"):
        plan_widths(SMOLLM2, 0.9)
    with pytest.raises(UsageError, match="leaves no FFN channel"):
        plan_widths(Widths(64, 4, 2, 16, 8), 0.6, heads=4)
    with pytest.raises(UsageError, match="cannot be split evenly under GQA"):
        plan_widths(SMOLLM2, 0.2, heads=5)
    with pytest.raises(UsageError, match="cannot be split evenly under GQA"):
        plan_widths(SMOLLM2, 0.2, gqa="groups", heads=4)
    assert plan_widths(SMOLLM2, 0.2, heads=3).kept.heads == 3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["flap", "wanda"])
def test_exact_widths_and_config(arch, method, one_thread):
    model = make_tiny_model(arch, layers=2)
    walked = prune_model(model, IDS, structured(method, 0.3))
    kept = walked["structured"]["kept"]
    widths = model_widths(model.config)
    assert widths.heads == kept["heads"] < 4 and widths.intermediate == kept["intermediate"] < 128
    d = widths.head_dim
    for block in get_adapter(model).get_blocks(model):
        attn, mlp = block.self_attn, block.mlp
        assert attn.q_proj.weight.shape == (widths.heads * d, widths.hidden)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (widths.kv_heads * d, widths.hidden)
        assert attn.o_proj.weight.shape == (widths.hidden, widths.heads * d)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (widths.intermediate, widths.hidden)
        assert mlp.down_proj.weight.shape == (widths.hidden, widths.intermediate)
    summary = sparsity_summary(model, "structured")
    assert summary["overall"] == pytest.approx(walked["structured"]["achieved"])
    assert abs(summary["overall"] - 0.3) < 0.05
    comp = walked["structured"]["compensation"]
    expected = {"llama": (True, True), "qwen3": (True, False), "gemma3": (True, False)}.get(arch, (False, False))
    assert (comp["attention"], comp["mlp"]) == (expected if method == "flap" else (False, False))


# ------------------------------------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_loads_with_plain_transformers_and_gives_the_same_logits(arch, tmp_path, one_thread):
    model = make_tiny_model(arch, layers=2)
    prune_model(model, IDS, structured("flap", 0.3))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head_dim"] == model_widths(model.config).head_dim
    assert config["intermediate_size"] == model.config.intermediate_size and config["num_attention_heads"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    loaded.eval()
    with torch.no_grad():
        expected, got = model(IDS).logits, loaded(IDS).logits
    assert torch.allclose(expected, got, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ GQA


def _zeroed_dense_block(block, dense, q_heads, channels):
    """The dense block with the removed heads' o_proj columns and the removed channels' down_proj columns zeroed:
    what the sliced block must compute exactly (without compensation)."""
    copy_ = copy.deepcopy(block)
    keep_cols = torch.zeros(dense.heads * dense.head_dim, dtype=torch.bool)
    for h in q_heads.tolist():
        keep_cols[h * dense.head_dim : (h + 1) * dense.head_dim] = True
    keep_ch = torch.zeros(dense.intermediate, dtype=torch.bool)
    keep_ch[channels] = True
    with torch.no_grad():
        copy_.self_attn.o_proj.weight[:, ~keep_cols] = 0
        copy_.mlp.down_proj.weight[:, ~keep_ch] = 0
    return copy_


@pytest.mark.parametrize("gqa", ["queries", "groups"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_sliced_block_equals_the_dense_block_without_the_removed_heads(arch, gqa, one_thread):
    torch.manual_seed(0)
    model = make_tiny_model(arch, layers=1)
    dense = model_widths(model.config)
    kept = Widths(dense.hidden, 2, 2 if gqa == "queries" else 1, dense.head_dim, dense.intermediate - 10)
    scores = torch.tensor([0.1, 3.0, 2.0, 0.5])  # group 0: heads 0, 1; group 1: heads 2, 3
    q, kv = choose_heads(scores, dense, kept, gqa)
    if gqa == "queries":  # one query head from every group, the best of each
        assert q.tolist() == [1, 2] and kv.tolist() == [0, 1]
    else:  # the group with the larger sum (3.1 against 2.5)
        assert q.tolist() == [0, 1] and kv.tolist() == [0]
    channels = torch.arange(10, dense.intermediate)
    adapter = get_adapter(model)
    inputs, kwargs = capture_inputs(model, adapter, IDS[:2])
    block = adapter.get_blocks(model)[0]
    reference = _zeroed_dense_block(block, dense, q, channels)
    slice_block(block, dense, q, kv, channels)
    with torch.no_grad():
        expected = reference(inputs, **kwargs[0])
        got = block(inputs, **kwargs[0])
    expected, got = (t[0] if isinstance(t, tuple) else t for t in (expected, got))
    assert torch.allclose(expected, got, atol=1e-5)


# ------------------------------------------------------------------------------------------------ scores


def _flap_bias_gpt(windows):
    """FLAP's BiasGPT.add_batch (lib/layerwrapper.py:64-84, metric WIFV), transcribed, one window at a time.

    ``old_baseline_inp = self.baseline_inp`` is an alias there, so the in-place update makes both the new mean."""
    baseline_inp = torch.zeros(windows.shape[-1], dtype=torch.float64)
    fluc_inp, nsamples = torch.zeros_like(baseline_inp), 0
    for window in windows:
        inp = window.double().t()  # (dim, seqlen)
        old_baseline_inp = baseline_inp
        baseline_inp *= nsamples / (nsamples + 1)
        baseline_inp += torch.mean(inp, dim=1) / (nsamples + 1)
        if nsamples == 0:
            fluc_inp = 0
        else:
            fluc_inp *= (nsamples - 1) / (nsamples + 1 - 1)
            fluc_inp += torch.sum((inp - baseline_inp.unsqueeze(1)) * (inp - old_baseline_inp.unsqueeze(1)),
                                  dim=1) / (nsamples + 1)  # fmt: skip
        nsamples += 1
    return baseline_inp, fluc_inp


def test_flap_scores_match_a_transcription_of_flaps_formula():
    gen = torch.Generator().manual_seed(0)
    head_dim, heads, hidden = 4, 3, 5
    scale = torch.linspace(0.2, 3.0, heads * head_dim)
    windows = torch.randn(64, 32, heads * head_dim, generator=gen) * scale + torch.randn(heads * head_dim,
                                                                                         generator=gen)  # fmt: skip
    weight = torch.randn(hidden, heads * head_dim, generator=gen)
    stats = InputStats(heads * head_dim)
    for window in windows:
        stats.add(window)
    baseline_inp, fluc_inp = _flap_bias_gpt(windows)
    assert torch.allclose(stats.mean, baseline_inp)
    # FLAP's running fluc_inp is a constant multiple (about seqlen) of the variance: the same ranking in a layer.
    ratio = fluc_inp / stats.variance
    assert (ratio.max() - ratio.min()) / ratio.mean() < 0.05
    # lib/prune.py:16 (WIFV), :336 (squared for heads), :338 (summed per head of 128, here head_dim)
    wifv = fluc_inp * torch.sum(weight.double().pow(2), dim=0)
    flap_heads = (wifv**2).reshape(-1, head_dim).sum(dim=1)
    ours = flap_head_scores(stats.variance, weight, head_dim)
    assert torch.allclose(ours / ours.sum(), flap_heads / flap_heads.sum(), rtol=0.1)
    assert torch.equal(torch.argsort(ours), torch.argsort(flap_heads))
    assert torch.allclose(flap_channel_scores(fluc_inp, weight), wifv)
    # wanda_sp, lib/prune.py:463, :467, :472 (scaler_row: mean squared norm per window)
    scaler_row = (windows.double().square().sum(1)).mean(0)
    w_metric = torch.abs(weight.double()) * torch.sqrt(scaler_row.reshape((1, -1)))
    assert torch.allclose(wanda_channel_scores(scaler_row, weight), w_metric.mean(axis=0))
    assert torch.allclose(wanda_head_scores(scaler_row, weight, head_dim),
                          w_metric.mean(axis=0).reshape(-1, head_dim).sum(dim=1))  # fmt: skip


def test_flap_bias_compensates_the_mean_of_the_removed_channels(one_thread):
    """On inputs whose removed channels are constant, FLAP's bias makes the removal exact."""
    model = make_tiny_model("llama", layers=1)
    dense = model_widths(model.config)
    mlp = model.model.layers[0].mlp
    x = torch.randn(10, dense.intermediate)
    x[:, :20] = torch.randn(dense.intermediate)[:20]  # constant channels
    down = copy.deepcopy(mlp.down_proj)
    from sparsefit.prune.structured import compensation

    kept = torch.arange(20, dense.intermediate)
    bias = compensation(down.weight, x.mean(0).double(), kept)
    sliced = torch.nn.functional.linear(x[:, kept], down.weight[:, kept], bias)
    assert torch.allclose(sliced, down(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------ recovery


def test_ebft_lowers_the_block_error_of_the_sliced_model(one_thread):
    model = make_tiny_model("llama", layers=2)
    method = get_method("ebft")
    config = method.configure({"lr": 3e-3, "epochs": 4, "batch_size": 2, "heldout": 0}, IDS.shape[0])
    steps = method.block_steps(config, parse_pattern("structured"))
    walked = prune_model(model, IDS, structured("wanda", 0.35), recover_steps=steps)
    for report in walked["blocks"]:
        fit = report["ebft"]
        assert fit["final_loss"] < fit["initial_loss"]
    assert model_widths(model.config).intermediate < 128


def test_two_step_ebft_and_lora_run_on_a_sliced_model(one_thread):
    dense = make_tiny_model("llama", layers=2)
    model = copy.deepcopy(dense)
    prune_model(model, IDS, structured("flap", 0.3))
    pattern = parse_pattern("structured")
    ctx = RecoveryContext(model=model, teacher=dense, tokenizer=None, calib_ids=IDS, pattern=pattern,
                          device=torch.device("cpu"), batch_size=3)  # fmt: skip
    ebft = get_method("ebft")
    report = ebft.run(ctx, ebft.configure({"lr": 3e-3, "epochs": 2, "batch_size": 2, "heldout": 0}, 6))
    assert all(b["final_loss"] <= b["initial_loss"] for b in report["blocks"])
    lora = get_method("lora")
    report = lora.run(ctx, lora.configure({"epochs": 1, "batch_size": 2}, 6))
    assert report["saved"].startswith("merged (structured")
    for name in ("dsnot", "s2ft"):
        assert "structured" in get_method(name).supports(pattern)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    for arch in ("llama", "opt"):
        make_tiny_model(arch, layers=2).save_pretrained(root / arch)
        make_byte_tokenizer().save_pretrained(root / arch)
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers".split()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(20)))
    return root


def cli(monkeypatch, *args) -> int:
    monkeypatch.setattr("sys.argv", ["sparsefit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        raise SystemExit(0)
    return exit_info.value.code


def _prune(ws, out, *extra, arch="llama"):
    return ["prune", "--model", ws / arch, "--calib", ws / "corpus.txt", "--nsamples", 6, "--seqlen", 32,
            "--device", "cpu", "--pattern", "structured", "--out", out, *extra]  # fmt: skip


def test_cli_prune_structured_with_ebft_writes_a_plain_checkpoint(workspace, monkeypatch, tmp_path, one_thread):
    monkeypatch.setenv("SPARSEFIT_HOME", str(workspace / "home"))
    out = tmp_path / "slim"
    args = _prune(workspace, out, "--method", "flap", "--sparsity", 0.3, "--recover", "ebft", "--epochs", 1,
                  "--lr", "1e-3")  # fmt: skip
    assert cli(monkeypatch, *args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["structured"]["kept"]["heads"] == 2 and abs(run["results"]["sparsity"] - 0.3) < 0.05
    assert json.loads((out / "sparsity.json").read_text())["pattern"] == "structured"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.intermediate_size == run["structured"]["kept"]["intermediate"]
    assert loaded.config.attention_bias and loaded.config.mlp_bias


@pytest.mark.parametrize("extra, arch, message", [
    (["--method", "flap", "--sparsity", 0.95], "llama", "leaves no attention head"),
    (["--method", "flap", "--sparsity", 0.3, "--keep-heads", 3], "llama", "cannot be split evenly under GQA"),
    (["--method", "wanda", "--sparsity", 0.3], "opt", "structured pruning does not support architecture 'opt'"),
    (["--method", "sparsegpt", "--sparsity", 0.3], "llama", "--pattern structured takes method wanda or flap"),
    (["--method", "flap", "--sparsity", 0.3, "--recover", "dsnot"], "llama", "dsnot cannot recover a structured"),
])  # fmt: skip
def test_bad_structured_input_is_one_line_and_exit_2(workspace, monkeypatch, tmp_path, capsys, extra, arch, message):
    monkeypatch.setenv("SPARSEFIT_HOME", str(workspace / "home"))
    assert cli(monkeypatch, *_prune(workspace, tmp_path / "x", *extra, arch=arch)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
