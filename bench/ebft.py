"""EBFT benchmark on SmolLM2: Wanda at 50/70% and 2:4 with EBFT, interleaved (of record) and two-step beside it.

Interleaved is the reference's order: each block is pruned from statistics of the recovered model's own inputs,
then fine-tuned, then propagated. Two-step prunes the whole model first, then runs EBFT on those masks against the
dense model. Both start from the same calibration windows; "pruned" is plain Wanda (no EBFT) in both.

    .venv/bin/python bench/ebft.py                                  # the default CPU budget below
    .venv/bin/python bench/ebft.py --settings 0.7 --max-tokens 4096 # one setting, quicker

Reports dense / pruned / pruned+EBFT perplexity on `wiki` and `books`, the share of the pruned-to-dense
gap EBFT closes (linear and in log-perplexity), time per block, the training loop's achieved FLOP/s as
a ratio to this machine's float32 matmul peak measured in the same run, and each run's peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from common import peak_rss_mb, run_isolated, run_many, write_results  # noqa: E402

SETTINGS = ("0.5", "0.7", "2:4")
MODES = ("interleaved", "two-step")


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best-of float32 matmul throughput on this machine (GFLOP/s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best / 1e9


def measure(args: argparse.Namespace, setting: str, target: str, mode: str = "interleaved") -> dict:
    import copy

    from sparsefit.app.jobs import evaluate_model, prune_interleaved
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load
    from sparsefit.prune import PruneConfig, parse_pattern, prune_model
    from sparsefit.recover import RecoveryContext, get_method

    def evaluate(model) -> dict:
        res = evaluate_model(model, loaded.tokenizer, ppl=["wiki", "books"], seqlen=args.eval_seqlen,
                             max_tokens=args.max_tokens)  # fmt: skip
        return {k: v["value"] for k, v in res["ppl"].items()}

    loaded = load(args.model)
    if setting == "dense":
        return {"status": "ok", "ppl": evaluate(loaded.model), "peak_rss_mb": peak_rss_mb()}
    pattern = "2:4" if setting == "2:4" else "unstructured"
    sparsity = 0.5 if setting == "2:4" else float(setting)
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), args.nsamples, args.seqlen, 0)
    teacher = copy.deepcopy(loaded.model)
    config = PruneConfig(method="wanda", sparsity=sparsity, pattern=pattern, nsamples=args.nsamples,
                         seqlen=args.seqlen, device="cpu")  # fmt: skip
    began = time.perf_counter()
    prune_model(loaded.model, calib, config)
    prune_s = time.perf_counter() - began
    pruned = evaluate(loaded.model)
    options = {"preset": args.preset, "target": target}
    for key in ("lr", "epochs", "batch_size"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    ebft = get_method("ebft")
    began = time.perf_counter()
    if mode == "interleaved":  # from the dense model again: prune and recover each block in turn
        student = teacher
        ebft_config = ebft.configure(options, args.nsamples, torch.device("cpu"))
        walked = prune_interleaved(student, calib, config, ebft, ebft_config)
        report = ebft.summarize(ebft_config, walked["blocks"], ebft.blocks_of(student))
    else:
        student = loaded.model
        ctx = RecoveryContext(model=student, teacher=teacher, tokenizer=loaded.tokenizer, calib_ids=calib,
                              pattern=parse_pattern(pattern), device=torch.device("cpu"), options=options)  # fmt: skip
        report = ebft.run(ctx)
    ebft_s = time.perf_counter() - began
    recovered = evaluate(student)
    blocks = report["blocks"]
    train_s = sum(b["time_s"] for b in blocks)
    return {
        "status": "ok",
        "ppl_pruned": pruned,
        "ppl_ebft": recovered,
        "prune_s": prune_s,
        "ebft_s": ebft_s,
        "time_per_block_s": ebft_s / len(blocks),
        "train_gflops": sum(b["flops"] for b in blocks) / train_s / 1e9,
        "mse_reduction": sum(1 - b["final_loss"] / b["initial_loss"] for b in blocks) / len(blocks),
        "ebft_config": report["config"],
        "mode": mode,
        "relative_change": sum(b["relative_change"] for b in blocks) / len(blocks),
        "peak_rss_mb": peak_rss_mb(),
    }


def gap(dense: float, pruned: float, recovered: float) -> tuple[float | None, float | None]:
    from sparsefit.app.reports import gap_closed

    return gap_closed(dense, pruned, recovered), gap_closed(dense, pruned, recovered, log=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="sparsities and/or 2:4")
    parser.add_argument("--modes", default=",".join(MODES), help="interleaved (of record) and/or two-step")
    parser.add_argument("--dense-path", default="", help="settings also run with the dense-path target (interleaved)")
    parser.add_argument("--jobs", type=int, default=1, help="settings run side by side (one process each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--one", nargs=3, metavar=("SETTING", "TARGET", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, *args.one)))
        return
    passed = ["--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--preset", args.preset, "--eval-seqlen", str(args.eval_seqlen), "--max-tokens", str(args.max_tokens)]
    for key in ("lr", "epochs", "batch_size"):
        if getattr(args, key) is not None:
            passed += [f"--{key.replace('_', '-')}", str(getattr(args, key))]  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)  # the peak at the workers' thread count
    peak = matmul_peak_gflops()
    dense = run_isolated(__file__, passed, ["dense", "-", "-"], args.threads)
    if dense["status"] != "ok":
        sys.exit(f"the dense run failed: {dense['error']}")
    jobs = {f"{s} {m}": [s, "sparse-path", m] for s in args.settings.split(",") for m in args.modes.split(",")}
    jobs.update({f"{s} interleaved dense-path": [s, "dense-path", "interleaved"] for s in args.dense_path.split(",")
                 if s})  # fmt: skip
    run_many(__file__, passed, jobs, args.jobs, args.threads, lambda runs: report(args, peak, dense, runs))


def report(args: argparse.Namespace, peak: float, dense_run: dict, runs: dict[str, dict]) -> None:
    """Write the table of the runs finished so far."""
    dense = dense_run["ppl"]
    rows = [["dense", "", round(dense["wiki"], 2), "", round(dense["books"], 2), "", "", "", "", "", "",
             round(dense_run["peak_rss_mb"])]]  # fmt: skip
    for key, r in runs.items():
        if r["status"] != "ok":
            rows.append([key, "failed", r["error"]] + [""] * 9)
            continue
        r["gap_closed"] = {c: gap(dense[c], r["ppl_pruned"][c], r["ppl_ebft"][c]) for c in dense}
        r["flops_ratio"] = r["train_gflops"] / peak
        rows.append([
            key, round(r["ppl_pruned"]["wiki"], 2), round(r["ppl_ebft"]["wiki"], 2), round(r["ppl_pruned"]["books"], 2),
            round(r["ppl_ebft"]["books"], 2), f"{r['gap_closed']['wiki'][0]:.0%} / {r['gap_closed']['wiki'][1]:.0%}",
            f"{r['gap_closed']['books'][0]:.0%} / {r['gap_closed']['books'][1]:.0%}", round(r["time_per_block_s"], 1),
            round(r["train_gflops"], 1), f"{r['flops_ratio']:.0%}", f"{r['mse_reduction']:.0%}",
            round(r["peak_rss_mb"]),
        ])  # fmt: skip
    cfg = next((r["ebft_config"] for r in runs.values() if "ebft_config" in r), {})
    threads = f"{args.threads} torch thread(s) per process" if args.threads else "torch's default threads"
    notes = (
        f"SmolLM2-135M, 2 CPU cores, torch {torch.__version__}, {args.jobs} setting(s) at a time, {threads}. "
        f"Wanda from calibration `wiki` {args.nsamples} x {args.seqlen}; EBFT on the same windows, interleaved (the "
        "reference's order, of record: each block pruned from the recovered model's own inputs, then trained) and "
        f"two-step (prune all, then EBFT on those masks), preset `{args.preset}`: lr {cfg.get('lr')}, epochs "
        f"{cfg.get('epochs')}, batch {cfg.get('batch_size')}, {cfg.get('heldout')} held-out windows. Perplexity on "
        f"the first {args.max_tokens} test tokens at seqlen {args.eval_seqlen}; dense: wiki {dense['wiki']:.2f}, "
        f"books {dense['books']:.2f}. Gap closed = share of the pruned-to-dense gap, linear / log-perplexity (goal: "
        ">= 75% at 70%, >= 50% at 2:4). FLOP/s counts the linear layers' 6 x weights x tokens (a lower bound) over "
        "the training loop; the peak is a 2048^3 float32 matmul measured in this run at the workers' thread "
        f"count: {peak:.1f} GFLOP/s (goal >= 50%). CPU rows only."
    )
    header = ["run", "wiki pruned", "wiki +EBFT", "books pruned", "books +EBFT", "gap closed wiki",
              "gap closed books", "s / block", "train GFLOP/s", "of peak", "MSE reduction", "peak RSS MB"]
    # (s / block counts EBFT and, interleaved, the pruning of the block too)
    data = {"matmul_peak_gflops": peak, "setting": vars(args), "dense": dense_run, "runs": runs}
    write_results("ebft", data, header, rows, notes)


if __name__ == "__main__":
    main()
