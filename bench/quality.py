"""Recovery quality against CPU time on SmolLM2: the levers of issue 13, one row each, same clock.

Every row prunes SmolLM2 with Wanda (or SparseGPT, or OWL's per-block sparsities) from the same `wiki`
calibration windows and recovers in the interleaved order of record (each block pruned from the recovered
model's own inputs, then trained). A row changes levers against a base of 60 steps per block (the former `quick`):
steps and schedule, the calibration count x length, the reconstruction window (a sub-block, 1, 2 or 4 blocks),
the target, the masks, which parameters train, and EBFT followed by a short global SquareHead pass (masks fixed).

    .venv/bin/python bench/quality.py --list                       # the rows
    .venv/bin/python bench/quality.py --rows 70-pruned,70-cpu      # some rows
    .venv/bin/python bench/quality.py --jobs 2 --threads 1         # every row, two one-thread processes

Each row reports wiki and books perplexity, the share of the pruned-to-dense gap closed (linear and in
log-perplexity) against the row's own pruned baseline, the recovery's CPU-minutes (process CPU time of the
prune + recover walk and the global pass; with one thread per process this is the time on one core), and
the process's peak memory. Writes bench/results/quality.{json,md} and the frontier chart quality.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from common import RESULTS, add_row_options, peak_rss_mb, run_isolated, run_many, stored_results, write_results  # noqa: E402

# name: (prune settings, calibration, EBFT options or None, global SquareHead options or None, baseline row)
W70 = {"method": "wanda", "sparsity": 0.7}
W24 = {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}
# The base every row changes one lever of: lr 1e-3, 4 epochs, batch 2, 2 held out, which was the `cpu` preset when
# the first rows were measured and then `quick`; rows named "-cpu" are this base. The rate is named because
# `quick` moved to 3e-3 with calibration 64 x 128 from this table: its rows are "-calib64x128-lr3e-3".
CPU = {"preset": "quick", "lr": 1e-3, "target": "sparse-path", "lr_scale": "absolute"}  # as measured (issue 21)
REL = {**CPU, "loss": "token-relative"}
SQH = {"preset": "cpu"}
ROWS: dict[str, dict] = {
    "70-pruned": {"prune": W70},
    "70-cpu": {"prune": W70, "ebft": CPU},
    "70-quick": {"prune": W70, "ebft": {**CPU, "epochs": 2}},
    "70-relative": {"prune": W70, "ebft": {**REL}},
    "70-relative-quick": {"prune": W70, "ebft": {**REL, "epochs": 2}},
    "70-relative-epochs8": {"prune": W70, "ebft": {**REL, "epochs": 8}},
    "70-relative-lr3e-3": {"prune": W70, "ebft": {**REL, "lr": 3e-3}},
    "70-relative-sub-block": {"prune": W70, "ebft": {**REL, "window": "sub-block"}},
    "70-relative-window2": {"prune": W70, "ebft": {**REL, "window": 2}},
    "70-relative+squarehead": {"prune": W70, "ebft": REL, "global": SQH},
    "70-epochs8": {"prune": W70, "ebft": {**CPU, "epochs": 8}},
    "70-lr3e-3": {"prune": W70, "ebft": {**CPU, "lr": 3e-3}},
    "70-lr3e-4": {"prune": W70, "ebft": {**CPU, "lr": 3e-4}},
    "70-cosine-warmup": {"prune": W70, "ebft": {**CPU, "schedule": "cosine", "warmup": 0.1}},
    "70-batch4": {"prune": W70, "ebft": {**CPU, "batch_size": 4, "epochs": 8}},
    "70-calib64x128": {"prune": W70, "calib": (64, 128), "ebft": CPU},
    "70-calib128x256": {"prune": W70, "calib": (128, 256), "ebft": {**CPU, "epochs": 1}},
    "70-sub-block": {"prune": W70, "ebft": {**CPU, "window": "sub-block"}},
    "70-window2": {"prune": W70, "ebft": {**CPU, "window": 2}},
    "70-window4": {"prune": W70, "ebft": {**CPU, "window": 4}},
    "70-dense-path": {"prune": W70, "ebft": {**CPU, "target": "dense-path"}},
    "70-linears-only": {"prune": W70, "ebft": {**CPU, "train_norms": False}},
    "70-no-decay": {"prune": W70, "ebft": {**CPU, "weight_decay": 0.0}},
    "70-sparsegpt-pruned": {"prune": {**W70, "method": "sparsegpt"}},
    "70-sparsegpt": {"prune": {**W70, "method": "sparsegpt"}, "ebft": CPU, "baseline": "70-sparsegpt-pruned"},
    "70-sparsegpt-masks-pruned": {"prune": {**W70, "method": "sparsegpt", "sparsegpt_update": False}},
    "70-sparsegpt-masks": {"prune": {**W70, "method": "sparsegpt", "sparsegpt_update": False}, "ebft": CPU,
                           "baseline": "70-sparsegpt-masks-pruned"},
    "70-owl-pruned": {"prune": {**W70, "owl_lambda": 0.08}},
    "70-owl": {"prune": {**W70, "owl_lambda": 0.08}, "ebft": CPU, "baseline": "70-owl-pruned"},
    "70-sparsegpt+squarehead": {"prune": {**W70, "method": "sparsegpt"}, "ebft": CPU, "global": SQH,
                                "baseline": "70-sparsegpt-pruned"},
    "70-sparsegpt-window2+squarehead": {"prune": {**W70, "method": "sparsegpt"}, "ebft": {**CPU, "window": 2},
                                        "global": SQH, "baseline": "70-sparsegpt-pruned"},
    "70-squarehead": {"prune": W70, "global": SQH},
    "70-cpu+squarehead": {"prune": W70, "ebft": CPU, "global": SQH},
    "70-window2+squarehead": {"prune": W70, "ebft": {**CPU, "window": 2}, "global": SQH},
    "70-window2-epochs8+squarehead": {"prune": W70, "ebft": {**CPU, "window": 2, "epochs": 8}, "global": SQH},
    "70-calib64x128-pruned": {"prune": W70, "calib": (64, 128)},
    "70-calib64x128-lr3e-3": {"prune": W70, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3}},
    "70-calib64x128-lr3e-3-epochs8": {"prune": W70, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3, "epochs": 8}},
    "70-calib64x128-lr3e-3-window2-epochs8+squarehead": {
        "prune": W70, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3, "window": 2, "epochs": 8}, "global": SQH},
    "70-calib64x128-lr3e-3+squarehead": {"prune": W70, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3},
                                         "global": SQH},
    "70-calib64x128-lr3e-3-dense-path": {"prune": W70, "calib": (64, 128),
                                         "ebft": {**CPU, "lr": 3e-3, "target": "dense-path"}},
    "70-calib64x128-lr3e-3-mix": {"prune": W70, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3, "target": "mix"}},
    "70-calib64x128-lr3e-3-mix0.25": {"prune": W70, "calib": (64, 128),
                                      "ebft": {**CPU, "lr": 3e-3, "target": "mix:0.25"}},
    "70-calib64x128-lr3e-3-mix0.75": {"prune": W70, "calib": (64, 128),
                                      "ebft": {**CPU, "lr": 3e-3, "target": "mix:0.75"}},
    "70-calib64x128-lr3e-3-mix-epochs8": {"prune": W70, "calib": (64, 128),
                                          "ebft": {**CPU, "lr": 3e-3, "target": "mix", "epochs": 8}},
    "70-calib128x128-lr3e-3-mix": {"prune": W70, "calib": (128, 128), "ebft": {**CPU, "lr": 3e-3, "target": "mix"}},
    "70-calib128x128-lr3e-3-mix-epochs6": {"prune": W70, "calib": (128, 128),
                                           "ebft": {**CPU, "lr": 3e-3, "target": "mix", "epochs": 6}},
    "70-calib128x128-pruned": {"prune": W70, "calib": (128, 128)},
    "70-calib128x128-lr3e-3": {"prune": W70, "calib": (128, 128), "ebft": {**CPU, "lr": 3e-3}},
    "70-calib256x128-pruned": {"prune": W70, "calib": (256, 128)},
    "70-calib256x128-lr3e-3-mix-epochs2": {"prune": W70, "calib": (256, 128),
                                           "ebft": {**CPU, "lr": 3e-3, "target": "mix", "epochs": 2}},
    "70-calib256x128-lr3e-3-epochs2": {"prune": W70, "calib": (256, 128), "ebft": {**CPU, "lr": 3e-3, "epochs": 2}},
    "2:4-pruned": {"prune": W24},
    "2:4-calib128x128-pruned": {"prune": W24, "calib": (128, 128)},
    "2:4-calib128x128-lr3e-3": {"prune": W24, "calib": (128, 128), "ebft": {**CPU, "lr": 3e-3}},
    "2:4-calib64x128-pruned": {"prune": W24, "calib": (64, 128)},
    "2:4-calib256x128-pruned": {"prune": W24, "calib": (256, 128)},
    "2:4-calib256x128-lr3e-3-mix-epochs2": {"prune": W24, "calib": (256, 128),
                                            "ebft": {**CPU, "lr": 3e-3, "target": "mix", "epochs": 2}},
    "2:4-calib64x128-lr3e-3": {"prune": W24, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3}},
    "2:4-calib64x128-lr3e-3-epochs8": {"prune": W24, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3, "epochs": 8}},
    "2:4-calib64x128-lr3e-3-window2-epochs8+squarehead": {
        "prune": W24, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3, "window": 2, "epochs": 8}, "global": SQH},
    "2:4-calib64x128-lr3e-3-dense-path": {"prune": W24, "calib": (64, 128),
                                          "ebft": {**CPU, "lr": 3e-3, "target": "dense-path"}},
    "2:4-calib64x128-lr3e-3-mix": {"prune": W24, "calib": (64, 128), "ebft": {**CPU, "lr": 3e-3, "target": "mix"}},
    "2:4-calib64x128-lr3e-3-mix-epochs8": {"prune": W24, "calib": (64, 128),
                                           "ebft": {**CPU, "lr": 3e-3, "target": "mix", "epochs": 8}},
    "2:4-calib128x128-lr3e-3-mix": {"prune": W24, "calib": (128, 128), "ebft": {**CPU, "lr": 3e-3, "target": "mix"}},
    "2:4-cpu": {"prune": W24, "ebft": CPU},
    "2:4-relative": {"prune": W24, "ebft": REL},
    "2:4-sub-block": {"prune": W24, "ebft": {**CPU, "window": "sub-block"}},
    "2:4-cpu+squarehead": {"prune": W24, "ebft": CPU, "global": SQH},
    "2:4-window2": {"prune": W24, "ebft": {**CPU, "window": 2}},
    "2:4-window2+squarehead": {"prune": W24, "ebft": {**CPU, "window": 2}, "global": SQH},
    "2:4-sparsegpt-pruned": {"prune": {**W24, "method": "sparsegpt"}},
    "2:4-sparsegpt": {"prune": {**W24, "method": "sparsegpt"}, "ebft": CPU, "baseline": "2:4-sparsegpt-pruned"},
    "2:4-sparsegpt+squarehead": {"prune": {**W24, "method": "sparsegpt"}, "ebft": CPU, "global": SQH,
                                 "baseline": "2:4-sparsegpt-pruned"},
}


def wanda_baseline_of(name: str) -> str:
    """The Wanda-pruned row of a row's sparsity (``70-pruned``, ``2:4-pruned``)."""
    return f"{name.split('-')[0]}-pruned"


