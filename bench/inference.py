"""Inference speed of sparse weights: what PyTorch actually gives, dense vs sparse, prefill vs decode.

Two tables:

- **layers** (every device): one linear layer of each shape (default: SmolLM2's 576x576, 1536x576,
  576x1536; on a GPU also LLaMA-7B's), weights pruned 2:4 by magnitude. Variants: ``dense``
  (the unpruned weight), ``dense_zeros`` (the pruned weight stored dense, same kernel), ``csr``
  (``weight.to_sparse_csr() @ x.T``) and, on a CUDA GPU of compute capability >= 8.0,
  ``semi_structured`` (``torch.sparse.to_sparse_semi_structured``). Decode = one token per sequence
  (``batch`` tokens), prefill = ``batch * prompt_len`` tokens.
- **model** (CUDA GPU >= 8.0 and a 2:4 model given): tokens/s of the whole model, dense vs
  :func:`sparsefit.export.semi_structured.to_semi_structured`, prefill (one forward of ``batch x prompt_len``) and
  decode (``new_tokens`` steps with the KV cache), plus the largest logit difference vs dense.

The CPU has no 2:4 kernel: its table is an honest record (CSR is slower than dense at these sizes),
not a speed-up claim. GPU parts are skipped, with the reason recorded, where no suitable GPU is found.

Usage: ``.venv/bin/python bench/inference.py [--model DIR] [--device auto|cpu|cuda] [--batches 1,4,16,64]``;
writes ``inference.json`` and ``inference.md`` (atomically) into ``--out-dir``, by default the ``results``
folder beside this script (``bench/results``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsefit.atomic import write_file_atomically
from sparsefit.errors import UsageError
from sparsefit.export.semi_structured import semi_structured_device_problem, to_semi_structured
from sparsefit.models import get_adapter, load, prunable_layers, weight_matrix
from sparsefit.text import markdown_table
from sparsefit.walk.device import resolve_device

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOLLM2_SHAPES = ((576, 576), (1536, 576), (576, 1536))  # (out, in): q/o_proj, gate/up_proj, down_proj
LLAMA7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64)
CPU_BATCHES = (1, 4, 16, 64)  # short on purpose: CSR at thousands of tokens takes seconds per call on 2 cores
DEFAULTS = {"cpu": {"prompt_len": 32, "new_tokens": 8}, "cuda": {"prompt_len": 256, "new_tokens": 32}}


# ---------------------------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, min_time_s: float = 0.3, max_reps: int = 50
) -> tuple[float, float]:
    """(best, median) seconds of one call: one warm-up, then enough repetitions to fill ``min_time_s`` (>= 2).

    The best time is the one reported: on a shared machine other processes only ever add time
    (median timings here jumped to the 30 ms scheduler slice while other jobs ran).
    """
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - began
    reps = max(2, min(max_reps, math.ceil(min_time_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        _sync(device)
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return min(times), statistics.median(times)


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive inputs (the pattern 2:4 kernels use)."""
    out, inp = weight.shape
    groups = weight.reshape(out, inp // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out, inp)


# ---------------------------------------------------------------------------------------------- layer table


def bench_layers(
    weights: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    batches: Sequence[int],
    prompt_len: int,
    device: torch.device,
    dtype: torch.dtype,
    min_time_s: float,
) -> list[dict[str, Any]]:
    """Rows of the layer table. ``weights``: (label, dense weight, pruned weight) in (out, in)."""
    use_semi = semi_structured_device_problem(device) is None and dtype in (torch.float16, torch.bfloat16)
    rows: list[dict[str, Any]] = []
    for label, dense_w, pruned_w in weights:
        dense_w = dense_w.to(device, dtype)
        pruned_w = pruned_w.to(device, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta": known, not news
            csr = pruned_w.to_sparse_csr()
        semi, semi_error = None, None
        if use_semi:
            from torch.sparse import to_sparse_semi_structured

            try:
                semi = to_sparse_semi_structured(pruned_w)
            except (RuntimeError, ValueError) as exc:  # a shape the kernels do not take: recorded, not fatal
                semi_error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        for phase in ("decode", "prefill"):
            for batch in batches:
                tokens = batch if phase == "decode" else batch * prompt_len
                x = torch.randn(tokens, dense_w.shape[1], device=device, dtype=dtype)
                reference = F.linear(x, pruned_w)
                variants: dict[str, Callable[[], torch.Tensor]] = {
                    "dense": lambda x=x, w=dense_w: F.linear(x, w),
                    "dense_zeros": lambda x=x, w=pruned_w: F.linear(x, w),
                    "csr": lambda x=x, w=csr: (w @ x.t()).t(),
                }
                if semi is not None:
                    variants["semi_structured"] = lambda x=x, w=semi: F.linear(x, w)
                elif semi_error is not None:
                    rows.append({"layer": label, "shape": list(dense_w.shape), "phase": phase, "batch": batch,
                                 "tokens": tokens, "variant": "semi_structured", "error": semi_error})
                dense_s = None
                for variant, fn in variants.items():
                    row: dict[str, Any] = {
                        "layer": label,
                        "shape": list(dense_w.shape),
                        "phase": phase,
                        "batch": batch,
                        "tokens": tokens,
                        "variant": variant,
                    }
                    try:
                        with torch.no_grad():
                            seconds, median = time_call(fn, device, min_time_s)
                            diff = float((fn().float() - reference.float()).abs().max())
                    except (RuntimeError, NotImplementedError) as exc:
                        if variant == "dense":
                            raise
                        # A kernel PyTorch lacks for this shape/dtype is a result too, not a crash.
                        row["error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                        rows.append(row)
                        continue
                    dense_s = seconds if variant == "dense" else dense_s
                    row.update({
                        "ms": round(seconds * 1e3, 4),
                        "median_ms": round(median * 1e3, 4),
                        "tokens_per_s": round(tokens / seconds, 1),
                        "speed_vs_dense": round(dense_s / seconds, 3),
                        "max_abs_diff_vs_dense_zeros": diff,
                    })
                    rows.append(row)
    return rows


def synthetic_weights(shapes: Sequence[tuple[int, int]], seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for o, i in shapes:
        w = torch.randn(o, i, generator=generator) / math.sqrt(i)
        out.append((f"{o}x{i}", w, prune_2_4(w)))
    return out


def model_weights(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The first block's distinct layer shapes with the model's real (pruned) weights."""
    block = get_adapter(model).get_blocks(model)[0]
    seen: dict[tuple[int, int], tuple[str, torch.Tensor, torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)
    for name, module in prunable_layers(block).items():
        w = weight_matrix(module).detach().float().cpu()
        if tuple(w.shape) not in seen:
            # "dense" stands for the unpruned layer: same shape and scale, no zeros.
            dense = torch.randn(w.shape, generator=generator) * float(w[w != 0].std() if (w != 0).any() else 1.0)
            seen[tuple(w.shape)] = (f"{name} {w.shape[0]}x{w.shape[1]}", dense, w.contiguous())
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- model table


def _decode_seconds(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        began = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
    return time.perf_counter() - began


def bench_model(
    model: nn.Module, batches: Sequence[int], prompt_len: int, new_tokens: int, device: torch.device,
    dtype: torch.dtype, min_time_s: float,
) -> dict[str, Any]:
    """Tokens/s dense vs 2:4 (prefill and decode) and the logit difference; needs a 2:4 model on a GPU >= 8.0."""
    dense = model.to(device, dtype).eval()
    sparse = to_semi_structured(copy.deepcopy(dense))
    vocab = int(dense.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    check_ids = torch.randint(0, vocab, (2, prompt_len), generator=generator).to(device)
    with torch.no_grad():
        ref = dense(input_ids=check_ids).logits.float()
        got = sparse(input_ids=check_ids).logits.float()
    rows = []
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
        row: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
        for label, m in (("dense", dense), ("semi_structured", sparse)):
            with torch.no_grad():
                prefill, _ = time_call(lambda m=m, ids=ids: m(input_ids=ids, use_cache=False), device, min_time_s)
            decode = min(_decode_seconds(m, ids, new_tokens, device) for _ in range(2))
            row[f"{label}_prefill_tok_s"] = round(batch * prompt_len / prefill, 1)
            row[f"{label}_decode_tok_s"] = round(batch * new_tokens / decode, 1)
        row["prefill_speedup"] = round(row["semi_structured_prefill_tok_s"] / row["dense_prefill_tok_s"], 3)
        row["decode_speedup"] = round(row["semi_structured_decode_tok_s"] / row["dense_decode_tok_s"], 3)
        rows.append(row)
    return {
        "rows": rows,
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "max_abs_logit": float(ref.abs().max()),
    }


# ---------------------------------------------------------------------------------------------- entry point


def _load(model_or_path: nn.Module | str | os.PathLike) -> nn.Module:
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    return load(str(model_or_path)).model


def run_inference_bench(
    model_or_path: nn.Module | str | os.PathLike | None = None,
    batches: Sequence[int] | None = None,
    prompt_len: int | None = None,
    new_tokens: int | None = None,
    device: str = "auto",
    *,
    shapes: Sequence[tuple[int, int]] | None = None,
    dtype: str | None = None,
    min_time_s: float = 0.3,
    threads: int | None = None,
    out_dir: str | os.PathLike | None = RESULTS_DIR,
) -> dict[str, Any]:
    """Run the inference benchmark; write ``inference.json``/``.md`` into ``out_dir`` (None: write nothing).

    Defaults depend on the device: batches (1, 4, 16, 64) and prompt_len 32 on the CPU (about a minute
    on 2 cores), batches 1…64 and prompt_len 256 on a GPU. ``model_or_path`` (optional) supplies real
    pruned layer weights for the layer table and, on a GPU >= 8.0, the model-level table (it must be 2:4).
    ``threads``: CPU threads, 1 by default. With 2 threads on a shared 2-core machine every parallel
    region waited a whole scheduler slice (~25 ms) for its second thread, which buried the differences
    between variants; one thread gives every variant the same, stable footing.
    """
    dev = resolve_device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    batches = tuple(batches) if batches else (GPU_BATCHES if kind == "cuda" else CPU_BATCHES)
    prompt_len = prompt_len or DEFAULTS[kind]["prompt_len"]
    new_tokens = new_tokens or DEFAULTS[kind]["new_tokens"]
    if any(b < 1 for b in batches) or prompt_len < 1 or new_tokens < 1:
        raise UsageError(f"batches {list(batches)}, prompt_len {prompt_len} and new_tokens {new_tokens} must be >= 1")
    # bfloat16 matmul on this CPU runs at ~0.3 GFLOP/s (DESIGN.md): float32 there, half precision on a GPU.
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is not None and dtype not in dtypes:
        raise UsageError(f"dtype {dtype!r} is not supported; use one of {', '.join(dtypes)}")
    torch_dtype = dtypes[dtype] if dtype else (torch.float16 if kind == "cuda" else torch.float32)
    previous_threads = torch.get_num_threads()
    if kind == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        return _run(model_or_path, batches, prompt_len, new_tokens, dev, kind, shapes, torch_dtype, min_time_s, out_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    model_or_path, batches, prompt_len, new_tokens, dev, kind, shapes, torch_dtype, min_time_s, out_dir
) -> dict[str, Any]:
    model = _load(model_or_path) if model_or_path is not None else None
    if model is not None:
        weights = model_weights(model)
    else:
        default_shapes = SMOLLM2_SHAPES + (LLAMA7B_SHAPES if kind == "cuda" else ())
        weights = synthetic_weights(shapes or default_shapes)
    load_start = _load_average()
    began = time.perf_counter()
    layer_rows = bench_layers(weights, batches, prompt_len, dev, torch_dtype, min_time_s)
    problem = semi_structured_device_problem(dev)
    if problem is not None:
        model_table: dict[str, Any] = {"skipped": problem}
    elif model is None:
        model_table = {"skipped": "no model given (pass a 2:4 run folder to measure whole-model tokens/s)"}
    else:
        model_table = bench_model(model, batches, prompt_len, new_tokens, dev, torch_dtype, min_time_s)
    result = {
        "device": _device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if kind == "cpu" else None,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "settings": {
            "batches": list(batches),
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "weights": "model" if model is not None else "random, magnitude-pruned 2:4",
            "timing": f"best of >= 2 calls after one warm-up, >= {min_time_s} s per cell (median also in the JSON)",
        },
        "semi_structured": "available" if problem is None else f"skipped: {problem}",
        "layers": layer_rows,
        "model": model_table,
        "seconds": round(time.perf_counter() - began, 1),
        # Other work on the machine slows every variant: the load tells a reader how shared it was.
        "load_average_1m": {"start": load_start, "end": _load_average()},
    }
    if out_dir is not None:
        write_results(result, Path(out_dir))
    return result


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (cc {major}.{minor})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def to_markdown(result: dict[str, Any]) -> str:
    """The human-readable report of one run."""
    lines = [
        "# Inference benchmark: dense vs sparse weights",
        "",
        f"Device: {result['device']}; torch {result['torch']}; dtype {result['dtype']}"
        + (f"; {result['threads']} threads" if result.get("threads") else "")
        + f"; {result['seconds']} s; 1-minute load average {result['load_average_1m']['start']} at the start "
        f"({os.cpu_count()} cores: above that, other processes shared the machine).",
        f"Settings: {json.dumps(result['settings'])}.",
        f"2:4 kernels: {result['semi_structured']}.",
        "",
        "## Layer level (ms per call; speed = dense ms / variant ms, > 1 is faster than dense)",
        "",
        "`dense` = unpruned weight, `dense_zeros` = the 2:4-pruned weight stored dense (same kernel), "
        "`csr` = `weight.to_sparse_csr() @ x.T`, `semi_structured` = PyTorch 2:4 kernels (GPU only).",
        "",
    ]
    variants = list(dict.fromkeys(r["variant"] for r in result["layers"]))
    header = ["layer", "phase", "batch", "tokens", *[f"{v} ms" for v in variants]]
    header += [f"{v} speed" for v in variants[1:]]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in result["layers"]:
        cells.setdefault((r["layer"], r["phase"], r["batch"], r["tokens"]), {})[r["variant"]] = r
    rows = []
    for (layer, phase, batch, tokens), by_variant in cells.items():
        row = [layer, phase, str(batch), str(tokens)]
        row += [f"{by_variant[v]['ms']:.3f}" if "ms" in by_variant.get(v, {}) else "n/a" for v in variants]
        row += [
            f"{by_variant[v]['speed_vs_dense']:.2f}x" if "ms" in by_variant.get(v, {}) else "n/a"
            for v in variants[1:]
        ]
        rows.append(row)
    lines.append(markdown_table(header, rows).rstrip("\n"))
    lines += ["", "## Model level (tokens/s)", ""]
    table = result["model"]
    if "skipped" in table:
        lines.append(f"Skipped: {table['skipped']}.")
    else:
        header = ["batch", "prefill dense", "prefill 2:4", "speed-up", "decode dense", "decode 2:4", "speed-up"]
        rows = [
            [str(r["batch"]), str(r["dense_prefill_tok_s"]), str(r["semi_structured_prefill_tok_s"]),
             f"{r['prefill_speedup']}x", str(r["dense_decode_tok_s"]), str(r["semi_structured_decode_tok_s"]),
             f"{r['decode_speedup']}x"]
            for r in table["rows"]
        ]  # fmt: skip
        lines.append(markdown_table(header, rows).rstrip("\n"))
        lines += ["", f"Largest |logit difference| 2:4 vs dense: {table['max_abs_logit_diff']:.4g} "
                  f"(largest |logit| {table['max_abs_logit']:.4g})."]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out_dir: Path) -> None:
    write_file_atomically(out_dir / "inference.json", json.dumps(result, indent=2))
    write_file_atomically(out_dir / "inference.md", to_markdown(result))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a run folder or model (optional; must be 2:4 for the GPU table)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default=None, help="comma-separated, e.g. 1,4,16,64")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    result = run_inference_bench(
        args.model, batches, args.prompt_len, args.new_tokens, args.device, threads=args.threads, out_dir=args.out_dir
    )
    print(to_markdown(result))


if __name__ == "__main__":
    main()
