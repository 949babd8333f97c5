"""Task fine-tuning (issue 23): SmolLM2 on `arithmetic`, exact match on its test questions.

Dense rows: the base model, then full fine-tuning, LoRA and S²FT at the same steps on the same batches, each with
its seconds per step and its peak training memory (the process's resident high-water mark, reset just before the
fit: what training adds to the loaded model). Sparse rows: Wanda and SparseGPT at 50 % and 70 %, pruned from the
tuned teacher (the ``dense:full`` row's model) with the task's training text as calibration; for each, the accuracy
pruned, after cross-entropy fine-tuning (``ce``), after SquareHead against the tuned teacher (``squarehead``), and
after interleaved EBFT on the task's text (``ebft``, ``quick`` preset). Every training row runs ``--steps`` steps of
``--batch`` examples (one pass over the first steps x batch training questions; more steps than one pass over
all 2,400 take whole passes).

    .venv/bin/python bench/finetune.py --rows dense:base,dense:full,dense:lora,dense:s2ft
    .venv/bin/python bench/finetune.py --merge --rows wanda:0.5:pruned,wanda:0.5:ce,wanda:0.5:squarehead

A row is ``dense:base|full|lora|s2ft`` or ``METHOD:SPARSITY:pruned|ce|squarehead|ebft``, a training row with an
optional ``@LR`` (``dense:full@3e-4``: another rate than ``RATES``'s, for a rate sweep); sparse rows need the
``dense:full`` row's model (kept under ~/.cache/sparsefit/bench/finetune), tuned for ``--teacher-steps`` steps (100;
a ``dense:full`` row run with ``--steps N`` makes the teacher of N steps). Writes bench/results/finetune.{json,md};
``--merge`` keeps the rows measured before. Run it alone on idle cores: the seconds per step are timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from common import add_row_options, peak_rss_mb, run_many, stored_results, write_results  # noqa: E402

MODEL = "smollm2-135m"
DENSE = ("base", "full", "lora", "s2ft")
SPARSE = ("pruned", "ce", "squarehead", "ebft")
# The learning rate of each training row unless the row names one (``@LR``). The first table (bench/results/
# finetune.md) ran with full and ce 1e-4 and S²FT's recovery rate 1e-2; the rate sweep (finetune_rates.md) then
# set the task defaults of app/defaults.py (full 3e-5, S²FT 1e-3), which these follow. Each row records its rate.
RATES = {"full": 3e-5, "ce": 3e-5, "lora": 3e-3, "s2ft": 1e-3}


def work_dir() -> Path:
    from sparsefit.assets import home

    return home() / "bench" / "finetune"


def teacher_dir(steps: int) -> Path:
    """The tuned teacher of ``steps`` steps (the ``dense:full`` row's model at ``--steps``); 100 is the main table's."""
    return work_dir() / ("teacher" if steps == 100 else f"teacher-{steps}")


def reset_peak() -> None:
    """Start a new resident-memory high-water mark (Linux: ``clear_refs`` 5), so the peak is the fit's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def score(model, tokenizer, limit: int) -> dict:
    from sparsefit.evaluate.exact_match import exact_match, load_generative

    began = time.perf_counter()
    result = exact_match(model, tokenizer, load_generative("arithmetic", limit))
    return {"exact_match": result["exact_match"], "n": result["n"], "eval_s": time.perf_counter() - began}


def train(loaded, method_name: str, args, teacher=None, lr: float | None = None) -> dict:
    from sparsefit.data.task import encode_examples, load_examples
    from sparsefit.prune import parse_pattern
    from sparsefit.recover import RecoveryContext, get_method

    examples = load_examples("arithmetic", "train", args.steps * args.batch)
    data = encode_examples(loaded.tokenizer, examples, 256)
    method = get_method("full" if method_name == "ce" else method_name)
    # More steps than one pass over the 2,400 training questions take: whole passes (600 steps of 8: 2 epochs).
    options = {"epochs": math.ceil(args.steps * args.batch / len(examples)), "batch_size": args.batch}
    if lr is not None or method_name != "squarehead":
        options["lr"] = lr if lr is not None else RATES[method_name]
    config = method.configure(options)
    ctx = RecoveryContext(model=loaded.model, teacher=teacher if teacher is not None else loaded.model,
                          tokenizer=loaded.tokenizer, calib_ids=data, pattern=parse_pattern("unstructured"),
                          device=torch.device("cpu"))  # fmt: skip
    rss = peak_rss_mb()
    reset_peak()
    report = method.run(ctx, config)
    fit = report["fit"]
    return {"steps": fit["steps"], "s_per_step": fit["time_s"] / fit["steps"], "loss": [fit["initial_loss"],
            fit["final_loss"]], "train_peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss,
            "trainable_params": report["trainable_params"], "lr": report.get("lr", options.get("lr"))}  # fmt: skip


def measure(args: argparse.Namespace, name: str) -> dict:
    from sparsefit.models import load

    torch.manual_seed(0)
    name, _, rate = name.partition("@")
    lr = float(rate) if rate else None
    parts = name.split(":")
    teacher = teacher_dir(args.steps if parts[0] == "dense" else args.teacher_steps)
    if parts[0] == "dense":
        loaded = load(MODEL)
        row: dict = {"status": "ok"}
        if parts[1] != "base":
            row.update(train(loaded, parts[1], args, lr=lr))
        if parts[1] == "full" and lr is None:  # the tuned teacher of the sparse rows
            loaded.model.save_pretrained(teacher)
            loaded.tokenizer.save_pretrained(teacher)
        return {**row, **score(loaded.model, loaded.tokenizer, args.limit)}
    method, sparsity, lever = parts[0], float(parts[1]), parts[2]
    if not (teacher / "config.json").exists():
        return {"status": "failed", "error": f"run the dense:full row with --steps {args.teacher_steps} first "
                                             "(the tuned teacher)"}
    from sparsefit.app.jobs import run_prune
    from sparsefit.prune import PruneConfig

    # Each row prunes into its own folder: rows run in parallel (--jobs), and a `pruned` row rewriting the folder
    # that a `ce` row of the same method and sparsity was loading made that row fail. The masks are the same.
    pruned_dir = work_dir() / f"{method}-{sparsity}-{lever}-teacher{args.teacher_steps}"
    config = PruneConfig(method=method, sparsity=sparsity, calib="arithmetic", nsamples=args.nsamples,
                         seqlen=args.seqlen, device="cpu")  # fmt: skip
    row = {"status": "ok", "teacher_steps": args.teacher_steps}
    began = time.process_time()
    if lever == "ebft":
        run_prune(str(teacher), config, pruned_dir, overwrite=True, recover="ebft",
                  recover_options={"preset": "quick"}, guard="warn")  # fmt: skip
        loaded = load(str(pruned_dir))
        row["cpu_min"] = (time.process_time() - began) / 60
    else:
        run_prune(str(teacher), config, pruned_dir, overwrite=True)
        loaded = load(str(pruned_dir))
        if lever in ("ce", "squarehead"):
            tuned = load(str(teacher)).model if lever == "squarehead" else None
            row.update(train(loaded, lever, args, tuned, lr=lr))
    return {**row, **score(loaded.model, loaded.tokenizer, args.limit)}


def passes(args: argparse.Namespace) -> str:
    from sparsefit.data.task import load_examples

    train = len(load_examples("arithmetic", "train"))
    count = math.ceil(args.steps * args.batch / train)
    return "one pass" if count == 1 else f"{count} passes over the {train:,} training questions"


def report(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    def cell(run: dict, key: str, fmt: str) -> str:
        return format(run[key], fmt) if key in run else ""

    rows = []
    for name in sorted(runs, key=lambda n: (n.split(":")[0] != "dense", n)):
        run = runs[name]
        if run.get("status") != "ok":
            rows.append([name, "failed: " + run.get("error", "")[:80], "", "", "", "", ""])
            continue
        loss = f"{run['loss'][0]:.3f} -> {run['loss'][1]:.3f}" if "loss" in run else ""
        rows.append([name, f"{run['exact_match']:.3f}", str(run.get("steps", "")), cell(run, "lr", "g"),
                     cell(run, "s_per_step", ".2f"), cell(run, "train_peak_rss_mb", ".0f"), loss,
                     cell(run, "trainable_params", ",")])  # fmt: skip
    notes = (f"SmolLM2-135M on `arithmetic` (train: the first steps x batch of its 2,400 training questions; exact "
             f"match on the first {args.limit} of its 600 test questions, greedy). Every training row: "
             f"{args.steps} steps of {args.batch} questions, {passes(args)}, at the row's rate (LoRA r 8 on q/v; "
             f"S²FT the `cpu` preset's heads and channels; SquareHead its `cpu` preset's rate, 4 x the paper's "
             f"table). "
             f"Sparse rows prune the `dense:full` model of {args.teacher_steps} steps with the task's "
             f"training text as calibration ({args.nsamples} x {args.seqlen} tokens). torch "
             f"{torch.__version__}, {args.threads or torch.get_num_threads()} thread(s) per process, "
             f"{args.jobs} row(s) at a time. Peak MB: resident high-water mark during the fit (model, gradients, "
             f"optimizer state, activations). {args.context}")  # fmt: skip
    write_results(args.name, {"setting": vars(args), "runs": runs},
                  ["row", "exact match", "steps", "lr", "s/step", "peak MB (fit)", "probe loss", "trained params"],
                  rows, notes)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="dense:base,dense:full,dense:lora,dense:s2ft")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=100,
                        help="sparse rows: prune the teacher tuned for this many steps (its dense:full row first)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--limit", type=int, default=200, help="test questions scored")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--name", default="finetune", help="results file name under bench/results")
    parser.add_argument("--context", default="", help="a sentence on how the run was made, for the notes")
    add_row_options(parser, "the results file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one[0])))
        return
    names = [n for n in args.rows.split(",") if n]
    for name in names:
        parts = name.partition("@")[0].split(":")
        ok = (len(parts) == 2 and parts[0] == "dense" and parts[1] in DENSE) or (
            len(parts) == 3 and parts[0] in ("wanda", "sparsegpt") and parts[2] in SPARSE)  # fmt: skip
        if not ok:
            sys.exit(f"row {name!r} is not dense:{'|'.join(DENSE)} or wanda|sparsegpt:SPARSITY:{'|'.join(SPARSE)}")
    passed = ["--steps", str(args.steps), "--teacher-steps", str(args.teacher_steps), "--batch", str(args.batch),
              "--limit", str(args.limit),
              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]  # fmt: skip

    def on_done(runs: dict) -> None:
        stored = stored_results(args.name, args.merge)
        report(args, {**stored.get("runs", {}), **runs})

    run_many(__file__, passed, {n: [n] for n in names}, args.jobs, args.threads, on_done)


if __name__ == "__main__":
    main()
