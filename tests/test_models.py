import pytest
import torch

from conftest import ARCHS, make_tiny_model
from sparsefit.errors import FileError, UsageError
from sparsefit.models import get_adapter, load, prunable_layers, weight_matrix


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_blocks_embeddings_and_norm(arch):
    model = make_tiny_model(arch)
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    assert len(blocks) == 2
    assert all(isinstance(e, torch.nn.Module) for e in adapter.get_embeddings(model))
    assert adapter.get_final_norm(model) is not None
    layers = prunable_layers(blocks[0])
    assert len(layers) >= 4
    for module in layers.values():
        matrix = weight_matrix(module)
        # (out, in) view sharing storage: writing through it changes the module.
        assert matrix.data_ptr() == module.weight.data_ptr()
        x = torch.randn(3, matrix.shape[1])
        assert module(x).shape[-1] == matrix.shape[0]


def test_unknown_architecture_is_a_usage_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UsageError, match="not supported"):
        get_adapter(model)


def test_load_local_folder(tiny_checkpoint):
    loaded = load(str(tiny_checkpoint))
    assert loaded.model.config.model_type == "llama"
    assert loaded.tokenizer("ab").input_ids


def test_load_rejects_truncated_safetensors(tiny_checkpoint):
    shard = tiny_checkpoint / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileError, match="not a valid safetensors"):  # a damaged file: exit 1
        load(str(tiny_checkpoint))


def test_load_rejects_unknown_names(tmp_path):
    with pytest.raises(UsageError, match="not a built-in"):
        load("no-such-model")
    with pytest.raises(UsageError, match="does not exist"):
        load(str(tmp_path / "x.gguf"))


def test_load_rejects_bad_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(UsageError, match="not a readable GGUF"):
        load(str(bad))
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())
