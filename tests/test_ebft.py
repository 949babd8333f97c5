import pytest
import torch

from conftest import make_tiny_model
from sparsefit.errors import UsageError
from sparsefit.models import get_adapter, prunable_layers, weight_matrix
from sparsefit.prune import PruneConfig, parse_pattern, prune_model
from sparsefit.recover import RecoveryContext, get_method
from sparsefit.recover.ebft import EBFTConfig, EBFTStep, fine_tune_block
from sparsefit.walk import BlockContext, TeacherStep, capture_inputs, check_teacher, run_blocks
from sparsefit.walk.masks import block_masks

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
CPU = torch.device("cpu")


def recover_model(model, dense, config):
    """Two-step EBFT through the registered method (the one driver), as `sparsefit recover` runs it."""
    ctx = RecoveryContext(model=model, teacher=dense, tokenizer=None, calib_ids=IDS,
                          pattern=parse_pattern("unstructured"), device=CPU, batch_size=4)  # fmt: skip
    return get_method("ebft").run(ctx, config)
FAST = EBFTConfig(lr=1e-3, epochs=3, batch_size=2, heldout=2)


def _masks(model):
    return {
        f"{i}.{name}": (weight_matrix(layer) != 0).clone()
        for i, block in enumerate(get_adapter(model).get_blocks(model))
        for name, layer in prunable_layers(block).items()
    }


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _block_context(model, index=0):
    adapter = get_adapter(model)
    inputs, kwargs = capture_inputs(model, adapter, IDS)
    block = adapter.get_blocks(model)[index]
    return BlockContext(index, "b", block, inputs, kwargs[index], torch.device("cpu"), 4)


def test_fine_tune_block_lowers_loss_and_keeps_masks_exactly():
    dense = make_tiny_model("llama")
    model = make_tiny_model("llama")
    ctx = _block_context(model)
    targets = _block_context(dense).run_all()
    prune_model(model, IDS, PruneConfig(method="wanda", sparsity=0.6, device="cpu", nsamples=8, seqlen=32))
    block = ctx.block
    masks = block_masks(block)
    before = {n: weight_matrix(m).clone() for n, m in prunable_layers(block).items()}
    fit = fine_tune_block(block, ctx.forward, ctx.inputs, targets, masks, FAST, device=ctx.device, seed=0)
    assert fit.final_loss < 0.8 * fit.initial_loss
    assert fit.final_heldout is not None and fit.final_heldout < fit.initial_heldout
    assert len(fit.train_curve) == 3 and fit.steps == 3 * 3
    for name, layer in prunable_layers(block).items():
        after = weight_matrix(layer)
        assert torch.equal(after != 0, masks[name]), name  # zeros stay zero, kept weights stay nonzero
        assert not torch.equal(after, before[name])  # kept weights moved
    assert all(not p.requires_grad for p in block.parameters())


@pytest.mark.parametrize("target", ["sparse-path", "dense-path", "mix:0.3"])
def test_interleaved_prune_then_ebft_runs_for_every_target(target):
    model = make_tiny_model("llama")
    cfg = PruneConfig(method="wanda", sparsity=0.5, device="cpu", nsamples=8, seqlen=32)
    config = EBFTConfig(lr=1e-3, epochs=2, batch_size=2, target=target)
    steps_before = [TeacherStep(None, target=target)] if target != "sparse-path" else []
    walked = prune_model(
        model, IDS, cfg, steps_before=steps_before, recover_steps=[EBFTStep(config)],
        keep_dense_outputs=target == "sparse-path",
    )  # fmt: skip
    fits = {r["block"]: r["ebft"] for r in walked["blocks"]}
    assert sorted(fits) == [0, 1]
    assert all(f["final_loss"] < f["initial_loss"] for f in fits.values())
    for name, keep in _masks(model).items():
        assert keep.float().mean().item() == pytest.approx(0.5), name


def test_mix_target_is_the_weighted_sum_of_the_two_paths():
    dense = make_tiny_model("llama", layers=3)
    model = make_tiny_model("llama", layers=3)
    prune_model(model, IDS, PruneConfig(method="magnitude", sparsity=0.7, device="cpu", nsamples=8, seqlen=32))
    seen = {}
    for target in ("sparse-path", "dense-path", "mix:0.25", "mix"):
        outputs = seen[target] = []
        steps = [TeacherStep(dense, target=target), lambda ctx, out=outputs: out.append(ctx.dense_outputs.clone())]
        run_blocks(model, IDS, steps, device=CPU, batch_size=4)
    sparse, dense_path = seen["sparse-path"], seen["dense-path"]
    assert torch.equal(sparse[0], dense_path[0])  # the first block's inputs are the same on both paths
    for i in (1, 2):
        assert (sparse[i] - dense_path[i]).abs().max() > 1e-3  # the paths part after a pruned block
        for target, share in (("mix:0.25", 0.25), ("mix", 0.5)):
            want = (1 - share) * sparse[i] + share * dense_path[i]
            torch.testing.assert_close(seen[target][i], want, rtol=1e-6, atol=1e-6)


