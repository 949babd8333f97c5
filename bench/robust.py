"""Robust recovery across models (issue 21): what makes EBFT's CPU presets ruin Gemma-3-270M, one lever at a time.

Every row prunes a model with Wanda from `wiki` calibration windows and recovers it with EBFT in the interleaved
order (the `prune --recover ebft` path), then measures wiki and books perplexity and the model guard's held-out
loss (pruned-only against recovered, on windows drawn after the calibration ones). A row is
``MODEL:SPARSITY:NxL:LEVER``; the lever ``pruned`` is the row's baseline, any other lever is a preset with options:

    .venv/bin/python bench/robust.py --list
    .venv/bin/python bench/robust.py --jobs 2 --threads 1 --rows gemma:0.5:16x256:cpu,gemma:0.5:16x256:pruned

Writes bench/results/robust.{json,md}; ``--merge`` keeps the rows measured before. Run it alone on idle cores.
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
# Each lever changes one thing of a preset (the presets as they stood when issue 21 was filed: cpu = lr 3e-3,
# 8 epochs, batch 2, 2 held out, the mix target; quick = the same with 4 epochs).
LEVERS: dict[str, dict] = {
    "pruned": {},
    "cpu": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-3},
    "quick": {"preset": "quick", "lr_scale": "absolute", "lr": 3e-3},
    "cpu-sparse-path": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-3, "target": "sparse-path"},
    "cpu-lr3e-4": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-4},
    "cpu-lr1e-3": {"preset": "cpu", "lr_scale": "absolute", "lr": 1e-3},
    "cpu-block-rms": {"preset": "cpu", "lr_scale": "block-rms", "lr": 1.6e-2},
    "cpu-tensor-rms": {"preset": "cpu", "lr_scale": "tensor-rms", "lr": 1.6e-2},
    "cpu-freeze-norms": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-3, "train_norms": False},
    "cpu-token-relative": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-3, "loss": "token-relative"},
    "cpu-heldout4": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-3, "heldout": 4},
    "cpu-epochs2": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-3, "epochs": 2},
    "cpu-warmup": {"preset": "cpu", "lr_scale": "absolute", "lr": 3e-3, "warmup": 0.1},
    "cpu-tensor-rms-warmup": {"preset": "cpu", "lr_scale": "tensor-rms", "lr": 1.6e-2, "warmup": 0.1},
    "quick-tensor-rms": {"preset": "quick", "lr_scale": "tensor-rms", "lr": 1.6e-2},
    "quick-tensor-rms-warmup": {"preset": "quick", "lr_scale": "tensor-rms", "lr": 1.6e-2, "warmup": 0.1},
    # The relative rate and warm-up at their full rate whatever the steps (the presets before rate_for_steps).
    "cpu-full-rate": {"preset": "cpu"},
    "quick-full-rate": {"preset": "quick"},
    # quick's 10 % warm-up is 2 steps at 16 x 256 (28 steps): a warm-up of at least 5 steps (cpu's there), a lower rate.
    "quick-warmup5": {"preset": "quick", "warmup_steps": 5},
    "quick-lr8e-3": {"preset": "quick", "lr": 8e-3},
    "quick-lr8e-3-warmup5": {"preset": "quick", "lr": 8e-3, "warmup_steps": 5},
}
# Every lever above is a fixed rate, whatever the steps; the presets as they are now (recover/ebft.py PRESETS, the
# rate scaled down for fits of fewer than 124 steps) are the rows that check them on every model.
for _lever in LEVERS.values():
    if _lever:
        _lever.setdefault("full_rate_steps", 0)
LEVERS.update({"new-cpu": {"preset": "cpu"}, "new-quick": {"preset": "quick"}})


def parse_row(name: str) -> tuple[str, float, str, int, int, str]:
    model, sparsity, shape, lever = name.split(":")
    n, length = (int(x) for x in shape.split("x"))
    pattern = sparsity.replace("-", ":") if "-" in sparsity else "unstructured"  # 2-4: the N:M pattern 2:4
    return model, 0.5 if pattern != "unstructured" else float(sparsity), pattern, n, length, lever


def baseline_of(name: str) -> str:
    return ":".join([*name.split(":")[:3], "pruned"])


def measure(args: argparse.Namespace, name: str) -> dict:
    from sparsefit.app import guard
    from sparsefit.app.jobs import evaluate_model, prune_interleaved
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load
    from sparsefit.prune import PruneConfig
    from sparsefit.recover import get_method

    cpu = torch.device("cpu")
    if name.endswith(":dense"):
        model_key, lever = name.split(":")[0], "dense"
    else:
        model_key, sparsity, pattern, nsamples, seqlen, lever = parse_row(name)
    loaded = load(MODELS[model_key])

    def evaluate(model) -> dict:
        res = evaluate_model(model, loaded.tokenizer, ppl=["wiki", "books"], seqlen=args.eval_seqlen,
                             max_tokens=args.max_tokens)  # fmt: skip
        return {k: v["value"] for k, v in res["ppl"].items()}

    if lever == "dense":
        return {"status": "ok", "ppl": evaluate(loaded.model), "peak_rss_mb": peak_rss_mb()}
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), nsamples, seqlen, 0)
    windows = guard.guard_windows(loaded.tokenizer, get_corpus("wiki"), nsamples, seqlen, 0, calib)
    config = PruneConfig(method="wanda", sparsity=sparsity, pattern=pattern, nsamples=nsamples, seqlen=seqlen,
                         device="cpu")  # fmt: skip
    result: dict = {"status": "ok"}
    cpu_began = time.process_time()
    if lever == "pruned":
        prune_interleaved(loaded.model, calib, config)
        result["guard_loss"] = guard.lm_loss(loaded.model, windows, cpu)
    else:
        ebft = get_method("ebft")
        ebft_config = ebft.configure(LEVERS[lever], nsamples, cpu)
        pruned = guard.PrunedBlocks()
        walked = prune_interleaved(loaded.model, calib, config, ebft, ebft_config, pruned=pruned)
        report = ebft.summarize(ebft_config, walked["blocks"], ebft.blocks_of(loaded.model))
        blocks = report["blocks"]
        result["cpu_min"] = (time.process_time() - cpu_began) / 60
        modules = ebft.blocks_of(loaded.model)
        # "warn": the row measures what recovery did, so the recovered model stays whatever the guard says.
        states = pruned.states(len(modules))
        verdict = guard.check_recovery(loaded.model, modules, states, windows, "warn", cpu)
        result["guard"] = verdict.to_dict()
        # The guard's reference on the test text too: the same masks, the weights before recovery. Whether the
        # guard's verdict on its held-out windows agrees with the test perplexity is what this column checks.
        guard.swap(modules, states)
        result["ppl_pruned_only"] = evaluate(loaded.model)
        guard.swap(modules, states)
        result["ebft"] = {
            "config": report["config"],
            "backed_off": sum(b["attempts"] > 1 for b in blocks),
            "kept_as_pruned": sum(b["reverted"] for b in blocks),
            "train_reduction": sum(1 - b["final_loss"] / b["initial_loss"] for b in blocks) / len(blocks),
            "heldout_reduction": sum(1 - b["final_heldout"] / b["initial_heldout"] for b in blocks
                                     if b.get("initial_heldout")) / len(blocks),  # fmt: skip
            "first_epoch_rise": sum(bool(b["train_curve"]) and b["train_curve"][0] > b["initial_loss"]
                                    for b in blocks),  # fmt: skip
        }
    result["ppl"] = evaluate(loaded.model)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def report(args: argparse.Namespace, dense: dict, runs: dict[str, dict]) -> None:
    from sparsefit.app.reports import gap_closed

    rows = []
    for name, r in sorted(runs.items()):
        if r.get("status") != "ok":
            rows.append([name, "failed", r.get("error", "")] + [""] * 8)
            continue
        model = name.split(":")[0]
        d = dense.get(model, {}).get("ppl")
        base = runs.get(baseline_of(name), {})
        cells = {}
        for corpus in ("wiki", "books"):
            q = r["ppl"][corpus]
            if d and base.get("status") == "ok" and not name.endswith(":pruned"):
                share = gap_closed(d[corpus], base["ppl"][corpus], q, log=True)
                cells[corpus] = f"{q:.1f} ({share:.0%})"
            else:
                cells[corpus] = f"{q:.1f}"
        g, e = r.get("guard", {}), r.get("ebft", {})
        own = r.get("ppl_pruned_only")
        own_cell = f"{own['wiki']:.1f} / {own['books']:.1f}" if own else ""
        guard_cell = (f"{g['pruned_loss']:.3f} -> {g['recovered_loss']:.3f}{' WORSE' if g['worse'] else ''}"
                      if g else f"{r.get('guard_loss', 0):.3f}")  # fmt: skip
        rows.append([
            name, cells["wiki"], cells["books"], own_cell, guard_cell,
            f"{e['train_reduction']:.0%} / {e['heldout_reduction']:.0%}" if e else "",
            f"{e['backed_off']}/{e['kept_as_pruned']}/{e['first_epoch_rise']}" if e else "",
            f"{r['cpu_min']:.1f}" if "cpu_min" in r else "", round(r["peak_rss_mb"]),
        ])  # fmt: skip
    dense_text = ", ".join(f"{m}: wiki {v['ppl']['wiki']:.2f}, books {v['ppl']['books']:.2f}"
                           for m, v in dense.items() if v.get("status") == "ok")  # fmt: skip
    threads = f"{args.threads} torch thread(s) per process" if args.threads else "torch's default threads"
    notes = (
        f"2 CPU cores, torch {torch.__version__}, {args.jobs} row(s) at a time, {threads}. Rows are "
        "MODEL:SPARSITY:NxL:LEVER (Wanda, `wiki` calibration N x L, interleaved prune + EBFT). Perplexity on the "
        f"first {args.max_tokens} test tokens at seqlen {args.eval_seqlen} (in brackets: share of the "
        f"log-perplexity gap closed against the row's pruned model); dense: {dense_text}. Guard: the whole model's "
        "next-token loss on held-out windows of `wiki` drawn after the calibration ones (4,096 tokens), pruned-only "
        "-> recovered; its pruned-only model (the interleaved walk's masks, the weights before recovery) is what the "
        "guard compares with and falls back to. Block fit: mean reduction of each block's training / held-out "
        "reconstruction error. Blocks: backed off / kept as pruned / training loss above its start after the first "
        "epoch. CPU-min: process CPU time of prune + recover."
    )
    header = ["row", "wiki ppl", "books ppl", "its pruned-only wiki / books", "guard loss",
              "block fit train / held-out", "blocks", "CPU-min", "peak RSS MB"]  # fmt: skip
    write_results("robust", {"setting": vars(args), "dense": dense, "runs": runs}, header, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--rows", default="", help="comma-separated rows; their pruned baselines are added")
    parser.add_argument("--list", action="store_true")
    add_row_options(parser, "robust.json")
    args = parser.parse_args()
    if args.list:
        print("rows: MODEL:SPARSITY:NxL:LEVER with MODEL in", ", ".join(MODELS), "and SPARSITY 0.5, 0.7 or 2-4 (2:4)")
        for name, options in LEVERS.items():
            print(f"  {name:20} {json.dumps(options)}")
        return
    if args.one:
        print(json.dumps(measure(args, args.one[0])))
        return
    names = [n for n in args.rows.split(",") if n]
    for name in names:
        parts = name.split(":")
        if len(parts) != 4 or parts[0] not in MODELS or parts[3] not in LEVERS:
            sys.exit(f"row {name!r} is not MODEL:SPARSITY:NxL:LEVER; see --list")
    stored = stored_results("robust", args.merge)
    done = {k for k, v in stored.get("runs", {}).items() if v.get("status") == "ok"}
    names = list(dict.fromkeys([baseline_of(n) for n in names if baseline_of(n) not in done] + names))
    passed = ["--eval-seqlen", str(args.eval_seqlen), "--max-tokens", str(args.max_tokens)]
    dense = dict(stored.get("dense", {}))
    jobs = {n: [n] for n in names}
    for model in sorted({n.split(":")[0] for n in names} - set(dense)):
        jobs[f"{model}:dense"] = [f"{model}:dense"]

    def on_done(runs: dict) -> None:
        for key in [k for k in runs if k.endswith(":dense")]:
            dense[key.split(":")[0]] = runs[key]
        measured = {k: v for k, v in runs.items() if not k.endswith(":dense")}
        now = stored_results("robust", args.merge)
        kept = {k: v for k, v in now.get("runs", {}).items() if k not in measured}
        report(args, dense, {**kept, **measured})

    run_many(__file__, passed, jobs, args.jobs, args.threads, on_done)


if __name__ == "__main__":
    main()
