"""The GPU rows of issues 24 and 7B-scale recovery, in one script that needs no download: ≤ 8 minutes on one H100.

1. **2:4 decoding**: a 7B-shaped random Llama (hidden 4096, MLP 11008, 32 blocks, vocabulary 32,000) built on the
   GPU itself in bf16, pruned 2:4 by magnitude; decode tokens/s at batch 1 and 8 and prefill tokens/s, dense
   against torch's semi-structured kernels (``sparsefit.export.to_semi_structured``), and the largest logit
   difference.
2. **Streamed Wanda + EBFT, 7B blocks**: a few 7B-shaped blocks written as a local checkpoint, pruned and recovered
   through ``run_prune`` (streamed, as the 7B job runs): seconds per block and peak GPU memory, against the
   7B job's goal (32 blocks in ≤ 15 minutes, ≤ 8 GB).
3. **The same for a 70B-shaped block** (hidden 8192, MLP 28672, 64 heads, 8 KV heads).

``--tiny`` runs every part at a tiny width on whatever device there is (the CPU in CI); part 1 needs a CUDA GPU of
compute capability 8.0 or more and says so in its row elsewhere. Writes ``bench/results/gpu.{json,md}`` (or
``--name``).

    .venv/bin/python bench/gpu.py                 # on the GPU machine
    .venv/bin/python bench/gpu.py --tiny --out-dir /tmp/gpu   # the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

SHAPES = {
    "7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "70b": dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000),
    "tiny": dict(hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=260),
}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prune_2_4(model: torch.nn.Module) -> None:
    """Zero the 2 smallest of every 4 consecutive input weights of each block linear (magnitude 2:4)."""
    from sparsefit.walk.masks import model_layers

    for layer in model_layers(model).values():
        groups = layer.weight.data.view(layer.weight.shape[0], -1, 4)
        groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0)


def decode_2_4(shape: dict, layers: int, device: torch.device, tokens: int, prompt_len: int) -> dict:
    """Part 1: decode and prefill, dense bf16 against 2:4, on one model built on the device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparsefit.export.semi_structured import semi_structured_device_problem, to_semi_structured
    from sparsefit.infer.generate import greedy

    problem = semi_structured_device_problem(device)
    if problem:
        return {"status": "skipped", "reason": problem}
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=layers, num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                         max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # built on the device, in bf16 from the start: no float32 copy, no download
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prune_2_4(model)
    prompt = torch.randint(3, shape["vocab"], (1, prompt_len), device=device)
    short = prompt[:, :8]

    def timed() -> dict:
        greedy(model, short, 2)
        one = min((greedy(model, short, tokens) for _ in range(3)), key=lambda r: r.decode_s)
        eight = min((greedy(model, short.expand(8, -1), tokens) for _ in range(3)), key=lambda r: r.decode_s)
        with torch.no_grad():
            times = []
            for _ in range(3):
                sync(device)
                began = time.perf_counter()
                model(input_ids=prompt)
                sync(device)
                times.append(time.perf_counter() - began)
            logits = model(input_ids=prompt[:, :16]).logits.float()
        return {"decode_tokens_per_s": one.decode_tokens_per_s, "decode8_tokens_per_s": eight.decode_tokens_per_s,
                "prefill_tokens_per_s": prompt_len / min(times), "logits": logits}  # fmt: skip

    dense = timed()
    to_semi_structured(model)
    sparse = timed()
    diff = float((sparse.pop("logits") - dense["logits"]).abs().max() / dense.pop("logits").abs().max())
    return {"status": "ok", "dense": dense, "2:4": sparse, "max_logit_diff": diff,
            "speedup_decode": sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            "speedup_prefill": sparse["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]}  # fmt: skip


def streamed_recovery(shape: dict, blocks: int, device: torch.device, workdir: Path, nsamples: int, seqlen: int,
                      epochs: int) -> dict:  # fmt: skip
    """Parts 2 and 3: a random checkpoint of ``blocks`` blocks, Wanda 50 % + EBFT streamed: s/block, peak memory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_byte_tokenizer
    from sparsefit.app.jobs import run_prune
    from sparsefit.prune import PruneConfig
    from sparsefit.random_checkpoint import write_random_llama

    root = Path(tempfile.mkdtemp(dir=workdir, prefix="gpu-bench-"))
    try:
        began = time.perf_counter()
        size = write_random_llama(root / "model", layers=blocks, hidden=shape["hidden"],
                                  intermediate=shape["intermediate"], heads=shape["heads"],
                                  kv_heads=shape["kv_heads"], vocab=shape["vocab"], blocks_per_shard=1,
                                  dtype=torch.bfloat16)  # fmt: skip
        make_byte_tokenizer().save_pretrained(root / "model")
        corpus = root / "corpus.txt"
        corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps over a lazy dog " * 400
                                      for i in range(4 * nsamples)))  # fmt: skip
        written_s = time.perf_counter() - began
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        config = PruneConfig(method="wanda", sparsity=0.5, calib=str(corpus), nsamples=nsamples, seqlen=seqlen,
                             batch_size=4, device=str(device))  # fmt: skip
        options = {"preset": "gpu" if device.type == "cuda" else "cpu", "epochs": epochs, "heldout": 0,
                   "early_stop": 0, "batch_size": 4}  # fmt: skip
        began = time.perf_counter()
        run_prune(str(root / "model"), config, root / "out", recover="ebft", recover_options=options)
        seconds = time.perf_counter() - began
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"status": "ok", "blocks": blocks, "checkpoint_gib": size / 2**30, "write_s": written_s,
                "time_s": seconds, "s_per_block": seconds / blocks, "peak_gpu_gib": peak,
                "peak_rss_mib": common.peak_rss_mb(), "calibration": f"{nsamples} x {seqlen}",
                "epochs": epochs}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths on any device (the CI smoke run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode-layers", type=int, default=32, help="blocks of the 7B model of part 1")
    parser.add_argument("--blocks", type=int, default=3, help="7B blocks streamed in part 2 (s/block from them)")
    parser.add_argument("--blocks-70b", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="where the checkpoints are written (default: temp folder)")
    parser.add_argument("--name", default="gpu")
    parser.add_argument("--out-dir", default=str(common.RESULTS))
    args = parser.parse_args()
    if args.tiny:
        args.decode_layers, args.blocks, args.blocks_70b = 2, 2, 1
        args.nsamples, args.seqlen, args.tokens, args.prompt_len = 8, 64, 4, 32
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    big = ("tiny", "tiny") if args.tiny else ("7b", "70b")
    common.RESULTS = Path(args.out_dir)
    results = {"setting": {**vars(args), "device_name": device_name(device), "torch": torch.__version__}}
    parts = {
        "decode 2:4": lambda: decode_2_4(SHAPES[big[0]], args.decode_layers, device, args.tokens, args.prompt_len),
        "7B blocks, Wanda + EBFT streamed": lambda: streamed_recovery(
            SHAPES[big[0]], args.blocks, device, args.workdir, args.nsamples, args.seqlen, args.epochs),
        "70B block, Wanda + EBFT streamed": lambda: streamed_recovery(
            SHAPES[big[1]], args.blocks_70b, device, args.workdir, args.nsamples, args.seqlen, args.epochs),
    }
    rows = []
    for name, part in parts.items():
        began = time.perf_counter()
        try:
            result = part()
        except Exception as error:  # a part that fails is a row that says so; the other parts still run
            result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        result["wall_s"] = time.perf_counter() - began
        results[name] = result
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if name == "decode 2:4" and result["status"] == "ok":
            rows.append([name, f"dense {result['dense']['decode_tokens_per_s']:.1f} / 2:4 "
                         f"{result['2:4']['decode_tokens_per_s']:.1f} tok/s ({result['speedup_decode']:.2f}x); "
                         f"batch 8 {result['dense']['decode8_tokens_per_s']:.1f} / "
                         f"{result['2:4']['decode8_tokens_per_s']:.1f}; prefill {result['speedup_prefill']:.2f}x; "
                         f"logit diff {result['max_logit_diff']:.1e}", f"{result['wall_s']:.0f}"])  # fmt: skip
        elif result["status"] == "ok":
            peak = f"{result['peak_gpu_gib']:.2f} GiB GPU" if result["peak_gpu_gib"] is not None else \
                f"{result['peak_rss_mib']:.0f} MiB RSS"  # fmt: skip
            per_block = result["s_per_block"]
            rows.append([name, f"{per_block:.1f} s / block over {result['blocks']} blocks "
                         f"(x32: {32 * per_block / 60:.1f} min), peak {peak}", f"{result['wall_s']:.0f}"])  # fmt: skip
        else:
            rows.append([name, result.get("reason") or result.get("error"), f"{result['wall_s']:.0f}"])
    notes = (f"{results['setting']['device_name']}, torch {torch.__version__}. Part 1: a {args.decode_layers}-block "
             f"{big[0]}-shaped random Llama in bf16, magnitude 2:4, greedy {args.tokens} tokens after an 8-token "
             f"prompt (best of 3), prefill {args.prompt_len} tokens. Parts 2-3: random checkpoints in bf16, Wanda "
             f"50 % + EBFT ({args.epochs} epoch, {args.nsamples} x {args.seqlen} windows) streamed through "
             "run_prune; peak GPU memory is torch's max_memory_allocated.")  # fmt: skip
    common.write_results(args.name, results, ["part", "result", "wall s"], rows, notes)


if __name__ == "__main__":
    main()
