"""Every recovery method through the one driver and the one loop on a CUDA GPU (skipped without one)."""

import copy

import pytest
import torch

from conftest import make_tiny_model
from sparsefit.prune import PruneConfig, parse_pattern, prune_model
from sparsefit.recover import METHODS, RecoveryContext, get_method
from sparsefit.walk.masks import model_masks, same_zeros

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))
# On a GPU the default preset is `paper`, whose batches (32, 128, 64 windows) exceed the 8 windows here.
OPTIONS = {"ebft": {"epochs": 2, "batch_size": 2}, "dsnot": {"layers": "all"},
           "squarehead": {"epochs": 1, "batch_size": 2}, "lora": {"epochs": 1, "batch_size": 2},
           "s2ft": {"epochs": 1, "batch_size": 2, "heads": 0.25, "channels": 0.1}}  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("method", list(METHODS))
def test_recover_on_cuda_keeps_masks_and_returns_the_model_to_the_cpu(arch, method):
    dense = make_tiny_model(arch)
    sparse = copy.deepcopy(dense)
    prune_model(sparse, IDS, PruneConfig(sparsity=0.6, device="cuda", nsamples=8, seqlen=32))
    masks = model_masks(sparse)
    ctx = RecoveryContext(model=sparse, teacher=dense, tokenizer=None, calib_ids=IDS,
                          pattern=parse_pattern("unstructured"), device=torch.device("cuda"), batch_size=4,
                          options=OPTIONS[method])  # fmt: skip
    if method == "s2ft" and arch == "gemma3":
        pytest.skip("s2ft needs llama-like blocks")
    report = get_method(method).run(ctx)
    assert all(p.device.type == "cpu" for p in sparse.parameters())
    assert all(p.device.type == "cpu" for p in dense.parameters())
    if method == "dsnot":
        assert report["abs_error_after"] < report["abs_error_before"]
    else:
        assert same_zeros(sparse, masks)
    if method == "ebft":
        assert all(b["final_loss"] < b["initial_loss"] for b in report["blocks"])
    if "fit" in report:
        assert report["fit"]["final_loss"] < report["fit"]["initial_loss"]


def test_wanda_masks_on_cuda_match_the_cpu():
    masks = {}
    for device in ("cpu", "cuda"):
        model = make_tiny_model("llama")
        prune_model(model, IDS, PruneConfig(sparsity=0.5, device=device, nsamples=8, seqlen=32))
        masks[device] = model_masks(model)
    # The same statistics in float32 on either device: only near-ties may fall the other way.
    cpu, gpu = masks["cpu"], masks["cuda"]
    differing = sum(int((cpu[k] != gpu[k]).sum()) for k in cpu) / sum(v.numel() for v in cpu.values())
    assert differing < 1e-3
