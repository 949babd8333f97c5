"""Export: HF checkpoint with exact zeros, model card, packed masks, compressed storage, 2:4 checks, inference bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from sparsefit.atomic import write_atomically
from sparsefit.errors import FileError, UsageError
from sparsefit.export import (
    export_compressed,
    export_hf,
    is_semi_structured,
    load_compressed,
    load_masks,
    model_card,
    read_run,
    save_compressed,
    save_masks,
    to_semi_structured,
)
from sparsefit.export.compressed import WEIGHTS_FILE
from sparsefit.export.masks import pack_bits
from sparsefit.models import get_adapter, prunable_layers, weight_matrix
from sparsefit.walk.masks import model_masks

REPO = Path(__file__).resolve().parents[1]
CPU_MESSAGE = "2:4 semi-structured kernels need a CUDA GPU with compute capability >= 8.0; found: cpu"


def _layers(model):
    adapter = get_adapter(model)
    for index, block in enumerate(adapter.get_blocks(model)):
        for name, module in prunable_layers(block).items():
            yield f"{adapter.blocks}.{index}.{name}", module


def prune_rows(model, sparsity: float = 0.5) -> None:
    """Zero the smallest-magnitude ``sparsity`` share of every row of every prunable block weight."""
    with torch.no_grad():
        for _, module in _layers(model):
            w = weight_matrix(module)
            k = int(w.shape[1] * sparsity)
            drop = w.abs().argsort(dim=1)[:, :k]
            w.scatter_(1, drop, 0.0)


def prune_2_4(model) -> None:
    with torch.no_grad():
        for _, module in _layers(model):
            w = weight_matrix(module)
            groups = w.reshape(w.shape[0], -1, 4)
            drop = groups.abs().argsort(dim=-1)[..., :2]
            groups.scatter_(-1, drop, 0.0)  # a view of w: writes through to the module


def sparsity_json(model, pattern: str = "unstructured") -> dict:
    layers, zeros_all, total_all = {}, 0, 0
    for name, module in _layers(model):
        w = weight_matrix(module)
        zeros, total = int((w == 0).sum()), w.numel()
        layers[name] = {"shape": list(w.shape), "zeros": zeros, "total": total, "sparsity": zeros / total}
        zeros_all, total_all = zeros_all + zeros, total_all + total
    return {"pattern": pattern, "overall": zeros_all / total_all, "layers": layers}


RUN_JSON = {
    "command": "prune",
    "source_model": "tiny-llama",
    "config": {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured", "calib": "wiki", "nsamples": 8,
               "seqlen": 64, "seed": 0},
    "versions": {"sparsefit": "0.1.0"},
    "timings": {"prune_s": 1.5},
    "results": {"ppl": {"wiki": {"value": 13.9, "seqlen": 1024, "tokens": 16384}}},
}


def make_run_folder(path: Path, tokenizer, arch: str = "llama"):
    model = make_tiny_model(arch)
    prune_rows(model, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "run.json").write_text(json.dumps(RUN_JSON))
    (path / "sparsity.json").write_text(json.dumps(sparsity_json(model)))
    return model


@pytest.fixture
def run_folder(tmp_path, byte_tokenizer):
    path = tmp_path / "run"
    model = make_run_folder(path, byte_tokenizer)
    return path, model


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


# ---------------------------------------------------------------------------------------------- hf export


def test_export_hf_reloads_with_plain_transformers_identically(run_folder, tmp_path):
    run_dir, source = run_folder
    out = export_hf(run_dir, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # no custom code needed to load it
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert torch.equal(_logits(reloaded), _logits(source))
    for (name, a), (_, b) in zip(_layers(source), _layers(reloaded), strict=True):
        wa, wb = weight_matrix(a), weight_matrix(b)
        assert torch.equal(wa, wb), name
        assert torch.equal(wa == 0, wb == 0), name
        assert (wb == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_model_card_reports_method_sparsity_ppl_and_blocks(run_folder, tmp_path):
    run_dir, _ = run_folder
    out = export_hf(run_dir, tmp_path / "hf")
    card = (out / "README.md").read_text()
    assert "wanda" in card and "50%" in card and "unstructured" in card
    assert "13.9" in card and "1024" in card  # perplexity with its sequence length
    assert "Zero-shot: not measured" in card
    assert "| 0 |" in card and "| 1 |" in card and "q_proj" in card  # per-block table
    with_tasks = dict(RUN_JSON, results={"tasks": {"arc_easy": {"acc": 0.49, "acc_norm": 0.44, "n": 100}}})
    card = model_card(with_tasks, json.loads((run_dir / "sparsity.json").read_text()))
    assert "| arc_easy | 0.49 | 0.44 | 100 |" in card
    assert "Perplexity: not measured" in card
    bare = model_card({}, {})
    assert "not measured" in bare and "Per-layer sparsity: not measured" in bare


def test_masks_round_trip(run_folder, tmp_path):
    run_dir, source = run_folder
    out = export_hf(run_dir, tmp_path / "hf", masks=True)
    loaded = load_masks(out / "masks.safetensors")
    expected = model_masks(source)
    assert loaded.keys() == expected.keys() and len(loaded) == 14
    for name, mask in expected.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask), name
    # Odd widths and the documented bit order: little, first column = least significant bit.
    odd = {"a": torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5,
           "b": torch.tensor([[True] + [False] * 7])}
    path = save_masks(odd, tmp_path / "odd.safetensors")
    back = load_masks(path)
    assert torch.equal(back["a"], odd["a"]) and torch.equal(back["b"], odd["b"])
    assert pack_bits(odd["b"]).tolist() == [[1]]


def test_masks_missing_or_corrupted_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_masks(tmp_path / "nope.safetensors")
    good = save_masks({"x": torch.ones(4, 16, dtype=torch.bool)}, tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-3])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(4, 2, dtype=torch.uint8)}, str(foreign))
    # A damaged file is a FileError (exit 1); a file that is not sparsefit's masks, bad input (exit 2).
    for path, words, kind in ((truncated, "not a valid", FileError), (garbage, "not a valid", FileError),
                              (foreign, "sparsefit masks", UsageError)):  # fmt: skip
        with pytest.raises(kind, match=words) as info:
            load_masks(path)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- bad input


def test_not_a_run_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"is not a sparsefit run folder \(no run.json\)"):
        export_hf(empty, tmp_path / "out")
    with pytest.raises(UsageError, match="not a sparsefit run folder"):
        export_compressed(empty, tmp_path / "out")
    with pytest.raises(UsageError, match="does not exist"):
        read_run(tmp_path / "missing")
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_without_overwrite(run_folder, tmp_path):
    run_dir, _ = run_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for export in (export_hf, export_compressed):
        with pytest.raises(UsageError, match="--overwrite") as info:
            export(run_dir, out)
        assert str(out) in str(info.value)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temp folders left behind
    export_hf(run_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(UsageError, match="run folder itself"):
        export_hf(run_dir, run_dir, overwrite=True)


def test_write_atomically_leaves_nothing_on_failure(tmp_path):
    def writer(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "target", writer)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- compressed


def _assert_bit_exact(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
        if sa[name].is_floating_point():  # bits, not only values: -0.0 must survive
            assert torch.equal(sa[name].view(torch.int32), sb[name].view(torch.int32)), name


def test_compressed_round_trip_is_bit_exact_and_smaller(run_folder, tmp_path):
    run_dir, source = run_folder
    out = export_compressed(run_dir, tmp_path / "compressed")
    model, tokenizer = load_compressed(out)
    assert tokenizer is not None and tokenizer("ab")["input_ids"]
    _assert_bit_exact(source, model)
    model.set_attn_implementation("eager")
    assert torch.equal(_logits(model), _logits(source))
    ratio = (out / WEIGHTS_FILE).stat().st_size / (run_dir / "model.safetensors").stat().st_size
    # Block weights: 1 bit mask + half the float32 values ~ 0.53; embeddings stay dense.
    assert ratio < 0.8, ratio
    assert "not measured" in (out / "README.md").read_text()


def test_gpt2_conv1d_compressed_round_trip_keeps_negative_zero(tmp_path):
    model = make_tiny_model("gpt2")
    prune_rows(model, 0.5)
    first = next(m for _, m in _layers(model))
    with torch.no_grad():
        first.weight.view(-1)[0] = -0.0  # a zero with its sign bit set
    out = save_compressed(model, tmp_path / "gpt2")
    loaded, tokenizer = load_compressed(out)
    assert tokenizer is None
    _assert_bit_exact(model, loaded)
    loaded.set_attn_implementation("eager")
    assert torch.equal(_logits(loaded), _logits(model))
    assert (out / WEIGHTS_FILE).stat().st_size < 0.8 * sum(t.numel() * 4 for t in model.state_dict().values())


def test_load_compressed_rejects_other_folders(run_folder, tmp_path):
    run_dir, _ = run_folder
    with pytest.raises(UsageError, match="not a sparsefit compressed checkpoint"):
        load_compressed(run_dir)


# ---------------------------------------------------------------------------------------------- 2:4


def test_is_semi_structured():
    two_four = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0], [0.0, 5.0, 6.0, 0.0, 7.0, 8.0, 0.0, 0.0]])
    assert is_semi_structured(two_four)
    three_of_four = two_four.clone()
    three_of_four[1, 3] = 1.0
    assert not is_semi_structured(three_of_four)
    assert not is_semi_structured(torch.ones(2, 6))  # input dim not a multiple of 4
    assert not is_semi_structured(torch.ones(8))


def test_to_semi_structured_on_cpu_is_a_clear_error():
    model = make_tiny_model("llama")
    prune_2_4(model)
    with pytest.raises(UsageError) as info:
        to_semi_structured(model)
    assert str(info.value) == CPU_MESSAGE


def test_to_semi_structured_names_first_layer_that_is_not_2_4():
    model = make_tiny_model("llama")
    prune_2_4(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(1.0)
    with pytest.raises(UsageError, match=r"'model\.layers\.1\.mlp\.up_proj' is not 2:4"):
        to_semi_structured(model)


def _semi_structured_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not _semi_structured_gpu(), reason="needs a CUDA GPU with compute capability >= 8.0")
def test_to_semi_structured_matches_dense_on_gpu():
    model = make_tiny_model("llama", hidden=128)
    prune_2_4(model)
    dense = model.to("cuda", torch.float16)
    ids = _ids().to("cuda")
    with torch.no_grad():
        expected = dense(input_ids=ids).logits.float()
    import copy

    sparse = to_semi_structured(copy.deepcopy(dense))
    with torch.no_grad():
        got = sparse(input_ids=ids).logits.float()
    assert torch.allclose(got, expected, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------- bench


def test_inference_bench_cpu_writes_honest_table(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_inference", REPO / "bench" / "inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    result = bench.run_inference_bench(
        None, batches=(1, 2), prompt_len=4, device="cpu", shapes=((8, 16),), min_time_s=0.001, out_dir=tmp_path
    )
    variants = {r["variant"] for r in result["layers"]}
    assert variants == {"dense", "dense_zeros", "csr"}  # no 2:4 kernel on the CPU
    assert {r["phase"] for r in result["layers"]} == {"decode", "prefill"}
    assert all(r["max_abs_diff_vs_dense_zeros"] < 1e-4 for r in result["layers"] if r["variant"] != "dense")
    assert result["model"]["skipped"] == CPU_MESSAGE
    saved = json.loads((tmp_path / "inference.json").read_text())
    assert saved["layers"] == result["layers"]
    md = (tmp_path / "inference.md").read_text()
    assert "csr ms" in md and "Skipped: 2:4 semi-structured kernels need a CUDA GPU" in md
