import copy

import pytest
import torch

from conftest import make_tiny_model
from sparsefit.errors import UsageError
from sparsefit.models import get_adapter, prunable_layers, weight_matrix
from sparsefit.prune import PruneConfig, check_pattern, parse_pattern, prune_model
from sparsefit.recover import METHODS, RecoveryContext, get_method
from sparsefit.recover.dsnot import DSnoTConfig, dsnot_nm, dsnot_unstructured, select_layers
from sparsefit.recover.s2ft import S2FTConfig, attach
from sparsefit.recover.squarehead import paper_setting, squarehead_distill
from sparsefit.recover.training import plan_steps
from sparsefit.walk.masks import model_layers, model_masks, same_zeros

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


_PRUNED: dict = {}


def pruned_pair(pattern="unstructured", sparsity=0.6):
    """(dense teacher, Wanda-pruned copy), built once per pattern; callers get fresh copies."""
    if pattern not in _PRUNED:
        dense = make_tiny_model("llama")
        sparse = copy.deepcopy(dense)
        share = sparsity if pattern == "unstructured" else None  # N:M: the pattern's own
        config = PruneConfig(method="wanda", sparsity=share, pattern=pattern, device="cpu", nsamples=8, seqlen=32)
        prune_model(sparse, IDS, config)
        _PRUNED[pattern] = (dense, sparse)
    dense, sparse = _PRUNED[pattern]
    return copy.deepcopy(dense), copy.deepcopy(sparse)


def context(model, teacher, pattern="unstructured", budget=None, **options):
    return RecoveryContext(model=model, teacher=teacher, tokenizer=None, calib_ids=IDS, pattern=parse_pattern(pattern),
                           device=CPU, budget_tokens=budget, options=options)  # fmt: skip


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- registry and bad input ---------------------------------------------------------------------------------


def test_registry_has_every_method_and_rejects_unknown_options():
    assert {"ebft", "dsnot", "squarehead", "lora", "s2ft"} <= set(METHODS)
    for name in ("dsnot", "squarehead", "lora", "s2ft"):
        with pytest.raises(UsageError, match="does not accept option"):
            get_method(name).configure({"no_such_option": 1})
        with pytest.raises(UsageError, match="preset"):
            get_method(name).configure({"preset": "nope"})
    with pytest.raises(UsageError, match="dsnot layers 'ffn'"):
        get_method("dsnot").configure({"layers": "ffn"})
    with pytest.raises(UsageError, match="s2ft targets w_proj"):
        get_method("s2ft").configure({"targets": "o_proj,w_proj"})
    assert get_method("lora").configure({"targets": "q_proj,k_proj"}).targets == ("q_proj", "k_proj")


def test_token_budget_sets_the_steps():
    assert plan_steps(None, n_windows=8, seqlen=32, batch_size=2, epochs=4) == 16
    assert plan_steps(1000, n_windows=8, seqlen=32, batch_size=2, epochs=4) == 16  # ceil(1000 / 64)
    with pytest.raises(UsageError):
        plan_steps(0, n_windows=8, seqlen=32, batch_size=2, epochs=4)


# --- DSnoT ---------------------------------------------------------------------------------------------------


