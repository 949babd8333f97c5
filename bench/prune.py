"""Pruning benchmark on SmolLM2: perplexity after magnitude / Wanda / SparseGPT at 50/60/70% and 2:4,
pruning time as a ratio to one dense calibration forward measured in the same run, and peak memory.

    .venv/bin/python bench/prune.py                      # the issue's setting (wiki 128 x 512)
    .venv/bin/python bench/prune.py --nsamples 16 --max-tokens 4096   # a quick look
    .venv/bin/python bench/prune.py --paths --methods wanda --settings 0.5 --nsamples 32 --name prune_paths

Each configuration runs in its own process, so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from common import peak_rss_mb, run_isolated, run_many, write_results  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
SETTINGS = (("0.5", "unstructured"), ("0.6", "unstructured"), ("0.7", "unstructured"), ("0.5", "2:4"))


def measure_path(args: argparse.Namespace, method: str, sparsity: float, pattern: str, path: str) -> dict:
    """One ``sparsefit prune`` of the model's local safetensors folder through ``run_prune``, loaded whole
    (``path`` memory) or streamed block by block: load, calibration, pruning and the written run folder."""
    import hashlib
    import shutil
    import tempfile

    from sparsefit.app.jobs import run_prune
    from sparsefit.models.loading import resolve
    from sparsefit.prune import PruneConfig

    folder = resolve(args.model)
    out = Path(tempfile.mkdtemp(prefix="prune-path-")) / "run"
    config = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, nsamples=args.nsamples,
                         seqlen=args.seqlen, batch_size=args.batch_size, device="cpu")  # fmt: skip
    began = time.perf_counter()
    try:
        run = run_prune(str(folder), config, out, stream=path == "streamed")
        seconds = time.perf_counter() - began
        digest = hashlib.sha256()  # of every tensor's nonzero pattern: the same masks in both paths?
        for shard in sorted(out.glob("*.safetensors")):
            for name, tensor in sorted(load_file(shard).items()):
                digest.update(name.encode() + (tensor != 0).numpy().tobytes())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {"status": "ok", "time_s": seconds, "peak_rss_mb": peak_rss_mb(), "timings": run["timings"],
            "streamed": run["memory"]["streamed"], "mask_digest": digest.hexdigest()}  # fmt: skip


def measure(args: argparse.Namespace, method: str, sparsity: float, pattern: str) -> dict:
    """Load, time one dense calibration forward (method 'dense') or a pruning run, evaluate."""
    if "@" in method:  # METHOD@memory or METHOD@streamed: the run_prune pair
        method, path = method.split("@")
        return measure_path(args, method, sparsity, pattern, path)
    from sparsefit.app.jobs import evaluate_model
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import get_adapter, load
    from sparsefit.prune import PruneConfig, prune_model
    from sparsefit.walk import capture_inputs, walk_blocks

    torch.manual_seed(0)
    loaded = load(args.model)
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), args.nsamples, args.seqlen, 0)
    began = time.perf_counter()
    extra = {}
    if method == "dense":
        # The denominator: one plain calibration forward of the dense model, batched as the pruners are.
        with torch.no_grad():
            for start in range(0, calib.shape[0], args.batch_size):
                loaded.model(input_ids=calib[start : start + args.batch_size])
        extra["plain_forward_s"] = time.perf_counter() - began
        # A stricter one: the same windows through the walker alone (no head), as the pruners walk them.
        began = time.perf_counter()
        adapter = get_adapter(loaded.model)
        inputs, kwargs = capture_inputs(loaded.model, adapter, calib, batch_size=args.batch_size)
        with torch.no_grad():
            walk_blocks(loaded.model, adapter, inputs, kwargs, [], batch_size=args.batch_size)
        extra["walker_forward_s"] = time.perf_counter() - began
    else:
        config = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, nsamples=args.nsamples,
                             seqlen=args.seqlen, batch_size=args.batch_size, device="cpu")  # fmt: skip
        prune_model(loaded.model, calib, config)
    seconds = time.perf_counter() - began
    ppl = {}
    if not args.no_eval:
        ppl = evaluate_model(loaded.model, loaded.tokenizer, ppl=["wiki", "books"], seqlen=args.eval_seqlen,
                             max_tokens=args.max_tokens)["ppl"]  # fmt: skip
    return {"status": "ok", "time_s": seconds, "ppl": ppl, "peak_rss_mb": peak_rss_mb(), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=16384, help="test tokens per corpus")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default=",".join(s if p == "unstructured" else p for s, p in SETTINGS),
                        help="sparsities and/or N:M patterns")
    parser.add_argument("--no-eval", action="store_true", help="time the pruning only (no perplexity)")
    parser.add_argument("--paths", action="store_true",
                        help="instead: each method and setting through run_prune on the model's local safetensors "
                             "folder, loaded whole and streamed, side by side (no evaluation)")  # fmt: skip
    parser.add_argument("--name", default="prune", help="results file name under bench/results")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run side by side (one process each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SPARSITY", "PATTERN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = ["--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--batch-size", str(args.batch_size), "--eval-seqlen", str(args.eval_seqlen),
              "--max-tokens", str(args.max_tokens)] + (["--no-eval"] if args.no_eval else [])  # fmt: skip
    if args.one:
        method, sparsity, pattern = args.one
        print(json.dumps(measure(args, method, float(sparsity), pattern)))
        return
    settings = [("0.5", s) if ":" in s else (s, "unstructured") for s in args.settings.split(",")]
    if args.paths:
        jobs = {
            f"{method} {pattern if pattern != 'unstructured' else sparsity} {path}": [f"{method}@{path}", sparsity,
                                                                                       pattern]  # fmt: skip
            for method in args.methods.split(",")
            for sparsity, pattern in settings
            for path in ("memory", "streamed")
        }
        run_many(__file__, common, jobs, args.jobs, args.threads, lambda runs: report_paths(args, runs))
        return
    dense = run_isolated(__file__, common, ["dense", "0", "unstructured"], args.threads)
    if dense["status"] != "ok":
        sys.exit(f"the dense run failed: {dense['error']}")
    jobs = {
        f"{method} {pattern if pattern != 'unstructured' else sparsity}": [method, sparsity, pattern]
        for method in args.methods.split(",")
        for sparsity, pattern in settings
    }
    run_many(__file__, common, jobs, args.jobs, args.threads, lambda runs: report(args, dense, runs))


def report(args: argparse.Namespace, dense: dict, runs: dict[str, dict]) -> None:
    """Write the table of the runs finished so far."""
    forward_s, walker_s = dense["plain_forward_s"], dense["walker_forward_s"]
    def ppl(r: dict, corpus: str):
        return round(r["ppl"][corpus]["value"], 2) if r["ppl"] else "–"

    rows = [["dense", ppl(dense, "wiki"), ppl(dense, "books"), round(forward_s, 1), 1.0, round(forward_s / walker_s, 2),
             round(dense["peak_rss_mb"])]]  # fmt: skip
    for key, r in runs.items():
        if r["status"] != "ok":
            rows.append([key, "failed", r["error"], "", "", "", ""])
            continue
        r["time_ratio"] = r["time_s"] / forward_s
        r["time_ratio_walker"] = r["time_s"] / walker_s
        rows.append([key, ppl(r, "wiki"), ppl(r, "books"), round(r["time_s"], 1), round(r["time_ratio"], 2),
                     round(r["time_ratio_walker"], 2),
                     round(r["peak_rss_mb"])])  # fmt: skip
    threads = f"{args.threads} torch thread(s) per process" if args.threads else "torch's default threads"
    notes = (
        f"SmolLM2-135M on 2 CPU cores, torch {torch.__version__}, {args.jobs} configuration(s) at a time, "
        f"{threads}. Calibration `wiki` {args.nsamples} x {args.seqlen}; perplexity on the first "
        f"{args.max_tokens} test tokens of each corpus at seqlen {args.eval_seqlen}. Time ratio = pruning wall "
        "time (capture, statistics pass, pruning, propagation pass) / one plain calibration forward of the dense "
        f"model, `model(input_ids)` in the same batches ({forward_s:.1f} s); the stricter ratio divides by the "
        f"same windows through the walker alone, no head ({walker_s:.1f} s). Both denominators were measured in "
        "this run; other processes may share the cores, so compare ratios run to run with care (goal: Wanda <= "
        "1.5x, SparseGPT <= 3x). Peak RSS is each process's own, "
        "model load included."
    )
    header = ["run", "ppl wiki", "ppl books", "time s", "time / dense fwd", "time / walker fwd", "peak RSS MB"]
    write_results(args.name, {"setting": vars(args), "dense": dense, "runs": runs}, header, rows, notes)


def report_paths(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    """The streamed / in-memory pair: each streamed run's time as a ratio to its in-memory twin."""
    rows = []
    for key, r in runs.items():
        if r["status"] != "ok":
            rows.append([key, "failed", r["error"], "", "", "", ""])
            continue
        twin = runs.get(key.rsplit(" ", 1)[0] + " memory", {})
        ratio = round(r["time_s"] / twin["time_s"], 3) if twin.get("status") == "ok" else ""
        same = "yes" if twin.get("mask_digest") == r["mask_digest"] else "no" if twin.get("status") == "ok" else ""
        rows.append([key, round(r["time_s"], 1), round(r["timings"].get("prune_s", 0), 1), ratio, same,
                     round(r["peak_rss_mb"])])  # fmt: skip
    threads = f"{args.threads} torch thread(s) per process" if args.threads else "torch's default threads"
    notes = (f"`run_prune` on {args.model}'s local safetensors folder, loaded whole or streamed block by block "
             f"(one process each, {args.jobs} at a time, {threads}, torch {torch.__version__}), `wiki` "
             f"{args.nsamples} x {args.seqlen}, no evaluation. Time: the whole run (load, calibration, pruning, the "
             "run folder written); ratio: streamed / in memory; masks: the same nonzeros in both outputs.")  # fmt: skip
    header = ["run", "time s", "prune s", "streamed / in memory", "same masks", "peak RSS MB"]
    write_results(args.name, {"setting": vars(args), "runs": runs}, header, rows, notes)


if __name__ == "__main__":
    main()