def test_two_step_recover_improves_output_and_keeps_masks():
    dense = make_tiny_model("llama")
    model = make_tiny_model("llama")
    prune_model(model, IDS, PruneConfig(method="magnitude", sparsity=0.7, device="cpu", nsamples=8, seqlen=32))
    masks = _masks(model)
    with torch.no_grad():
        want = dense(input_ids=IDS).logits
        before = torch.nn.functional.mse_loss(model(input_ids=IDS).logits, want).item()
    recover_model(model, dense, EBFTConfig(lr=1e-3, epochs=4, batch_size=2))
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(model(input_ids=IDS).logits, want).item()
    assert after < before
    for name, keep in _masks(model).items():
        assert torch.equal(keep, masks[name]), name


def test_teacher_must_match():
    with pytest.raises(UsageError, match="blocks"):
        check_teacher(make_tiny_model("llama"), make_tiny_model("llama", layers=3))
    with pytest.raises(UsageError, match="architecture"):
        check_teacher(make_tiny_model("llama"), make_tiny_model("qwen2"))
    with pytest.raises(UsageError, match="shape"):
        check_teacher(make_tiny_model("llama"), make_tiny_model("llama", hidden=32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lr=0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(epochs=0), "epochs"),
        (dict(batch_size=9), "larger than"),
        (dict(heldout=8), "no training window"),
        (dict(target="teacher"), "target"),
        (dict(target="mix:1.5"), "mix:W with 0 < W < 1"),
        (dict(target="mix:x"), "'mix:x'"),
        (dict(early_stop=2), "held-out"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(UsageError, match=message):
        EBFTConfig(**overrides).validate(n_windows=8)


def test_presets():
    ebft = get_method("ebft")
    paper = ebft.configure({"preset": "paper"})
    assert paper.lr == 2e-4 and paper.epochs == 10 and paper.batch_size == 8
    assert ebft.configure({"preset": "quick", "lr": 5e-4}).lr == 5e-4
    # auto: the cpu preset on a CPU, the gpu one (the paper's with held-out windows) on a GPU
    auto_cpu = ebft.configure({}, device=CPU)
    assert (auto_cpu.lr, auto_cpu.lr_scale, auto_cpu.warmup, auto_cpu.epochs) == (1.6e-2, "tensor-rms", 0.1, 8)
    auto_gpu = ebft.configure({"preset": "auto"}, device=torch.device("cuda"))
    assert (auto_gpu.lr, auto_gpu.epochs, auto_gpu.heldout, auto_gpu.early_stop) == (2e-4, 10, 8, 2)
    with pytest.raises(UsageError, match="preset"):
        ebft.configure({"preset": "tpu"})


def test_gpt2_conv1d_masks_stay_fixed():
    dense = make_tiny_model("gpt2")
    model = make_tiny_model("gpt2")
    prune_model(model, IDS, PruneConfig(method="magnitude", sparsity=0.5, device="cpu", nsamples=8, seqlen=32))
    masks = _masks(model)
    recover_model(model, dense, EBFTConfig(lr=1e-3, epochs=1, batch_size=4))
    for name, keep in _masks(model).items():
        assert torch.equal(keep, masks[name]), name


def test_square_conv1d_mask_is_oriented_by_layer_type_not_shape():
    """GPT-2's attn.c_proj is a square Conv1D stored (in, out): a shape test cannot tell its orientation."""
    from sparsefit.recover.ebft import EBFTConfig, _trainable

    model = make_tiny_model("gpt2")
    prune_model(model, IDS, PruneConfig(method="magnitude", sparsity=0.5, device="cpu", nsamples=8, seqlen=32))
    ctx = _block_context(model)
    masks = block_masks(ctx.block)
    layer = ctx.block.attn.c_proj
    assert layer.weight.shape[0] == layer.weight.shape[1]  # square: the case a shape comparison gets wrong
    _groups, hooks, _ = _trainable(ctx.block, masks, EBFTConfig(train_norms=False))
    ctx.forward(ctx.inputs[:4]).square().mean().backward()
    for hook in hooks:
        hook.remove()
    stored_keep = masks["attn.c_proj"].t()  # (out, in) mask in the stored (in, out) orientation
    grad = layer.weight.grad
    assert not torch.equal(stored_keep, stored_keep.t())  # the two orientations differ
    assert (grad[~stored_keep] == 0).all()  # every pruned weight gets zero gradient
    assert (grad[stored_keep] != 0).all()  # every kept weight can move