def _random_layer(rows=16, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(64, cols, generator=g) + torch.randn(cols, generator=g)  # nonzero channel means
    scores = w.abs() * x.square().sum(0).sqrt()
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, torch.argsort(scores, dim=1)[:, : cols // 2], False)
    return w, x, keep


def test_dsnot_unstructured_keeps_row_counts_and_shrinks_the_error():
    # The sign-stopping variant: it never overshoots. The reference's default carries on through a sign change
    # (tests/test_dsnot_reference.py checks it against a transcription of the reference loop).
    w, x, keep = _random_layer()
    result = dsnot_unstructured(w, w * keep, keep, x.sum(0), x.var(0, unbiased=False), x.square().sum(0),
                                DSnoTConfig(threshold=0.0, same_sign=True))  # fmt: skip
    assert torch.equal(result.keep.sum(1), keep.sum(1))
    assert result.swaps > 0
    assert result.error_after.abs().sum() < result.error_before.abs().sum()
    # The error is the summed output difference over the inputs, recomputed from the new mask.
    recomputed = ((w - w * result.keep) @ x.sum(0))
    assert torch.allclose(recomputed, result.error_after, atol=1e-3)
    assert (result.error_after.sign() == result.error_before.sign()).all()  # never overshoots past zero


def test_dsnot_nm_swaps_stay_inside_each_group():
    w, x, _ = _random_layer()
    pattern = parse_pattern("2:4")
    scores = w.abs() * x.square().sum(0).sqrt()
    from sparsefit.prune import nm_mask

    keep = nm_mask(scores, pattern)
    result = dsnot_nm(w, w * keep, keep, x.sum(0), x.var(0, unbiased=False), x.square().sum(0),
                      DSnoTConfig(threshold=0.0), pattern)  # fmt: skip
    assert result.swaps > 0
    assert torch.equal(result.keep.reshape(16, 8, 4).sum(2), torch.full((16, 8), 2))
    assert result.error_after.abs().sum() < result.error_before.abs().sum()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_dsnot_on_a_model_keeps_sparsity_values_and_lowers_the_output_error(pattern):
    dense, model = pruned_pair(pattern)
    before = weights(model)
    masks = model_masks(model)
    # The first block's layers see the same inputs in the dense and the sparse model (embeddings are not pruned).
    block_d = get_adapter(dense).get_blocks(dense)[0]
    attn = select_layers(prunable_layers(block_d), "attn")
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[0].reshape(-1, args[0].shape[-1])  # returns None: the input is left as it is

        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in attn.items()]
    with torch.no_grad():
        dense(input_ids=IDS)
    for hook in hooks:
        hook.remove()

    def output_error(m):  # sum over rows of |sum over calibration tokens of (dense - sparse) layer output|
        block = get_adapter(m).get_blocks(m)[0]
        layers = prunable_layers(block)
        return sum(float(((weight_matrix(attn[n]) - weight_matrix(layers[n])) @ seen[n].sum(0)).abs().sum())
                   for n in attn)  # fmt: skip

    error_before = output_error(model)
    report = get_method("dsnot").run(context(model, dense, pattern))
    assert report["trainable_params"] == 0 and report["swaps"] > 0
    assert output_error(model) < error_before
    assert report["abs_error_after"] < report["abs_error_before"]
    after = model_masks(model)
    dense_w = {k: weight_matrix(v) for k, v in model_layers(dense).items()}
    for name, layer in model_layers(model).items():
        w = weight_matrix(layer)
        assert torch.equal(after[name].sum(1), masks[name].sum(1)), name  # exact zeros per row
        assert check_pattern(w, pattern)
        assert torch.equal(w[after[name]], dense_w[name][after[name]])  # values: the teacher's, none changed
        if ".mlp." in name:
            assert torch.equal(w, before[name + ".weight"])  # attention only by default
    assert not torch.equal(torch.cat([m.flatten() for m in after.values()]),
                           torch.cat([m.flatten() for m in masks.values()]))  # fmt: skip


# --- SquareHead ----------------------------------------------------------------------------------------------


def test_squarehead_loss_is_normalised_per_layer_and_ignores_padding():
    t = [torch.randn(2, 5, 8), 100 * torch.randn(2, 5, 8)]
    assert float(squarehead_distill(t, t)) == 0.0
    s = [t[0] + 0.1, t[1] + 10.0]  # the same relative error in both layers
    loss = squarehead_distill(s, t)
    parts = [((a - b).square().mean() / (b.square().mean() + 1e-6)) for a, b in zip(s, t, strict=True)]
    assert torch.allclose(loss, sum(parts))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    noisy = [x.clone() for x in s]
    noisy[0][1, 3:] = 1e6  # padding positions: any value, same loss
    assert torch.allclose(squarehead_distill(noisy, t, mask), squarehead_distill(s, t, mask))
    # The reference's table (run_sparse_finetune.sh); between rows, the nearest row.
    assert paper_setting(0.5) == (3e-5, 2) and paper_setting(0.6) == (1e-4, 2) and paper_setting(0.7) == (8e-5, 4)
    assert paper_setting(0.9) == (1e-4, 4) and paper_setting(0.68) == (8e-5, 4)
    assert paper_setting(0.5, structured=True) == (1e-4, 4)


def test_squarehead_trains_down_the_loss_and_keeps_exact_zeros():
    dense, model = pruned_pair()
    masks = model_masks(model)
    dense_before = weights(dense)
    report = get_method("squarehead").run(context(model, dense, budget=8 * 2 * 32, lr=2e-3))
    assert report["fit"]["steps"] == 8 and report["fit"]["tokens"] == 8 * 2 * 32
    assert report["fit"]["final_loss"] < report["fit"]["initial_loss"]
    assert same_zeros(model, masks)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in dense_before.items())  # teacher untouched
    assert report["trainable_params"] > 0


