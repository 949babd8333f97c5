"""Robust recovery (issue 13): a fit never ends worse than it began; norms and biases take no weight decay; the
reconstruction window (a sub-block, one block, N blocks) keeps the masks and trains what it says."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from sparsefit.models.adapters import get_adapter
from sparsefit.prune import PruneConfig, parse_pattern, prune_model
from sparsefit.recover import RecoveryContext, get_method
from sparsefit.recover.ebft import EBFTConfig, EBFTStep, _trainable, fine_tune_block
from sparsefit.walk.capture import capture_inputs
from sparsefit.walk.masks import block_masks, model_masks
from sparsefit.walk.walker import call_block
from test_cli import cli, prune_args, workspace  # noqa: F401  (the fixture is shared)

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_pair(arch: str = "llama", layers: int = 2):
    dense = make_tiny_model(arch, layers=layers)
    sparse = copy.deepcopy(dense)
    prune_model(sparse, IDS, PruneConfig(method="wanda", sparsity=0.6, device="cpu", nsamples=8, seqlen=32))
    return dense, sparse


def recover(dense, sparse, **options):
    ctx = RecoveryContext(model=sparse, teacher=dense, tokenizer=None, calib_ids=IDS,
                          pattern=parse_pattern("unstructured"), device=CPU, seed=0, batch_size=4,
                          budget_tokens=None, options=options)  # fmt: skip
    return get_method("ebft").run(ctx)


def block_inputs(model, index: int = 0):
    adapter = get_adapter(model)
    inputs, kwargs = capture_inputs(model, adapter, IDS, device=CPU, batch_size=4)
    blocks = adapter.get_blocks(model)
    with torch.no_grad():
        for j in range(index):
            inputs = call_block(blocks[j], inputs, kwargs[j])
    return inputs, kwargs


@pytest.mark.parametrize("heldout", [2, 0])
def test_a_diverging_fit_backs_off_and_never_ends_worse_than_it_began(heldout):
    dense, sparse = pruned_pair()
    inputs, kwargs = block_inputs(sparse)
    block, teacher = get_adapter(sparse).get_blocks(sparse)[0], get_adapter(dense).get_blocks(dense)[0]
    with torch.no_grad():
        targets = call_block(teacher, inputs, kwargs[0])
    masks = block_masks(block)
    config = EBFTConfig(lr=5.0, epochs=2, batch_size=2, heldout=heldout, retries=2)  # a rate that must diverge
    fit = fine_tune_block(block, lambda x: call_block(block, x, kwargs[0]), inputs, targets, masks, config,
                          device=CPU, seed=0)  # fmt: skip
    assert fit.attempts > 1 and fit.lr < config.lr  # it backed off
    if heldout:
        assert fit.final_heldout <= fit.initial_heldout
    assert fit.final_loss <= fit.initial_loss * (1 + 1e-6) or heldout
    for name, keep in block_masks(block).items():
        assert torch.equal(keep, masks[name]), name


def test_a_fit_that_cannot_improve_is_reverted_to_the_pruned_weights():
    dense, sparse = pruned_pair()
    inputs, kwargs = block_inputs(sparse)
    block = get_adapter(sparse).get_blocks(sparse)[0]
    before = copy.deepcopy(block.state_dict())
    with torch.no_grad():
        targets = call_block(block, inputs, kwargs[0])  # the block already reproduces its targets exactly
    config = EBFTConfig(lr=1e-2, epochs=1, batch_size=2, heldout=2, retries=1)
    fit = fine_tune_block(block, lambda x: call_block(block, x, kwargs[0]), inputs, targets, block_masks(block),
                          config, device=CPU, seed=0)  # fmt: skip
    assert fit.reverted and fit.attempts == 2 and fit.final_heldout == fit.initial_heldout == 0.0
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_norms_and_biases_take_no_weight_decay(arch):
    model = make_tiny_model(arch)
    block = get_adapter(model).get_blocks(model)[0]
    groups, hooks, layers = _trainable(block, block_masks(block), EBFTConfig(weight_decay=0.1))
    for hook in hooks:
        hook.remove()
    decayed, undecayed = groups[0]["params"], groups[1]["params"]
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in decayed} == {id(layer.weight) for layer in layers.values()}
    norms = [p for n, m in block.named_modules() if "norm" in type(m).__name__.lower() for p in m.parameters()]
    biases = [layer.bias for layer in layers.values() if layer.bias is not None]
    assert norms and {id(p) for p in undecayed} == {id(p) for p in norms + biases}
    assert bool(biases) == (arch == "qwen2")  # Qwen2's q/k/v biases train, undecayed


def chain(model, start: int, stop: int, inputs, kwargs):
    blocks = get_adapter(model).get_blocks(model)
    with torch.no_grad():
        for j in range(start, stop):
            inputs = call_block(blocks[j], inputs, kwargs[j])
    return inputs


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_window_of_two_blocks_trains_both_against_the_dense_output_of_the_second(arch):
    dense, sparse = pruned_pair(arch, layers=4)
    masks = model_masks(sparse)
    pruned = copy.deepcopy(sparse)
    inputs, kwargs = block_inputs(sparse)
    report = recover(dense, sparse, preset="quick", epochs=3, batch_size=2, heldout=0, window=2, lr=3e-3,
                     target="sparse-path")  # fmt: skip
    assert [b["window"] for b in report["blocks"]] == [[0, 1], [2, 3]]
    assert [b["block"] for b in report["blocks"]] == [1, 3]
    for name, keep in model_masks(sparse).items():
        assert torch.equal(keep, masks[name]), name  # masks bit-identical
    after_state = sparse.state_dict()
    block0 = [name for name in pruned.state_dict() if "layers.0.mlp" in name]
    assert all(not torch.equal(pruned.state_dict()[name], after_state[name]) for name in block0)  # block 0 trained
    # The window's error against the dense output of block 1, from the sparse inputs at block 0, went down.
    target = chain(dense, 0, 2, inputs, kwargs)
    before = torch.nn.functional.mse_loss(chain(pruned, 0, 2, inputs, kwargs), target)
    after = torch.nn.functional.mse_loss(chain(sparse, 0, 2, inputs, kwargs), target)
    assert after < before and report["blocks"][0]["final_loss"] == pytest.approx(after.item(), rel=1e-4)


def test_a_window_of_two_blocks_with_the_mixed_target_fits_the_mix_of_both_paths():
    dense, sparse = pruned_pair("llama", layers=4)
    inputs, kwargs = block_inputs(sparse)
    report = recover(dense, sparse, preset="quick", epochs=3, batch_size=2, heldout=0, window=2, lr=3e-3,
                     target="mix:0.25")  # fmt: skip
    # The second window's target: the dense blocks 2-3 on the recovered model's inputs at block 2 (sparse path),
    # and the dense model's own output of block 3 (dense path), weighted 0.75 and 0.25.
    at_2 = chain(sparse, 0, 2, inputs, kwargs)
    target = 0.75 * chain(dense, 2, 4, at_2, kwargs) + 0.25 * chain(dense, 0, 4, inputs, kwargs)
    final = torch.nn.functional.mse_loss(chain(sparse, 2, 4, at_2, kwargs), target)
    assert report["blocks"][1]["final_loss"] == pytest.approx(final.item(), rel=1e-4)
    assert report["blocks"][1]["final_loss"] < report["blocks"][1]["initial_loss"]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("target", ["sparse-path", "mix"])
def test_sub_block_window_fits_attention_then_mlp_and_keeps_masks(arch, target):
    dense, sparse = pruned_pair(arch)
    masks = model_masks(sparse)
    report = recover(dense, sparse, preset="quick", epochs=2, batch_size=2, heldout=0, window="sub-block",
                     target=target)  # fmt: skip
    for name, keep in model_masks(sparse).items():
        assert torch.equal(keep, masks[name]), name
    for block in report["blocks"]:
        attention = block["attention"]
        assert attention["final_loss"] <= attention["initial_loss"] and block["final_loss"] <= block["initial_loss"]


def test_sub_block_attention_fit_trains_only_the_attention_part(monkeypatch):
    import sparsefit.recover.ebft as ebft

    dense, sparse = pruned_pair("gemma3", layers=1)
    block = get_adapter(sparse).get_blocks(sparse)[0]
    q_before = block.self_attn.q_proj.weight.clone()
    mlp_before = {n: p.clone() for n, p in block.named_parameters()
                  if n.startswith(("mlp", "pre_feedforward", "post_feedforward"))}  # fmt: skip
    original, calls = ebft.fine_tune_block, []

    def attention_fit_only(*args, include, **kwargs):  # the MLP fit is skipped: what changed is the attention fit's
        calls.append(include)
        if len(calls) == 1:
            calls.append(original(*args, include=include, **kwargs))
        return calls[1]

    monkeypatch.setattr(ebft, "fine_tune_block", attention_fit_only)
    recover(dense, sparse, preset="quick", epochs=2, batch_size=2, heldout=0, window="sub-block")
    include = calls[0]
    assert include("self_attn.q_proj") and include("input_layernorm") and include("post_attention_layernorm")
    assert not include("mlp.up_proj") and not include("pre_feedforward_layernorm")
    for name, value in block.named_parameters():
        if name in mlp_before:
            assert torch.equal(value, mlp_before[name]), name
    assert not torch.equal(block.self_attn.q_proj.weight, q_before)


def test_window_option_errors_are_one_line():
    method = get_method("ebft")
    with pytest.raises(Exception, match="window 'three' is not one of sub-block, block or a number"):
        method.configure({"window": "three"}, 8, CPU)
    with pytest.raises(Exception, match="ebft target 'mix:0' is not one of"):
        method.configure({"window": "sub-block", "target": "mix:0"}, 8, CPU)


def test_interleaved_window_of_two_equals_across_a_resume(workspace, monkeypatch, tmp_path):  # noqa: F811
    args = prune_args(workspace, tmp_path / "full", "--sparsity", "0.6")[:-2]  # without --out
    extra = ["--recover", "ebft", "--epochs", 1, "--train-batch", 2, "-o", "window=2"]
    assert cli(monkeypatch, *args, *extra, "--out", tmp_path / "full") == 0
    original = EBFTStep.__call__

    def killed_at_block_2(self, ctx):
        if ctx.index == 2:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(EBFTStep, "__call__", killed_at_block_2)
    assert cli(monkeypatch, *args, *extra, "--out", tmp_path / "resumed") == 130
    monkeypatch.setattr(EBFTStep, "__call__", original)
    assert cli(monkeypatch, *args, *extra, "--out", tmp_path / "resumed", "--resume") == 0
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    report = json.loads((tmp_path / "full" / "ebft.json").read_text())
    assert [b["window"] for b in report["blocks"]][0] == [0, 1]


def test_a_whole_model_fit_whose_probe_loss_rose_goes_back_to_its_start():
    from sparsefit.recover.training import TrainConfig, causal_lm_loss, fit_model

    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(lr=10.0, epochs=1, batch_size=2, clip=0.0, probe_windows=4)  # a rate that must diverge
    result = fit_model(model, list(model.parameters()), lambda ids: causal_lm_loss(model, ids), IDS, config,
                       steps=4, device=CPU)  # fmt: skip
    assert result["reverted"] and result["final_loss"] == pytest.approx(result["initial_loss"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    kept = fit_model(model, list(model.parameters()), lambda ids: causal_lm_loss(model, ids), IDS,
                     TrainConfig(lr=1e-3, epochs=1, batch_size=2, probe_windows=4), steps=4, device=CPU)  # fmt: skip
    assert not kept["reverted"] and kept["final_loss"] < kept["initial_loss"]


def test_recipe_polishes_ebft_with_a_global_squarehead_pass(workspace, monkeypatch, tmp_path):  # noqa: F811
    corpus = workspace / "corpus.txt"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {workspace / 'tiny'}\ndevice: cpu\n"
        f"prune: {{method: wanda, sparsity: 0.6, calib: {corpus}, nsamples: 8, seqlen: 64}}\n"
        "recover: {method: ebft, epochs: 1, batch_size: 2}\npolish: {epochs: 1, batch_size: 2}\n"
        f"eval: {{ppl: [{corpus}], seqlen: 64, max_tokens: 256}}\n"
    )
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs") == 0
    out = tmp_path / "runs" / "tiny"
    recovery = json.loads((out / "recovered" / "recovery.json").read_text())
    assert recovery["method"] == "ebft" and recovery["polish"]["method"] == "squarehead"
    assert recovery["polish"]["fit"]["steps"] == 4 and len(recovery["blocks"]) == 3
    run = json.loads((out / "recovered" / "run.json").read_text())
    assert run["recovery"]["polish"]["method"] == "squarehead"
    pruned = load_file(out / "pruned" / "model.safetensors")
    recovered = load_file(out / "recovered" / "model.safetensors")
    for key, value in pruned.items():
        if value.dim() == 2 and "layers" in key:
            assert torch.equal(value == 0, recovered[key] == 0), key  # masks fixed through both passes
    assert "then the global pass" in (out / "report.md").read_text()


@pytest.mark.parametrize("text, message", [
    ("polish: {method: dsnot}\n", "polish 'dsnot' works block by block"),
    ("polish: {method: squarehead, rank: 2}\n", "squarehead does not accept option(s) rank"),
    ("polish: [squarehead]\n", "'polish' must be a mapping or null"),
])  # fmt: skip
def test_bad_polish_is_one_line_before_loading(monkeypatch, tmp_path, capsys, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tmp_path / 'absent'}\n{text}")
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs") == 2
    assert message in capsys.readouterr().err


def test_token_relative_loss_weighs_every_token_alike():
    from sparsefit.recover.ebft import reconstruction_loss

    target = torch.tensor([[[1000.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])  # one massive token, like an attention sink
    out = torch.tensor([[[1010.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    relative = reconstruction_loss(out, target, "token-relative")
    assert relative.item() == pytest.approx((100 / 1e6 + 1 / 1 + 1 / 4) / 3)
    assert reconstruction_loss(out, target, "mse").item() == pytest.approx((100 + 1 + 1) / 6)
    assert reconstruction_loss(out, target, "token-relative", reduction="sum").item() == pytest.approx(3 * relative)


def test_a_token_relative_fit_lowers_its_loss_and_keeps_masks():
    dense, sparse = pruned_pair("gemma3")
    masks = model_masks(sparse)
    report = recover(dense, sparse, preset="quick", epochs=2, batch_size=2, heldout=2, loss="token-relative")
    assert all(b["final_heldout"] < b["initial_heldout"] for b in report["blocks"])
    assert report["config"]["loss"] == "token-relative"
    for name, keep in model_masks(sparse).items():
        assert torch.equal(keep, masks[name]), name
    with pytest.raises(Exception, match="loss 'l1' is not one of mse, token-relative"):
        get_method("ebft").configure({"loss": "l1"}, 8, CPU)


def test_a_fit_redone_with_the_same_groups_takes_the_new_rate():
    from sparsefit.recover.training import FitConfig, train_loop

    weight = torch.nn.Parameter(torch.ones(4))
    groups = [{"params": [weight], "weight_decay": 0.0}]
    module = torch.nn.Module()
    module.weight = weight
    for lr, moved in ((0.5, True), (1e-30, False)):  # torch.optim must not keep the first rate in the group
        before = weight.detach().clone()
        train_loop(module, groups, lambda i: (weight * weight).sum(), 2, FitConfig(lr=lr, epochs=1, batch_size=2),
                   steps=1, seed=0)  # fmt: skip
        assert (not torch.equal(weight.detach(), before)) == moved
    assert groups == [{"params": [weight], "weight_decay": 0.0}]


def test_a_short_fit_takes_a_lower_rate():
    from sparsefit.recover.ebft import PRESETS, rate_for_steps

    assert rate_for_steps(124, 124) == rate_for_steps(500, 124) == rate_for_steps(3, 0) == 1.0
    assert rate_for_steps(28, 124) == pytest.approx((28 / 124) ** 0.5)
    assert (PRESETS["quick"].full_rate_steps, PRESETS["cpu"].full_rate_steps) == (124, 56)
    dense, sparse = pruned_pair()
    # 8 windows, 2 held out, batch 2, 2 epochs: 6 steps per block, so the rate is sqrt(6 / 24) = 1/2 of 4e-3.
    report = recover(dense, sparse, preset="quick", epochs=2, batch_size=2, heldout=2, lr=4e-3, full_rate_steps=24,
                     retries=0)  # fmt: skip
    assert [block["lr"] for block in report["blocks"]] == [pytest.approx(2e-3)] * 2
    assert [block["steps"] for block in report["blocks"]] == [6, 6]
    with pytest.raises(Exception, match="full_rate_steps"):
        EBFTConfig(full_rate_steps=-1).validate()
