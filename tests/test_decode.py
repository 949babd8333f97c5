"""The sparse CPU kernel and sparse decoding (issue 24): equal to the dense matmul, same greedy tokens, auto
never slower by its table, a compressed export loads straight into the sparse layers, and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model
from sparsefit.errors import UsageError
from sparsefit.infer import kernel as compiled
from sparsefit.infer.choose import choose_sparse, group_key
from sparsefit.infer.generate import greedy, same_tokens
from sparsefit.infer.load import decoder_linears, load, pruned_layers, sparsify, weight_bytes
from sparsefit.infer.sparse_linear import SparseLinear
from sparsefit.models.adapters import weight_matrix
from sparsefit.walk.masks import model_layers

pytestmark = pytest.mark.skipif(compiled.problem() is not None, reason=f"no sparse kernel: {compiled.problem()}")


def pruned_weight(out: int, inp: int, sparsity: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    return weight.masked_fill(torch.rand(out, inp, generator=generator) < sparsity, 0.0)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# An input width that is not a multiple of 8 takes the scalar path, a multiple of 8 but not 16 AVX2 (also on an
# AVX-512 CPU), the others the best vector path.
SHAPES = [(7, 13), (64, 576), (33, 64), (130, 1536), (192, 576), (5, 8), (9, 24)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.95, 1.0])
def test_float32_layer_equals_the_dense_matmul(threads, batch, sparsity):
    for index, (out, inp) in enumerate(SHAPES):
        weight, bias = pruned_weight(out, inp, sparsity, index), torch.randn(out)
        x = torch.randn(batch, inp)
        want = torch.nn.functional.linear(x.double(), weight.double(), bias.double()).float()
        layer = SparseLinear.from_weight(weight, bias)
        for isa in (None, 2, 0):  # the best verified path (AVX-512 where the CPU has it), AVX2, the scalar one
            got = compiled.sparse_linear(x, layer.bitmask, layer.values, layer.row_start, None, layer.bias, out,
                                         threads=threads, isa=isa)  # fmt: skip
            assert relative_error(got, want) < 1e-5, (out, inp, isa)
        for isa in (None, 2, 0):  # unpacked for prefill: bit-exact on every path
            assert torch.equal(compiled.unpack(layer.bitmask, layer.values, layer.row_start, None, (out, inp),
                                               threads=threads, isa=isa), weight)  # fmt: skip


@pytest.mark.parametrize("values", ["bf16", "int8"])
def test_bf16_and_int8_values_within_their_rounding(values):
    for index, (out, inp) in enumerate(SHAPES):
        weight = pruned_weight(out, inp, 0.7, index)
        x = torch.randn(4, inp)
        layer = SparseLinear.from_weight(weight, None, values)
        stored = layer.dense_weight()  # the weight as the layer holds it, dequantized
        assert torch.equal(stored != 0, (weight != 0) & (stored != 0))  # no pruned weight comes back
        # The kernel computes exactly with the values it stores: equal to float32 with those values...
        assert relative_error(layer(x), x @ stored.T) < 1e-5
        # ...and those are the weights rounded: bf16 to 8 bits of mantissa, int8 to half a step of its row's scale.
        if values == "bf16":
            assert torch.equal(stored, weight.to(torch.bfloat16).float())
        else:
            step = weight.abs().amax(dim=1, keepdim=True) / 127
            assert bool(((stored - weight).abs() <= step / 2 + 1e-7).all())


def test_prefill_goes_dense_and_matches():
    weight = pruned_weight(48, 64, 0.7, 3)
    layer = SparseLinear.from_weight(weight)
    x = torch.randn(2, 40, 64)  # 80 tokens: the unpacked matmul
    assert relative_error(layer(x), x @ weight.T) < 1e-6


def sparse_tiny(arch: str, sparsity: float = 0.7, seed: int = 0):
    model = make_tiny_model(arch, seed=seed)
    with torch.no_grad():
        for index, layer in enumerate(model_layers(model).values()):
            weight = weight_matrix(layer)
            weight.masked_fill_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(index)) < sparsity, 0)
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen3"])
def test_sparse_kernels_give_the_dense_greedy_tokens(arch, one_thread):
    dense = sparse_tiny(arch)
    model = sparse_tiny(arch)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    want = greedy(dense, ids, 12)
    chosen = sparsify(model, "sparse")
    assert set(chosen.values()) == {"sparse"} and len(chosen) == len(model_layers(dense))
    assert all(isinstance(layer, SparseLinear) for layer in decoder_linears(model).values())
    got = greedy(model, ids, 12)
    assert same_tokens(got.tokens, want.tokens) == want.tokens.numel()
    with torch.no_grad():  # one decode step on the kernel: logits as the dense model's
        a = dense(input_ids=ids[:, :1]).logits
        b = model(input_ids=ids[:, :1]).logits
    assert relative_error(b, a) < 1e-5
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False),
                       dense.generate(ids, max_new_tokens=4, do_sample=False))  # fmt: skip
    assert weight_bytes(model) < 0.75 * weight_bytes(dense)
    assert weight_bytes(model, as_dense=True) == weight_bytes(dense)


def test_auto_never_picks_the_slower_path_in_its_table(monkeypatch):
    model = sparse_tiny("llama")
    layers = pruned_layers(model)
    keys = {}
    for name, layer in layers.items():
        weight = weight_matrix(layer)
        keys[name] = group_key(*weight.shape, float((weight != 0).float().mean()), "float32", 1)
    # A table where q/k/v/o are slower sparse, the MLP faster, and one group exactly even (kept dense).
    table = {key: (1.3 if "self_attn" in name else 0.6) for name, key in keys.items()}
    table[keys["model.layers.0.mlp.up_proj"]] = 1.0

    def no_timing(*args):
        raise AssertionError("every group is in the table")

    use = choose_sparse(layers, "float32", 1, table=table, timer=no_timing)
    for name, sparse in use.items():
        assert sparse == (table[keys[name]] < 1.0), name
    chosen = sparsify_with(monkeypatch, model, table)
    assert {n for n, v in chosen.items() if v == "sparse"} == {n for n, v in use.items() if v}
    assert all(isinstance(m, SparseLinear) == use[n] for n, m in decoder_linears(model).items())


def sparsify_with(monkeypatch, model, table):
    import sparsefit.infer.load as infer_load

    monkeypatch.setattr(infer_load, "choose_sparse", lambda layers, values, threads: choose_sparse(
        layers, values, threads, table=table, timer=lambda *a: 2.0))  # fmt: skip
    return sparsify(model, "auto", threads=1)


def test_auto_measures_once_and_caches(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path))
    model = sparse_tiny("llama")
    calls = []

    def timer(layers, values, threads):
        calls.append(len(layers))
        return 0.5

    first = choose_sparse(pruned_layers(model), "float32", 1, timer=timer)
    assert all(first.values()) and calls
    measured = len(calls)
    again = choose_sparse(pruned_layers(model), "float32", 1, timer=timer)
    assert again == first and len(calls) == measured
    assert len(json.loads((tmp_path / "kernels" / "choices.json").read_text())) == measured


def test_compressed_export_loads_straight_into_sparse_layers(tmp_path, byte_tokenizer, one_thread):
    from sparsefit.export.compressed import save_compressed

    model = sparse_tiny("llama")
    model.save_pretrained(tmp_path / "hf")
    byte_tokenizer.save_pretrained(tmp_path / "hf")
    save_compressed(model, tmp_path / "compressed", byte_tokenizer)
    from_hf = load(tmp_path / "hf", kernels="sparse")
    from_compressed = load(tmp_path / "compressed", kernels="sparse")
    for name, layer in decoder_linears(from_compressed).items():
        other = decoder_linears(from_hf)[name]
        assert isinstance(layer, SparseLinear) and isinstance(other, SparseLinear)
        for buffer in ("bitmask", "values", "row_start"):
            assert torch.equal(getattr(layer, buffer), getattr(other, buffer)), (name, buffer)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(from_hf(input_ids=ids).logits, from_compressed(input_ids=ids).logits)
    assert torch.equal(greedy(from_hf, ids, 8).tokens, greedy(from_compressed, ids, 8).tokens)
    assert from_compressed.get_output_embeddings().weight is from_compressed.get_input_embeddings().weight


def test_the_compressed_path_holds_no_dense_copy(tmp_path, byte_tokenizer, monkeypatch):
    from sparsefit.export.compressed import save_compressed

    save_compressed(sparse_tiny("llama"), tmp_path / "compressed", byte_tokenizer)
    monkeypatch.setattr(SparseLinear, "from_weight", classmethod(lambda *a, **k: pytest.fail("a dense weight")))
    monkeypatch.setattr(SparseLinear, "dense_weight", lambda self: pytest.fail("a dense copy"))
    model = load(tmp_path / "compressed", kernels="sparse")
    assert all(isinstance(layer, SparseLinear) for layer in decoder_linears(model).values())


def test_sparse_kernels_refuse_a_model_with_no_pruned_layer():
    with pytest.raises(UsageError, match="no pruned layer"):
        sparsify(make_tiny_model("llama"), "sparse")
    assert set(sparsify(make_tiny_model("llama"), "auto").values()) == set()


def run_cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "sparsefit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)  # fmt: skip


@pytest.fixture
def sparse_checkpoint(tmp_path, byte_tokenizer):
    path = tmp_path / "sparse"
    sparse_tiny("llama").save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


def test_generate_compare_dense_json(sparse_checkpoint):
    done = run_cli("generate", str(sparse_checkpoint), "--prompt", "hello", "--max-new-tokens", "6", "--kernels",
                   "sparse", "--threads", "1", "--compare-dense", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["same_tokens"] == 6 and result["speedup"] > 0
    assert 0 < result["weights_mib"]["sparse"] < result["weights_mib"]["dense"]
    assert result["layers"] == {"sparse": 14, "dense": 0} and result["text"].startswith("hello")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-new-tokens", "0"], None, "--max-new-tokens 0"),
        (["--max-new-tokens", "600"], None, "exceed the model's 512 positions"),
        (["--kernels", "fast"], None, "kernels 'fast'"),
        (["--values", "fp8"], None, "sparse values 'fp8'"),
        (["--kernels", "2:4"], None, "2:4 semi-structured kernels need a CUDA GPU"),
        (["--kernels", "sparse"], {"SPARSEFIT_NO_KERNEL": "1"}, "--kernels sparse cannot run here"),
        (["--threads", "0"], None, "--threads 0"),
    ],
)
def test_generate_bad_input_is_one_line(sparse_checkpoint, args, env, message):
    done = run_cli("generate", str(sparse_checkpoint), "--prompt", "hi", *args, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_generate_sparse_on_a_dense_model_is_one_line(tiny_checkpoint):
    done = run_cli("generate", str(tiny_checkpoint), "--prompt", "hi", "--kernels", "sparse")
    assert done.returncode == 2 and "no pruned layer" in done.stderr, done.stderr
    # auto on the same (structured or dense) model: every layer dense, it generates.
    done = run_cli("generate", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "3", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["layers"] == {"sparse": 0, "dense": 0}, done.stderr


def test_without_the_kernel_auto_stays_dense_with_one_warning(sparse_checkpoint):
    done = run_cli("generate", str(sparse_checkpoint), "--prompt", "hi", "--max-new-tokens", "3", "--json",
                   env={"SPARSEFIT_NO_KERNEL": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().startswith("warning: dense kernels") and len(done.stderr.strip().splitlines()) == 1
    assert json.loads(done.stdout)["layers"] == {"sparse": 0, "dense": 14}


def test_decode_bench_tiny_writes_its_table(tmp_path):
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "decode.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--threads", "1", "--out-dir", str(tmp_path),
                           "--name", "tiny"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "tiny.json").read_text())["rows"]
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert set(rows) >= {"tiny:0.7:sparse", "tiny:0.7:csr", "tiny:2-4:sparse-int8", "tiny:dense:auto"}
    for name, row in rows.items():
        exact = name.endswith((":dense", ":sparse", ":csr", ":auto"))
        assert row["max_logit_diff"] < (1e-5 if exact else 2e-2), name
    assert rows["tiny:0.7:sparse"]["weights_mib"] < 0.5 * rows["tiny:0.7:dense"]["weights_mib"]
    assert rows["tiny:0.7:sparse"]["same_tokens_as_dense"] == len(rows["tiny:0.7:dense"]["tokens"])
    assert "| tiny | 0.7 | sparse |" in (tmp_path / "tiny.md").read_text()


def test_gpu_bench_runs_tiny_on_any_device(tmp_path):
    """bench/gpu.py is for one H100; its tiny run checks every part's code on the CPU (part 1 says why it skips)."""
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "gpu.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--out-dir", str(tmp_path), "--name", "tiny",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "tiny.json").read_text())
    decode = results["decode 2:4"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        assert decode["status"] == "ok" and decode["max_logit_diff"] < 0.1
    else:
        assert decode["status"] == "skipped" and "compute capability" in decode["reason"]
    for part in ("7B blocks, Wanda + EBFT streamed", "70B block, Wanda + EBFT streamed"):
        assert results[part]["status"] == "ok" and results[part]["s_per_block"] > 0, results[part]