# --- LoRA ----------------------------------------------------------------------------------------------------


def test_lora_merged_then_remasked_keeps_exact_sparsity_and_reports_unmerged():
    dense, model = pruned_pair()
    masks = model_masks(model)
    calls = []

    def evaluate(m):
        calls.append(type(m).__name__)
        return {"ppl": {"x": 1.0}}

    ctx = context(model, dense, budget=8 * 2 * 32, lr=5e-3)
    ctx.evaluate = evaluate
    report = get_method("lora").run(ctx)
    assert calls and report["unmerged"] == {"ppl": {"x": 1.0}}
    assert report["fit"]["final_loss"] < report["fit"]["initial_loss"]
    assert report["sparsity_merged_unmasked"] < report["sparsity_saved"]  # merging alone would make q/v dense
    assert same_zeros(model, masks)
    assert report["trainable_params"] == 2 * (8 * (64 + 64) + 8 * (64 + 32))  # 2 blocks, r 8: q 64x64, v 32x64
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_lora_rejects_targets_the_model_lacks():
    lora = get_method("lora")
    reason = lora.check_model(make_tiny_model("gpt2"), lora.configure({}))
    assert reason and "q_proj" in reason


# --- S²FT ----------------------------------------------------------------------------------------------------


def test_s2ft_trains_only_the_chosen_submatrices():
    dense, model = pruned_pair()
    before = weights(model)
    masks = model_masks(model)
    report = get_method("s2ft").run(context(model, dense, budget=8 * 2 * 32, lr=5e-3, heads=0.25, channels=0.1))
    assert sum(len(b["heads"]) for b in report["selection"]) == 2  # int(4 heads x 2 blocks x 0.25), over the model
    assert sum(len(b["channels"]) for b in report["selection"]) == 25  # int(128 channels x 2 blocks x 0.1)
    assert report["fit"]["final_loss"] < report["fit"]["initial_loss"]
    assert same_zeros(model, masks)
    after = model.state_dict()
    chosen = 0
    head_dim = 16
    for block in report["selection"]:
        i = block["block"]
        cols_o = [h * head_dim + d for h in block["heads"] for d in range(head_dim)]
        for name, cols in ((f"model.layers.{i}.self_attn.o_proj.weight", cols_o),
                           (f"model.layers.{i}.mlp.down_proj.weight", block["channels"])):  # fmt: skip
            other = [c for c in range(before[name].shape[1]) if c not in cols]
            assert torch.equal(after[name][:, other], before[name][:, other]), name  # bit-identical
            if cols:  # over the whole model, a block may have none chosen
                assert not torch.equal(after[name][:, cols], before[name][:, cols]), name  # trained
            chosen += len(cols)
    touched = {f"model.layers.{b['block']}.{p}.weight" for b in report["selection"]
               for p in ("self_attn.o_proj", "mlp.down_proj")}  # fmt: skip
    for name, value in before.items():
        if name not in touched:
            assert torch.equal(after[name], value), name  # everything not chosen: bit-identical
    assert 0 < report["trainable_params"] <= report["adapter_params"]


def test_s2ft_fuse_unfuse_is_exact_and_matches_the_unfused_forward():
    dense, model = pruned_pair()
    before = weights(model)
    masks = model_masks(model)
    config = S2FTConfig(heads=0.5, channels=0.25, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    s2 = attach(model, config, seed=3, teacher=dense)
    with torch.no_grad():
        for p in s2.parameters():
            p.normal_()
        unfused = model(input_ids=IDS[:2]).logits
        s2.fuse()
        fused = model(input_ids=IDS[:2]).logits
    assert torch.allclose(unfused, fused, atol=1e-4)
    assert same_zeros(model, masks)  # pruned entries of the chosen submatrices stayed exactly zero
    s2.unfuse()
    s2.remove()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # unfuse restores the exact bits


def test_s2ft_needs_llama_like_blocks():
    s2ft = get_method("s2ft")
    reason = s2ft.check_model(make_tiny_model("gpt2"), s2ft.configure({}))
    assert reason and "llama-like" in reason
    with pytest.raises(UsageError, match="llama-like"):
        attach(make_tiny_model("opt"), S2FTConfig(), seed=0)
