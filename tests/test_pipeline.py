import pytest
import torch

from conftest import ARCHS, make_tiny_model
from sparsefit.models import get_adapter
from sparsefit.walk import capture_inputs, walk_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_walk_without_steps_reproduces_the_model(arch):
    model = make_tiny_model(arch)
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    inputs, block_kwargs = capture_inputs(model, adapter, ids, batch_size=2)
    assert inputs.shape == (5, 24, 64)
    # Batch 3 on kwargs recorded at batch 1: masks and rotary tables must broadcast.
    hidden = walk_blocks(model, adapter, inputs, block_kwargs, [], batch_size=3)
    with torch.no_grad():
        expected = model.base_model(input_ids=ids).last_hidden_state
        got = adapter.get_final_norm(model)(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_capture_leaves_block_forward_intact(tiny_llama):
    adapter = get_adapter(tiny_llama)
    ids = torch.randint(0, 256, (2, 8))
    capture_inputs(tiny_llama, adapter, ids)
    assert "forward" not in vars(adapter.get_blocks(tiny_llama)[0])
    with torch.no_grad():
        assert torch.isfinite(tiny_llama(input_ids=ids).logits).all()


def test_capture_drops_the_kv_cache(tiny_llama):
    _, block_kwargs = capture_inputs(tiny_llama, get_adapter(tiny_llama), torch.randint(0, 256, (2, 8)))
    for kwargs in block_kwargs:
        assert "past_key_values" not in kwargs and "use_cache" not in kwargs
        assert "position_embeddings" in kwargs
