"""OWL (outlier-weighted layerwise sparsity): the reference's formulas, per-block sparsities, exact masks, errors."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_byte_tokenizer, make_tiny_model
from sparsefit.cli import main
from sparsefit.errors import UsageError
from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
from sparsefit.prune import PruneConfig, parse_pattern, prune_model
from sparsefit.prune.owl import (
    check_block_sparsities,
    collect_outlier_ratios,
    outlier_ratio,
    owl_sparsities,
    pooled_outlier_ratio,
)
from sparsefit.prune.step import PruneStep
from sparsefit.walk.driver import run_blocks

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _config(**kw) -> PruneConfig:
    return PruneConfig(**{"method": "wanda", "sparsity": 0.5, "device": "cpu", "nsamples": 8, "seqlen": 32,
                          "batch_size": 4, **kw})  # fmt: skip


# --- a direct transcription of the reference (luuyin/OWL, lib/prune_all.py) ----------------------------------------


def ref_check_outlier_mean(mask, threshold):  # l. 139-154, verbatim but for layout
    W = mask
    max_shred = torch.mean(W) * threshold
    count = (W > max_shred).sum().item()
    return float(count) / W.numel() * 100


def ref_allocation(all_layer_ratio, sparsity_ratio, Lamda):  # prune_wanda_outlier l. 962-966, then l. 1054
    all_layer_ratio = np.array(all_layer_ratio)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * Lamda * 2
    )
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity_ratio)
    return [1 - all_layer_ratio[i] for i in range(len(all_layer_ratio))]


class RefWrappedGPT:  # lib/layerwrapper.py: the running mean of ||x_j||^2 per calibration window
    def __init__(self, layer):
        self.layer = layer
        self.scaler_row = torch.zeros(weight_matrix(layer).shape[1])
        self.nsamples = 0

    def add_batch(self, inp):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def ref_outlier_ratios(model, ids, Hyper_m):
    """The reference pre-pass: the dense model, each window alone, every linear layer of a block pooled."""
    blocks = get_adapter(model).get_blocks(model)
    wrapped, handles = [], []
    for block in blocks:
        subset = prunable_layers(block)
        wrapped.append({name: RefWrappedGPT(layer) for name, layer in subset.items()})
        for name, layer in subset.items():
            handles.append(layer.register_forward_hook(lambda _m, inp, _o, w=wrapped[-1][name]: w.add_batch(inp[0])))
    with torch.no_grad():
        for j in range(ids.shape[0]):
            model(ids[j : j + 1])
    for handle in handles:
        handle.remove()
    ratios = []
    for layers in wrapped:
        layer_wmetric = [
            torch.abs(weight_matrix(w.layer)) * torch.sqrt(w.scaler_row.reshape((1, -1))) for w in layers.values()
        ]
        layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
        ratios.append(ref_check_outlier_mean(layer_wmetric, Hyper_m))
    return ratios


def test_formulas_equal_a_transcription_of_the_reference():
    g = torch.Generator().manual_seed(3)
    layers = [torch.randn(24, 40, generator=g).abs() ** 3, torch.randn(40, 24, generator=g).abs() ** 2]
    pooled = torch.cat([x.flatten() for x in layers])
    for m in (3, 5, 7):
        expected = ref_check_outlier_mean(pooled, m)
        assert outlier_ratio(pooled, m) == expected
        assert pooled_outlier_ratio(lambda: iter(layers), m) == pytest.approx(expected, abs=1e-12)
    ratios = [4.1, 7.9, 5.5, 6.2, 3.3, 9.0]
    for sparsity, lam in [(0.5, 0.08), (0.7, 0.08), (0.6, 0.1)]:
        assert owl_sparsities(ratios, sparsity, lam) == ref_allocation(ratios, sparsity, lam)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_outlier_ratios_equal_the_reference_prepass(arch, one_thread):
    model = make_tiny_model(arch, layers=3)
    expected = ref_outlier_ratios(model, IDS, 5)
    before = copy.deepcopy(model.state_dict())
    ratios = collect_outlier_ratios(model, IDS, 5, device=torch.device("cpu"), batch_size=4)
    assert ratios == pytest.approx(expected, abs=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the pre-pass prunes nothing


def test_allocation_bounds_and_degenerate_cases():
    # Two blocks: exactly S - λ and S + λ, the more outlier-rich block pruned less.
    assert owl_sparsities([2.0, 8.0], 0.5, 0.08) == pytest.approx([0.58, 0.42])
    # Any number of blocks: the spread is exactly 2λ, the mean S; skewed ratios can put a block beyond S ± λ.
    values = owl_sparsities([1.0, 1.0, 1.0, 9.0], 0.5, 0.08)
    assert np.mean(values) == pytest.approx(0.5) and max(values) - min(values) == pytest.approx(0.16)
    assert min(values) < 0.5 - 0.08
    assert owl_sparsities([3.0, 3.0, 3.0], 0.6, 0.08) == [0.6, 0.6, 0.6]  # the reference would give NaN
    assert owl_sparsities([1.0, 5.0], 0.6, 0.0) == [0.6, 0.6]


# --- the pruning walk ----------------------------------------------------------------------------------------------


def _layer_weights(model):
    blocks = get_adapter(model).get_blocks(model)
    return [{name: weight_matrix(layer) for name, layer in prunable_layers(block).items()} for block in blocks]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_owl_block_sparsities_average_to_target_and_masks_are_exact(arch, one_thread):
    model = make_tiny_model(arch, layers=4)
    sparsity, lam = 0.6, 0.08
    walked = prune_model(model, IDS, _config(sparsity=sparsity, owl_lambda=lam))
    owl = walked["owl"]
    values = owl["sparsities"]
    assert len(values) == 4 and owl["lambda"] == lam and owl["m"] == 5
    assert np.mean(values) == pytest.approx(sparsity, abs=1e-12) == owl["mean_sparsity"]
    assert max(values) - min(values) == pytest.approx(2 * lam)
    assert all(sparsity - 2 * lam - 1e-12 <= v <= sparsity + 2 * lam + 1e-12 for v in values)
    # More outliers, lower sparsity.
    ratios = owl["outlier_ratios"]
    assert all(values[i] < values[j] for i in range(4) for j in range(4) if ratios[i] > ratios[j])
    for report, value, ratio in zip(walked["blocks"], values, owl["outlier_ratios"], strict=True):
        assert report["sparsity"] == value and report["outlier_ratio"] == ratio
    for weights, value in zip(_layer_weights(model), values, strict=True):
        for w in weights.values():  # Wanda: exactly int(in * s_block) zeros in every row
            assert ((w == 0).sum(dim=1) == int(w.shape[1] * value)).all()


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_owl_for_every_method(method, one_thread):
    model = make_tiny_model("llama", layers=3)
    walked = prune_model(model, IDS, _config(method=method, sparsity=0.5, owl_lambda=0.1))
    values = walked["owl"]["sparsities"]
    assert np.mean(values) == pytest.approx(0.5)
    for weights, value in zip(_layer_weights(model), values, strict=True):
        for w in weights.values():  # both choose exactly int(numel * s_block) per layer
            assert int((w == 0).sum()) == int(w.numel() * value)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_lambda_zero_and_uniform_block_list_are_plain_pruning(method, one_thread):
    base = make_tiny_model("llama", layers=3)
    plain, zero, listed = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    prune_model(plain, IDS, _config(method=method))
    walked = prune_model(zero, IDS, _config(method=method, owl_lambda=0.0))
    assert "owl" not in walked
    # The per-block path itself: a list of equal sparsities gives the same masks as the one number.
    run_blocks(listed, IDS, [PruneStep(method, [0.5] * 3, parse_pattern("unstructured"))],
               device=torch.device("cpu"), batch_size=4)  # fmt: skip
    for model in (zero, listed):
        for key, value in plain.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), key


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"owl_lambda": -0.1}, "OWL lambda"),
        ({"owl_lambda": float("nan")}, "OWL lambda"),
        ({"owl_lambda": 0.5}, "smaller --owl-lambda"),
        ({"sparsity": 0.05, "owl_lambda": 0.08}, "smaller --owl-lambda"),
        ({"owl_lambda": 0.08, "pattern": "2:4"}, "pattern 2:4"),
        ({"owl_lambda": 0.08, "owl_m": 0}, "OWL M"),
        ({"owl_m": 7}, "without an OWL lambda"),
    ],
)
def test_bad_owl_settings_are_one_line(kw, message):
    with pytest.raises(UsageError) as info:
        _config(**kw).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_block_sparsity_outside_range_is_refused_after_the_prepass(one_thread):
    with pytest.raises(UsageError) as info:
        check_block_sparsities(owl_sparsities([0.0, 0.0, 0.0, 10.0], 0.1, 0.09), 0.09)  # block 3: 0.1 + 0.045 - 0.18
    assert "block 3" in str(info.value) and "outside [0, 1)" in str(info.value) and "\n" not in str(info.value)
    # Through prune_model: the model is untouched when the allocation fails.
    model = make_tiny_model("llama", layers=4)
    before = copy.deepcopy(model.state_dict())
    ratios = collect_outlier_ratios(model, IDS, 5, device=torch.device("cpu"), batch_size=4)
    lam = 0.09
    if min(owl_sparsities(ratios, 0.1, lam)) >= 0:
        pytest.skip("this tiny model's ratios are not skewed enough")
    with pytest.raises(UsageError, match="smaller --owl-lambda"):
        prune_model(model, IDS, _config(sparsity=0.1, owl_lambda=lam))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recipe_and_compare_take_owl(tmp_path):
    from sparsefit.app.compare import run_compare
    from sparsefit.app.recipe import Recipe

    path = tmp_path / "r.yaml"
    path.write_text("prune: {owl_lambda: 0.08, owl_m: 7}\n")
    config = PruneConfig(**Recipe.load(path).prune, device="cpu")
    config.validate()
    assert config.owl and config.owl_m == 7
    with pytest.raises(UsageError, match="pattern 2:4"):
        run_compare("no-such-model", tmp_path / "c", pattern="2:4", owl_lambda=0.08)


# --- the CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("owl")
    make_tiny_model("llama", layers=3).save_pretrained(root / "tiny")
    make_byte_tokenizer().save_pretrained(root / "tiny")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers".split()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(30)))
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path / "home"))


def cli(monkeypatch, *args) -> int:
    monkeypatch.setattr("sys.argv", ["sparsefit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        raise SystemExit(0)
    return exit_info.value.code


def prune_args(ws, out, *extra):
    return ["prune", "--model", ws / "tiny", "--calib", ws / "corpus.txt", "--nsamples", 8, "--seqlen", 64,
            "--device", "cpu", "--out", out, *extra]  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--owl-lambda", "0.6"], "smaller --owl-lambda"),
        (["--owl-lambda", "-1"], "OWL lambda"),
        (["--pattern", "2:4", "--owl-lambda", "0.08"], "pattern 2:4"),
        (["--owl-m", "7"], "without an OWL lambda"),
    ],
)
def test_cli_bad_owl_is_one_line_and_exit_2(workspace, monkeypatch, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert cli(monkeypatch, *prune_args(workspace, out, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "Traceback" not in err and "\n" not in err
    assert not out.exists()


def test_cli_owl_with_interleaved_ebft(workspace, monkeypatch, tmp_path):
    out = tmp_path / "owl"
    args = ["--sparsity", "0.6", "--owl-lambda", "0.08", "--owl-m", "5", "--recover", "ebft", "--preset", "quick",
            "--lr", "1e-3", "--epochs", 1]  # fmt: skip
    assert cli(monkeypatch, *prune_args(workspace, out, *args)) == 0
    run = json.loads((out / "run.json").read_text())
    owl = run["owl"]
    assert run["config"]["owl_lambda"] == 0.08 and run["config"]["recover"] == "ebft"
    assert len(owl["sparsities"]) == 3 and np.mean(owl["sparsities"]) == pytest.approx(0.6)
    assert [b["sparsity"] for b in run["blocks"]] == owl["sparsities"]
    assert [b["outlier_ratio"] for b in run["blocks"]] == owl["outlier_ratios"]
    weights = load_file(out / "model.safetensors")
    for index, value in enumerate(owl["sparsities"]):  # EBFT kept the masks: still exactly s_block per row
        w = weights[f"model.layers.{index}.mlp.down_proj.weight"]
        assert ((w == 0).sum(dim=1) == int(w.shape[1] * value)).all()
