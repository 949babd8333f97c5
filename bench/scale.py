"""Peak memory and time against model depth on the streamed path: memory must stay flat, time grow linearly.

Each depth (same width; default 7B-shaped: hidden 4096, MLP 11008, 32 heads, vocab 32000) is a random-weight Llama
written as shards (one tensor in memory at a time), then pruned with Wanda and EBFT-recovered through
``run_prune`` in a fresh process, which reports its own peak RSS. Writes ``bench/results/scale.{json,md}``.

    .venv/bin/python bench/scale.py                                     # 8 / 16 / 32 blocks at 7B width
    .venv/bin/python bench/scale.py --hidden 256 --depths 8 --vocab 260  # a smoke run in seconds
    .venv/bin/python bench/scale.py --hidden 1024 --depths 64 --blocks-per-shard 16 --two-step --name scale_recover

Disk: at 7B width a float32 block is 0.8 GB; each depth needs about 3x the model (source, finished blocks,
output): ~80 GB for 32 blocks. Run it alone: the numbers are times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb, run_isolated, write_results


def write_random_model(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, vocab: int,
                       blocks_per_shard: int = 4) -> int:  # fmt: skip
    """A random-weight Llama as shards of ``blocks_per_shard`` blocks, written one tensor at a time; its bytes."""
    from sparsefit.random_checkpoint import write_random_llama

    return write_random_llama(folder, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                              vocab=vocab, blocks_per_shard=blocks_per_shard)  # fmt: skip


def one(args) -> dict:
    """Child process: build the model, prune + recover it streamed, report peak RSS and time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_byte_tokenizer
    from sparsefit.app.jobs import run_prune, run_recover
    from sparsefit.prune import PruneConfig

    root = Path(tempfile.mkdtemp(dir=args.workdir, prefix="scale-"))
    try:
        size = write_random_model(root / "model", args.one, args.hidden, args.intermediate, args.heads, args.vocab,
                                  args.blocks_per_shard)  # fmt: skip
        make_byte_tokenizer().save_pretrained(root / "model")
        corpus = root / "corpus.txt"
        corpus.write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps over a lazy dog " * 200
                                      for i in range(64)))  # fmt: skip
        before = peak_rss_mb()
        config = PruneConfig(method="wanda", sparsity=0.5, calib=str(corpus), nsamples=args.nsamples,
                             seqlen=args.seqlen, batch_size=args.batch, device=args.device)  # fmt: skip
        began = time.perf_counter()
        options = {"preset": "cpu", "epochs": args.epochs, "heldout": 0, "batch_size": args.batch}
        if args.two_step:  # issue 22's shape: prune, then `recover --method ebft` of the run folder, measured alone
            run_prune(str(root / "model"), config, root / "pruned")
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
            before, began = peak_rss_mb(), time.perf_counter()
            run = run_recover(root / "pruned", root / "out", "ebft", options, nsamples=args.nsamples,
                              seqlen=args.seqlen, batch_size=args.batch, device=args.device)  # fmt: skip
        else:
            run = run_prune(str(root / "model"), config, root / "out", recover="ebft", recover_options=options)
        seconds = time.perf_counter() - began
        return {"status": "ok", "blocks": args.one, "model_gib": size / 2**30, "peak_rss_mib": peak_rss_mb(),
                "peak_rss_before_walk_mib": before, "time_s": seconds, "s_per_block": seconds / args.one,
                "streamed": run["memory"]["streamed"]}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="8,16,32")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 11008 at 4096, else 8/3 hidden")
    parser.add_argument("--heads", type=int, default=None, help="default: hidden / 128, at least 4")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--blocks-per-shard", type=int, default=4)
    parser.add_argument("--name", default="scale", help="results file name under bench/results")
    parser.add_argument("--two-step", action="store_true",
                        help="prune, then recover the run folder with EBFT (`recover`); the peak is the recovery's "
                             "(the peak is reset after the pruning)")  # fmt: skip
    parser.add_argument("--workdir", default=None, help="where the models are written (default: the temp folder)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.intermediate = args.intermediate or (11008 if args.hidden == 4096 else 8 * args.hidden // 3)
    args.heads = args.heads or max(args.hidden // 128, 4)
    if args.one is not None:
        print(json.dumps(one(args)))
        return
    options = list(sys.argv[1:])
    results = {}
    for depth in [int(d) for d in args.depths.split(",")]:
        results[depth] = run_isolated(__file__, options, [str(depth)])
        print(f"{depth} blocks: {results[depth]}", file=sys.stderr, flush=True)
    rows = [[depth, f"{r.get('model_gib', 0):.2f}", f"{r.get('peak_rss_mib', 0):.0f}", f"{r.get('time_s', 0):.1f}",
             f"{r.get('s_per_block', 0):.2f}", r.get("status")] for depth, r in results.items()]  # fmt: skip
    how = ("Streamed Wanda 50%, then `recover --method ebft` of the run folder (1 epoch; the peak is the "
           "recovery's)" if args.two_step else "Streamed Wanda 50% + EBFT (1 epoch)")
    notes = (f"{how}, {args.blocks_per_shard} blocks per shard, hidden {args.hidden}, MLP {args.intermediate}, "
             f"vocab {args.vocab}, "
             f"{args.nsamples} x {args.seqlen} calibration tokens, device {args.device}. Peak RSS of the whole process "
             "(Python, torch and transformers take ~370 MiB): flat in depth; time: linear in depth.")  # fmt: skip
    write_results(args.name, {"settings": vars(args), "results": results},
                  ["blocks", "model GiB", "peak RSS MiB", "time s", "s / block", "status"], rows, notes)


if __name__ == "__main__":
    main()
