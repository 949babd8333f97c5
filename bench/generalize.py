"""Does recovery generalize (issue 33)? To the corpus it did not calibrate on, and to contexts longer than its windows.

Every row prunes a model with Wanda and recovers it with EBFT in one interleaved walk (the `prune --recover ebft`
path), keeping each block as pruned beside it (the model guard's reference: the same masks, the weights before any
recovery step). Both models are then evaluated on `wiki` and `books` at the calibration length and at 2x and 4x it
(within the model's positions), and the model guard measures both on held-out windows of the calibration corpus at
the length `make run`'s guard takes (the evaluation's 1,024 tokens, within the model's positions). A row is
``MODEL:SPARSITY:NxL:CALIB:PRESET`` (CALIB a corpus or a mix such as wiki+books; PRESET an EBFT preset, with
options after slashes: ``cpu/batch_size=1``):

    .venv/bin/python bench/generalize.py --jobs 2 --threads 1 --rows gemma:0.5:16x256:wiki:cpu,gemma:0.5:8x512:wiki:cpu

Writes bench/results/generalize.{json,md}; ``--merge`` keeps the rows measured before. Run it alone on idle cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from common import add_row_options, peak_rss_mb, run_many, stored_results, write_results  # noqa: E402

MODELS = {"gemma": "gemma3-270m", "smollm2": "smollm2-135m"}
CORPORA = ("wiki", "books")
FACTORS = (1, 2, 4)  # evaluation lengths, in calibration lengths


def parse_row(name: str) -> tuple[str, float, str, int, int, str, str]:
    model, sparsity, shape, calib, preset = name.split(":")
    n, length = (int(x) for x in shape.split("x"))
    pattern = sparsity.replace("-", ":") if "-" in sparsity else "unstructured"  # 2-4: the N:M pattern 2:4
    return model, 0.5 if pattern != "unstructured" else float(sparsity), pattern, n, length, calib, preset


def lengths_for(model, seqlen: int) -> list[int]:
    positions = getattr(model.config, "max_position_embeddings", None) or 10**9
    return [seqlen * f for f in FACTORS if seqlen * f <= positions]


def measure(args: argparse.Namespace, name: str) -> dict:
    from sparsefit.app import guard
    from sparsefit.app.jobs import evaluate_model, prune_interleaved
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load
    from sparsefit.prune import PruneConfig
    from sparsefit.recover import get_method

    cpu = torch.device("cpu")
    model_key, sparsity, pattern, nsamples, seqlen, calib_name, preset = parse_row(name)
    loaded = load(MODELS[model_key])
    lengths = lengths_for(loaded.model, seqlen)

    def evaluate(model) -> dict:
        values = {}
        for length in lengths:
            res = evaluate_model(model, loaded.tokenizer, ppl=list(CORPORA), seqlen=length, max_tokens=args.max_tokens)
            values.update({f"{corpus}@{length}": v["value"] for corpus, v in res["ppl"].items()})
        return values

    dense_ppl = evaluate(loaded.model)
    corpus = get_corpus(calib_name)
    calib = calibration_windows(loaded.tokenizer, corpus, nsamples, seqlen, 0)
    guard_length = guard.guard_length(loaded.model.config, seqlen)
    windows = guard.guard_windows(loaded.tokenizer, corpus, nsamples, seqlen, 0, calib, guard_length)
    short = guard.guard_windows(loaded.tokenizer, corpus, nsamples, seqlen, 0, calib)  # the former guard's windows
    dense_loss = guard.lm_loss(loaded.model, windows, cpu)
    config = PruneConfig(method="wanda", sparsity=sparsity, pattern=pattern, nsamples=nsamples, seqlen=seqlen,
                         calib=calib_name, device="cpu")  # fmt: skip
    ebft = get_method("ebft")
    from sparsefit.app.recipe import load_yaml

    preset, *options = preset.split("/")  # cpu/batch_size=1: a preset with options
    ebft_config = ebft.configure({"preset": preset, **{k: load_yaml(v) for k, v in (o.split("=") for o in options)}},
                                 nsamples, cpu)  # fmt: skip
    pruned = guard.PrunedBlocks()
    began = time.process_time()
    prune_interleaved(loaded.model, calib, config, ebft, ebft_config, pruned=pruned)
    cpu_min = (time.process_time() - began) / 60
    modules = ebft.blocks_of(loaded.model)
    states = pruned.states(len(modules))
    verdict = guard.check_recovery(loaded.model, modules, states, windows, "warn", cpu, dense_loss)
    short_verdict = guard.check_recovery(loaded.model, modules, states, short, "warn", cpu)
    recovered_ppl = evaluate(loaded.model)
    guard.swap(modules, states)
    pruned_ppl = evaluate(loaded.model)
    return {"status": "ok", "lengths": lengths, "dense": dense_ppl, "pruned": pruned_ppl, "recovered": recovered_ppl,
            "guard": verdict.to_dict(), "guard_at_calibration_length": short_verdict.to_dict(), "cpu_min": cpu_min,
            "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def report(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    from sparsefit.app.reports import gap_closed

    rows = []
    for name, r in sorted(runs.items()):
        if r.get("status") != "ok":
            rows.append([name, "failed", r.get("error", ""), "", "", ""])
            continue
        cells = []
        for corpus in CORPORA:
            parts = []
            for length in r["lengths"]:
                key = f"{corpus}@{length}"
                share = gap_closed(r["dense"][key], r["pruned"][key], r["recovered"][key], log=True)
                parts.append(f"{length}: {r['pruned'][key]:.1f} -> {r['recovered'][key]:.1f} "
                             f"({'n/a' if share is None else f'{share:.0%}'})")  # fmt: skip
            cells.append("; ".join(parts))
        g, s = r["guard"], r["guard_at_calibration_length"]

        def verdict(v: dict) -> str:
            return (f"{v['windows']} x {v['tokens'] // v['windows']}: {v['pruned_loss']:.3f} -> "
                    f"{v['recovered_loss']:.3f}{' WORSE' if v['worse'] else ''}")  # fmt: skip

        rows.append([name, *cells, verdict(s), verdict(g), f"{r['cpu_min']:.1f}"])
    notes = (
        f"2 CPU cores, torch {torch.__version__}, {args.jobs} row(s) at a time, "
        f"{f'{args.threads} torch thread(s) per process' if args.threads else 'torch default threads'}. Rows are "
        "MODEL:SPARSITY:NxL:CALIB:PRESET (Wanda, calibration N x L of CALIB, interleaved prune + EBFT). Perplexity on "
        f"the first {args.max_tokens} test tokens of each corpus at 1x, 2x and 4x the calibration length, pruned-only "
        "-> recovered (the same walk's blocks before and after recovery), in brackets the share of the log-perplexity "
        "gap to dense closed. Guard: the whole model's next-token loss on held-out windows of the calibration corpus, "
        "pruned-only -> recovered, at the calibration length (the guard before issue 33) and at the evaluation's "
        "1,024 tokens within the model's positions (the guard now; WORSE: it falls back). CPU-min: prune + recover."
    )
    header = ["row", "wiki: length: pruned -> recovered (gap closed)", "books", "guard at the calibration length",
              "guard now", "CPU-min"]  # fmt: skip
    write_results("generalize", {"setting": vars(args), "runs": runs}, header, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--rows", default="", help="comma-separated rows")
    add_row_options(parser, "generalize.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one[0])))
        return
    names = [n for n in args.rows.split(",") if n]
    for name in names:
        parts = name.split(":")
        if len(parts) != 5 or parts[0] not in MODELS:
            sys.exit(f"row {name!r} is not MODEL:SPARSITY:NxL:CALIB:PRESET with MODEL in {', '.join(MODELS)}")

    def on_done(runs: dict) -> None:
        stored = stored_results("generalize", args.merge).get("runs", {})
        report(args, {**{k: v for k, v in stored.items() if k not in runs}, **runs})

    run_many(__file__, ["--max-tokens", str(args.max_tokens)], {n: [n] for n in names}, args.jobs, args.threads,
             on_done)  # fmt: skip


if __name__ == "__main__":
    main()