def baseline_of(name: str, run: dict | None = None) -> str:
    """The row whose pruned model a row's gap is measured against (same masks method, same calibration).

    Named in the row, else Wanda pruned from the row's calibration shape (``70-calib64x128-pruned``) when the
    table has it, else Wanda pruned from the default windows.

    A stored row this file no longer (or not yet) names keeps the baseline stored with it: another --merge run
    of a newer file may have written it.
    """
    if name not in ROWS:
        return (run or {}).get("baseline", wanda_baseline_of(name))
    row = ROWS[name]
    if "baseline" in row:
        return row["baseline"]
    # A row with its own calibration shape against Wanda pruned from the same windows, where that row exists.
    own = f"{name.split('-')[0]}-calib{row['calib'][0]}x{row['calib'][1]}-pruned" if "calib" in row else None
    return own if own in ROWS and own != name else wanda_baseline_of(name)


def measure(args: argparse.Namespace, name: str) -> dict:
    import copy

    from sparsefit.app.jobs import evaluate_model, prune_interleaved
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load
    from sparsefit.prune import PruneConfig, parse_pattern
    from sparsefit.recover import RecoveryContext, get_method

    cpu = torch.device("cpu")
    loaded = load(args.model)

    def evaluate(model) -> dict:
        res = evaluate_model(model, loaded.tokenizer, ppl=["wiki", "books"], seqlen=args.eval_seqlen,
                             max_tokens=args.max_tokens)  # fmt: skip
        return {k: v["value"] for k, v in res["ppl"].items()}

    if name == "dense":
        return {"status": "ok", "ppl": evaluate(loaded.model), "peak_rss_mb": peak_rss_mb()}
    row = ROWS[name]
    nsamples, seqlen = row.get("calib", (args.nsamples, args.seqlen))
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), nsamples, seqlen, 0)
    config = PruneConfig(**{"nsamples": nsamples, "seqlen": seqlen, "device": "cpu", **row["prune"]})
    dense = copy.deepcopy(loaded.model) if row.get("global") else None
    student = loaded.model
    result: dict = {"status": "ok", "row": row}
    cpu_began, began = time.process_time(), time.perf_counter()
    if row.get("ebft"):
        ebft = get_method("ebft")
        ebft_config = ebft.configure(row["ebft"], nsamples, cpu)
        walked = prune_interleaved(student, calib, config, ebft, ebft_config)
        report = ebft.summarize(ebft_config, walked["blocks"], ebft.blocks_of(student))
        blocks = report["blocks"]
        result["ebft"] = {
            "config": report["config"],
            "backed_off": sum(b["attempts"] > 1 for b in blocks),
            "kept_as_pruned": sum(b["reverted"] for b in blocks),
            "mse_reduction": sum(1 - b["final_loss"] / b["initial_loss"] for b in blocks) / len(blocks),
        }
    else:
        walked = prune_interleaved(student, calib, config)
    if row.get("global"):
        squarehead = get_method("squarehead")
        ctx = RecoveryContext(model=student, teacher=dense, tokenizer=loaded.tokenizer, calib_ids=calib,
                              pattern=parse_pattern(config.pattern), device=cpu, options=row["global"])  # fmt: skip
        fit = squarehead.run(ctx)
        result["global"] = {"config": fit["config"], "lr": fit["lr"],
                            **{k: fit["fit"].get(k) for k in ("steps", "initial_loss", "final_loss", "reverted")}}
    result["cpu_min"] = (time.process_time() - cpu_began) / 60
    result["wall_min"] = (time.perf_counter() - began) / 60
    if "owl" in walked:
        result["owl"] = walked["owl"]
    result["ppl"] = evaluate(student)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def report(args: argparse.Namespace, dense_run: dict, runs: dict[str, dict]) -> None:
    from sparsefit.app.reports import gap_closed

    dense = dense_run["ppl"]
    rows = [["dense", "", round(dense["wiki"], 2), round(dense["books"], 2), "", "", "", "", "",
             "", round(dense_run["peak_rss_mb"])]]  # fmt: skip
    for name, r in runs.items():
        if r.get("status") != "ok":
            rows.append([name, "failed", r.get("error", "")] + [""] * 8)
            continue
        baseline = baseline_of(name, r)
        base = runs.get(baseline, {})
        gaps = {}
        if base.get("status") == "ok" and not name.endswith("-pruned"):
            for corpus in ("wiki", "books"):
                d, p, q = dense[corpus], base["ppl"][corpus], r["ppl"][corpus]
                gaps[corpus] = (gap_closed(d, p, q), gap_closed(d, p, q, log=True))
        r["gap_closed"] = gaps
        # Rows whose masks are not Wanda's (SparseGPT, OWL) also against Wanda's pruned model: the recipe's
        # whole gain over the Wanda baseline the goal is stated for, the better masks included.
        wanda_name = wanda_baseline_of(name)
        wanda = runs.get(wanda_name, {})
        vs_wanda = ""
        if wanda.get("status") == "ok" and not name.endswith("-pruned") and wanda_name != baseline:
            r["gap_closed_vs_wanda"] = {c: gap_closed(dense[c], wanda["ppl"][c], r["ppl"][c], log=True)
                                        for c in ("wiki", "books")}  # fmt: skip
            vs_wanda = " / ".join(f"{r['gap_closed_vs_wanda'][c]:.0%}" for c in ("wiki", "books"))
        r["baseline"] = baseline
        ebft = r.get("ebft", {})
        cell = {c: f"{gaps[c][0]:.0%} / {gaps[c][1]:.0%}" if c in gaps else "" for c in ("wiki", "books")}
        rows.append([
            name, r["baseline"] if name != r["baseline"] else "", round(r["ppl"]["wiki"], 2),
            round(r["ppl"]["books"], 2), cell["wiki"], cell["books"], round(r["cpu_min"], 2),
            f"{ebft.get('backed_off', '')}/{ebft.get('kept_as_pruned', '')}" if ebft else "",
            f"{ebft['mse_reduction']:.0%}" if ebft else "", vs_wanda, round(r["peak_rss_mb"]),
        ])  # fmt: skip
    threads = f"{args.threads} torch thread(s) per process" if args.threads else "torch's default threads"
    notes = (
        f"SmolLM2-135M, 2 CPU cores, torch {torch.__version__}, {args.jobs} row(s) at a time, {threads}. Calibration "
        f"`wiki` {args.nsamples} x {args.seqlen} unless the row says; interleaved prune + recover (the reference's "
        "order). Base (rows named `-cpu`): lr 1e-3, 4 epochs, batch 2, 2 held-out windows (60 steps per block), the "
        "former `quick` (sparse-path target); today's `quick` is `-calib64x128-lr3e-3-mix` and `cpu` "
        "`-calib64x128-lr3e-3-mix-epochs8`. "
        "Perplexity on the "
        f"first {args.max_tokens} test tokens at seqlen {args.eval_seqlen}; dense: wiki {dense['wiki']:.2f}, books "
        f"{dense['books']:.2f}. Gap closed: share of the pruned-to-dense gap of the row's baseline (same masks "
        "method), linear / log-perplexity; goal >= 70% (log) on wiki at 70% and 2:4, >= 50% on books. CPU-min: "
        "process CPU time of prune + recover (+ the global pass). Backed off / kept: blocks whose fit was redone "
        "at a lower rate / left as pruned."
    )
    header = ["row", "baseline", "wiki", "books", "gap closed wiki", "gap closed books", "CPU-min",
              "backed off / kept", "MSE reduction", "log gap closed vs Wanda wiki / books", "peak RSS MB"]
    data = {"setting": vars(args), "dense": dense_run, "runs": runs}
    write_results("quality", data, header, rows, notes)
    frontier_png(runs)


