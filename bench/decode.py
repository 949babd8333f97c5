"""Decoding speed of sparse models on a CPU (issue 24): the sparse kernel against dense PyTorch, one process per model.

Models: SmolLM2-135M dense, Wanda (wiki 16 x 256) at 50 / 70 / 80 % unstructured, 2:4 and structured 26 %; a
1.1B-shaped random Llama (TinyLlama's shape: hidden 2048, 22 layers, MLP 5632, 4 KV heads, vocabulary 32,000)
dense and pruned by magnitude at 50 / 70 / 80 %. For each model and path:

- decode tokens/s at batch 1 and batch 8 (greedy with the KV cache, the prompt's prefill not counted), prefill
  tokens/s (one forward of ``--prompt-len`` tokens);
- weight memory (tied tensors once; a sparse layer's bitmask, values and row starts);
- the largest logit difference from the same model in dense float32, relative to its largest logit, on one
  decode step (8 single-token rows: the kernel's path);
- bytes of weights read per decoded token and the bandwidth that implies (bytes / step time): where a goal is
  missed, whether the kernel is bound by memory or by its arithmetic.

Paths: ``dense`` (PyTorch float32, the reference), ``dense-bf16``, ``csr`` (``torch.sparse`` CSR SpMV, the best
library path measured; the kernels that used to do this, in vLLM, compressed-tensors and torchao, are gone; not on
the 1.1B model, where every path's copy is held at once and CSR's would not fit beside them) and
sparsefit's kernel with float32 (exact), bf16 and int8 (per-row scale) values, plus ``auto`` (the sparse layer only
where faster, as ``generate`` picks by default). SmolLM2 at 70 % also gets each value type's wiki perplexity
(4,096 test tokens at 512).

Usage (alone on idle cores): ``.venv/bin/python bench/decode.py --threads 2 [--models smollm2,llama1b]``; writes
``decode.json`` and ``decode.md`` into ``bench/results``. ``--tiny`` runs a 2-block random Llama (the CI test).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, run_isolated, write_results  # noqa: E402

VARIANTS = {
    "smollm2": ["dense", "0.5", "0.7", "0.8", "2-4", "structured-0.26"],
    "llama1b": ["dense", "0.5", "0.7", "0.8"],
    "tiny": ["dense", "0.7", "2-4"],
}
PATHS = ["dense", "dense-bf16", "csr", "sparse", "sparse-bf16", "sparse-int8", "auto"]
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                tie_word_embeddings=False)  # fmt: skip
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=260, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


class CSRLinear(nn.Module):
    """``torch.sparse``'s CSR matrix times the input: the library path a user has without sparsefit's kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight.detach().float().to_sparse_csr()
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = (self.weight @ x2.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def weight_bytes(self) -> int:
        w = self.weight
        return sum(t.numel() * t.element_size() for t in (w.crow_indices(), w.col_indices(), w.values()))


def random_llama(shape: dict, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    return model


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, group: int | None = None) -> None:
    """Zero the smallest weights of each output row (as Wanda compares), or of each group of ``group`` inputs."""
    from sparsefit.models.adapters import weight_matrix
    from sparsefit.walk.masks import model_layers

    for layer in model_layers(model).values():
        weight = weight_matrix(layer)
        rows = weight.reshape(-1, group) if group else weight
        order = rows.abs().argsort(dim=1)[:, : int(rows.shape[1] * sparsity)]
        rows.scatter_(1, order, 0.0)


def make_variant(model_key: str, variant: str, tokenizer):
    """``(model in float32, eval mode)`` for one row's variant."""
    from sparsefit.app.jobs import prune_interleaved
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load
    from sparsefit.prune import PruneConfig

    if model_key == "smollm2":
        model = load("smollm2-135m").model
    else:
        model = random_llama(LLAMA_1B if model_key == "llama1b" else TINY)
    if variant == "dense":
        return model
    if model_key != "smollm2":
        magnitude_prune(model, 0.5 if variant == "2-4" else float(variant), group=4 if variant == "2-4" else None)
        return model
    if variant.startswith("structured-"):
        config = PruneConfig(method="wanda", sparsity=float(variant.split("-")[1]), pattern="structured",
                             nsamples=16, seqlen=256, device="cpu")  # fmt: skip
    elif variant == "2-4":
        config = PruneConfig(method="wanda", sparsity=0.5, pattern="2:4", nsamples=16, seqlen=256, device="cpu")
    else:
        config = PruneConfig(method="wanda", sparsity=float(variant), nsamples=16, seqlen=256, device="cpu")
    calib = calibration_windows(tokenizer, get_corpus("wiki"), 16, 256, 0)
    prune_interleaved(model, calib, config)
    return model


def on_path(model: nn.Module, path: str, threads: int) -> nn.Module:
    """A copy of ``model`` with its pruned layers on ``path``."""
    from sparsefit.infer.load import _set_module, pruned_layers, sparsify
    from sparsefit.models.adapters import weight_matrix

    if path == "dense":
        return model
    if path == "dense-bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    copied = copy.deepcopy(model)
    if path == "csr":
        for name, layer in pruned_layers(copied).items():
            _set_module(copied, name, CSRLinear(weight_matrix(layer), getattr(layer, "bias", None)))
        return copied
    kernels, values = ("auto", "float32") if path == "auto" else ("sparse", {"sparse": "float32"}.get(path, path[7:]))
    sparsify(copied, kernels, values, threads)
    return copied


def weights_read_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every weight but the input embedding (it reads one row)."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    return total_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def total_bytes(model: nn.Module) -> int:
    from sparsefit.infer.load import weight_bytes

    extra = sum(m.weight_bytes() for m in model.modules() if isinstance(m, CSRLinear))
    return weight_bytes(model) + extra


def inputs(args, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=generator)
    step = torch.randint(3, vocab, (8, 1), generator=generator)
    return prompt, prompt[:, :8], step


def measure_paths(models: dict[str, nn.Module], reference: nn.Module, args, vocab: int) -> dict[str, dict]:
    """Every path's decode and prefill speed, timed round by round (path after path, ``repeats`` rounds, the best
    of each path kept): a drift of the machine's speed during the run falls on every path alike."""
    from sparsefit.infer.generate import greedy

    prompt, short, step = inputs(args, vocab)
    one, eight, prefill = {}, {}, {}
    for model in models.values():
        greedy(model, short, 2)  # warm-up: first-call allocations, the kernel's tables
    for _ in range(args.repeats):
        for path, model in models.items():
            run = greedy(model, short, args.tokens)
            one[path] = min(one.get(path, run), run, key=lambda r: r.decode_s)
            run = greedy(model, short.expand(8, -1).contiguous(), args.tokens_batch8)
            eight[path] = min(eight.get(path, run), run, key=lambda r: r.decode_s)
            with torch.no_grad():
                began = time.perf_counter()
                model(input_ids=prompt)
                prefill[path] = min(prefill.get(path, float("inf")), time.perf_counter() - began)
    rows = {}
    with torch.no_grad():
        want = reference(input_ids=step).logits.float()
        for path, model in models.items():
            got = model(input_ids=step).logits.float()
            read = weights_read_per_token(model)
            rows[path] = {
                "status": "ok",
                "decode_tokens_per_s": one[path].decode_tokens_per_s,
                "decode8_tokens_per_s": eight[path].decode_tokens_per_s,
                "prefill_tokens_per_s": args.prompt_len / prefill[path],
                "weights_mib": total_bytes(model) / 2**20,
                "max_logit_diff": float((got - want).abs().max() / want.abs().max()),
                "read_mib_per_token": read / 2**20,
                "read_gb_per_s": read / (one[path].decode_s / (args.tokens - 1)) / 1e9,
                "tokens": one[path].tokens[0].tolist(),
            }
    return rows


def perplexity(model: nn.Module, tokenizer) -> float:
    from sparsefit.app.jobs import evaluate_model

    return evaluate_model(model, tokenizer, ppl=["wiki"], seqlen=512, max_tokens=4096)["ppl"]["wiki"]["value"]


def measure_model(args, model_key: str) -> dict:
    from sparsefit.infer import kernel as compiled
    from sparsefit.infer.generate import same_tokens
    from sparsefit.infer.load import pruned_layers

    torch.set_num_threads(args.threads)
    if model_key == "llama1b":  # 8x SmolLM2's weights per token: fewer steps give as steady a time
        fewer = {"tokens": max(8, args.tokens // 2), "tokens_batch8": max(4, args.tokens_batch8 // 2),
                 "repeats": min(args.repeats, 2)}  # fmt: skip
        args = argparse.Namespace(**{**vars(args), **fewer})
    tokenizer = None
    if model_key == "smollm2":
        from sparsefit.models import load

        tokenizer = load("smollm2-135m").tokenizer
    rows = {}
    for variant in args.variants or VARIANTS[model_key]:
        model = make_variant(model_key, variant, tokenizer)
        vocab = model.config.vocab_size
        pruned = bool(pruned_layers(model)) and not variant.startswith("structured")
        paths = PATHS if pruned else ["dense", "dense-bf16", "auto"]
        if model_key == "llama1b":  # every path's copy is held at once: CSR's 3.8 GB would not fit beside them
            paths = [p for p in paths if p != "csr"]
        models, failed = {}, {}
        for path in paths:
            try:
                models[path] = on_path(model, path, args.threads)
            except Exception as error:  # a path that fails is a row that says so, not a lost table
                failed[path] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        began = time.perf_counter()
        measured = {**measure_paths(models, model, args, vocab), **failed}
        dense_tokens = torch.tensor([measured["dense"]["tokens"]])
        for path in paths:
            row = measured[path]
            if row["status"] == "ok":
                row["same_tokens_as_dense"] = same_tokens(torch.tensor([row["tokens"]]), dense_tokens)
                if model_key == "smollm2" and variant == "0.7" and path in ("dense", "sparse", "sparse-bf16",
                                                                            "sparse-int8"):  # fmt: skip
                    row["wiki_ppl"] = perplexity(models[path], tokenizer)
            rows[f"{model_key}:{variant}:{path}"] = row
            print(f"{model_key}:{variant}:{path} {json.dumps({k: v for k, v in row.items() if k != 'tokens'})}",
                  file=sys.stderr, flush=True)  # fmt: skip
        rows[f"{model_key}:{variant}:dense"]["seconds_all_paths"] = time.perf_counter() - began
        del models
        gc.collect()
        del model
        gc.collect()
    lib = compiled.kernel()
    return {"status": "ok", "rows": rows, "isa": lib.isa_name if lib else None, "threaded": bool(lib and lib.threaded)}


@torch.no_grad()
def measure_layers(args) -> None:
    """Where a SmolLM2 decode step's time goes: all its block linears at batch 1 (dense vs the sparse layer at 70 %,
    magnitude per row), its output layer, and the whole dense step; written as ``decode_layers.{json,md}``."""
    from sparsefit.infer.generate import greedy
    from sparsefit.infer.sparse_linear import SparseLinear
    from sparsefit.models import load

    model = load("smollm2-135m").model
    magnitude_prune(model, 0.7)
    from sparsefit.models.adapters import weight_matrix
    from sparsefit.walk.masks import model_layers

    dense = [weight_matrix(layer).contiguous() for layer in model_layers(model).values()]
    sparse = [SparseLinear.from_weight(weight) for weight in dense]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in dense}
    head = model.get_output_embeddings().weight

    def best(run, repeats: int = 7) -> float:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
        return min(times)

    rows, data = [], {"threads": {}}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        dense_s = best(lambda: [nn.functional.linear(inputs[w.shape[1]], w) for w in dense])
        sparse_s = best(lambda: [layer(inputs[layer.in_features]) for layer in sparse])
        head_s = best(lambda: nn.functional.linear(torch.randn(1, head.shape[1]), head))
        ids = torch.randint(3, 1000, (1, 8))
        step_s = min(greedy(model, ids, 9).decode_s / 8 for _ in range(3))
        dense_bytes = sum(w.numel() * 4 for w in dense)
        sparse_bytes = sum(layer.weight_bytes() for layer in sparse)
        data["threads"][threads] = {"linears_dense_ms": dense_s * 1e3, "linears_sparse_ms": sparse_s * 1e3,
                                    "output_layer_ms": head_s * 1e3, "dense_step_ms": step_s * 1e3,
                                    "dense_gb_per_s": dense_bytes / dense_s / 1e9,
                                    "sparse_gb_per_s": sparse_bytes / sparse_s / 1e9}  # fmt: skip
        rest = step_s - dense_s - head_s
        rows.append([threads, f"{dense_s * 1e3:.1f} ({dense_bytes / dense_s / 1e9:.1f} GB/s)",
                     f"{sparse_s * 1e3:.1f} ({sparse_bytes / sparse_s / 1e9:.1f} GB/s, {dense_s / sparse_s:.2f}x)",
                     f"{head_s * 1e3:.1f}", f"{step_s * 1e3:.1f}", f"{rest * 1e3:.1f}",
                     f"{step_s / (step_s - dense_s + sparse_s):.2f}x"])  # fmt: skip
    notes = ("SmolLM2-135M, its 210 block linears pruned to 70 % by magnitude per row, one token (batch 1); best of "
             "7 passes over all the layers. The rest of a step: the dense decode step less its linears and output "
             "layer (attention, norms, the KV cache, transformers' own Python). Bound: the step's speed-up if only "
             "the linears' time changed.")  # fmt: skip
    header = ["threads", "block linears dense ms", "sparse 70 % ms", "output layer ms", "dense step ms",
              "rest of the step ms", "bound"]  # fmt: skip
    write_results("decode_layers", data, header, rows, notes)


def report(data: dict) -> None:
    rows = []
    for name, row in data["rows"].items():
        model_key, variant, path = name.split(":", 2)
        dense = data["rows"].get(f"{model_key}:{variant}:dense", {})
        if row.get("status") != "ok":
            rows.append([model_key, variant, path, row.get("error", "failed"), "", "", "", "", "", "", ""])
            continue
        speedup = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"] if dense.get("status") == "ok" else None
        base = data["rows"].get(f"{model_key}:dense:dense", {})
        memory = row["weights_mib"] / base["weights_mib"] if base.get("status") == "ok" else None
        rows.append([
            model_key, variant, path, f"{row['decode_tokens_per_s']:.1f}",
            f"{speedup:.2f}x" if speedup else "", f"{row['decode8_tokens_per_s']:.1f}",
            f"{row['prefill_tokens_per_s']:.0f}", f"{row['weights_mib']:.0f} ({memory:.2f}x)" if memory else "",
            f"{row['max_logit_diff']:.1e}", f"{row['read_mib_per_token']:.0f} / {row['read_gb_per_s']:.1f}",
            "" if row.get("wiki_ppl") is None else f"{row['wiki_ppl']:.2f}",
        ])  # fmt: skip
    setting = data["setting"]
    notes = (
        f"{setting['cpu']}, {setting['threads']} thread(s), torch {setting['torch']}, kernel {setting['isa']}. "
        "Paths are timed round by round (each path once per round, the best of the rounds kept). "
        "Decode: greedy tokens/s with the KV cache after an 8-token prompt (batch 1: "
        f"{setting['tokens']} tokens, batch 8: {setting['tokens_batch8']} tokens per row), best of "
        f"{setting['repeats']} (the 1.1B model: half the tokens, best of 2); prefill: one forward of "
        f"{setting['prompt_len']} tokens. speed-up: batch-1 decode "
        "against the same model's dense float32 path. Memory: weight MiB and its ratio to the dense model's. Logit "
        "diff: largest |difference| from dense float32 over the largest |logit|, one decode step of 8 rows. Read: "
        "MiB of weights one decode step reads / the GB/s that implies at the measured step time. SmolLM2 pruned "
        "with Wanda (wiki 16 x 256); the 1.1B Llama is random and pruned by magnitude per row. wiki ppl: 4,096 "
        "test tokens at 512."
    )
    header = ["model", "variant", "path", "decode tok/s", "speed-up", "batch-8 tok/s", "prefill tok/s",
              "weights MiB", "logit diff", "read MiB / GB/s", "wiki ppl"]  # fmt: skip
    write_results(data.get("name", "decode"), data, header, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="smollm2,llama1b")
    parser.add_argument("--variants", default="", help="comma-separated, e.g. dense,0.7 (default: each model's)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tokens-batch8", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2-block random Llama, few tokens (the CI test)")
    parser.add_argument("--name", default="decode", help="results file name (bench/results/NAME.json)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--layers", action="store_true", help="where a SmolLM2 step's time goes (decode_layers)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layers:
        torch.manual_seed(0)
        measure_layers(args)
        return
    args.variants = [v for v in args.variants.split(",") if v]
    if args.tiny:
        args.models, args.tokens, args.tokens_batch8, args.prompt_len, args.repeats = "tiny", 4, 3, 16, 1
    if args.one:
        print(json.dumps(measure_model(args, args.one)))
        return
    import common

    common.RESULTS = Path(args.out_dir)
    options = [f"--threads={args.threads}", f"--tokens={args.tokens}", f"--tokens-batch8={args.tokens_batch8}",
               f"--prompt-len={args.prompt_len}", f"--repeats={args.repeats}",
               *([f"--variants={','.join(args.variants)}"] if args.variants else [])]  # fmt: skip
    data = {"setting": {"threads": args.threads, "tokens": args.tokens, "tokens_batch8": args.tokens_batch8,
                        "prompt_len": args.prompt_len, "repeats": args.repeats, "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine()},
            "rows": {}, "name": args.name}  # fmt: skip
    from sparsefit.infer.choose import _cpu_name

    data["setting"]["cpu"] = _cpu_name()
    for model_key in args.models.split(","):
        # One process per model, in turn: the 1.1B model's memory and threads never share a run with SmolLM2's.
        result = run_isolated(__file__, options, [model_key], threads=args.threads)
        if result.get("status") != "ok":
            data["rows"][f"{model_key}:all:all"] = result
            continue
        data["rows"].update(result["rows"])
        data["setting"]["isa"] = result["isa"]
        report(data)
    data["setting"].setdefault("isa", None)
    report(data)


if __name__ == "__main__":
    main()