def frontier_png(runs: dict[str, dict]) -> None:
    """Gap closed on wiki (log) against CPU-minutes, one labelled point per recovery row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsefit.atomic import write_file_atomically

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in runs.items():
        gap = r.get("gap_closed", {}).get("wiki")
        if gap is None:
            continue
        color = "tab:blue" if name.startswith("70") else "tab:orange"
        ax.scatter(r["cpu_min"], 100 * gap[1], color=color)
        ax.annotate(name, (r["cpu_min"], 100 * gap[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(70, color="grey", ls="--", lw=1)
    ax.set_xlabel("CPU-minutes (prune + recover, one thread)")
    ax.set_ylabel("log-perplexity gap closed on wiki (%)")
    ax.set_title("Recovery frontier, SmolLM2 (blue: Wanda 70%, orange: 2:4)")
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_file_atomically(RESULTS / "quality.png", buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--rows", default="", help="comma-separated rows (default: all); baselines are added")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    add_row_options(parser, "quality.json (also those another --merge run writes meanwhile)")
    args = parser.parse_args()
    if args.list:
        for name, row in ROWS.items():
            print(f"{name:28} {json.dumps(row)}")
        return
    if args.one:
        print(json.dumps(measure(args, args.one[0])))
        return
    names = [n for n in args.rows.split(",") if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; see --list")
    earlier = stored_results("quality", args.merge)
    done = {k for k, v in earlier.get("runs", {}).items() if v.get("status") == "ok"}
    names = list(dict.fromkeys([baseline_of(n) for n in names if baseline_of(n) not in done] + names))
    passed = ["--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
              "--eval-seqlen", str(args.eval_seqlen), "--max-tokens", str(args.max_tokens)]  # fmt: skip
    dense = earlier.get("dense") or run_isolated(__file__, passed, ["dense"], args.threads)
    if dense.get("status") != "ok":
        sys.exit(f"the dense run failed: {dense.get('error')}")

    def kept() -> dict:
        # Read again at every report, so that two --merge runs of different rows side by side keep each other's.
        return {k: v for k, v in stored_results("quality", args.merge).get("runs", {}).items() if k not in names}

    run_many(__file__, passed, {n: [n] for n in names}, args.jobs, args.threads,
             lambda runs: report(args, dense, {**kept(), **runs}))  # fmt: skip


if __name__ == "__main__":
    main()
