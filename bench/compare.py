"""Recovery methods side by side on SmolLM2: Wanda masks at 50 %, 70 % and 2:4.

For each setting, :func:`sparsefit.app.compare.run_compare` prunes once and runs ``none`` (the pruned model);
DSnoT and EBFT interleaved (each prunes with its own walk: the mode of record) and two-step (on the shared masks)
beside it; SquareHead, LoRA and S²FT on the shared masks. All use the same calibration windows and every training
method the same token budget (token passes through each block; default 4 passes over the windows); perplexity on
``wiki`` and ``books``. The default setting is the CPU preset's scale (32 x 256 calibration tokens, 32 k-token
budget, 8 k evaluation tokens per corpus at 1024): about an hour per setting on two cores. A short smoke setting:

    python bench/compare.py --nsamples 4 --seqlen 128 --eval-max-tokens 2048

Writes ``bench/results/compare.json`` and ``compare.md`` (atomically; each run replaces them) and keeps each
setting's own folder (json, md, html with the bar charts) under ``bench/results/compare/<setting>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SETTINGS = "0.5,0.7,2:4"


def parse_settings(text: str) -> list[tuple[str, float, str]]:
    """``"0.5,0.7,2:4"`` -> ``[(label, sparsity, pattern), ...]``; UsageError on anything else."""
    from sparsefit.errors import UsageError
    from sparsefit.prune import check_sparsity, parse_pattern

    settings = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if ":" in item:
            pattern = parse_pattern(item)
            settings.append((f"wanda-{pattern.n}of{pattern.m}", pattern.sparsity, str(pattern)))
        else:
            try:
                sparsity = check_sparsity(float(item))
            except ValueError:
                message = f"setting {item!r} is neither a sparsity such as 0.7 nor a pattern such as 2:4"
                raise UsageError(message) from None
            settings.append((f"wanda-{round(100 * sparsity)}pct", sparsity, "unstructured"))
    if not settings:
        raise UsageError(f"--settings {text!r} is empty; give e.g. {DEFAULT_SETTINGS}")
    return settings


def to_markdown(bench: dict) -> str:
    from sparsefit.app.compare.render import _notes, table_rows

    args = bench["args"]
    lines = [
        "# Recovery methods compared (bench/compare.py)",
        "",
        f"Model `{args['model']}`, Wanda masks; calibration `{args['calib']}` {args['nsamples']} x {args['seqlen']} "
        f"tokens; budget {bench['budget_tokens']:,} token passes through each block for every training method "
        f"(the tokens/block column is what each method spent); perplexity at {args['eval_seqlen']} tokens on the "
        f"first {args['eval_max_tokens']:,} test tokens. {bench['threads']} CPU thread(s); {bench['total_s']:.0f} s "
        "in all. Method defaults: the `cpu` presets (see each method's module docstring).",
        "",
    ]
    for label, result in bench["runs"].items():
        header, rows = table_rows(result)
        lines += [f"## {label}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", *[f"- {note}" for note in _notes(result)], ""]
    for label, error in bench.get("failed_settings", {}).items():
        lines += [f"## {label}", "", f"failed: {error}", ""]
    return "\n".join(lines)


def run_bench(
    model: str = "smollm2-135m",
    settings: str = DEFAULT_SETTINGS,
    methods: str = "none,dsnot,ebft,squarehead,lora,s2ft",
    nsamples: int = 32,
    seqlen: int = 256,
    budget: int | None = None,
    calib: str = "wiki",
    corpora: str = "wiki,books",
    eval_seqlen: int = 1024,
    eval_max_tokens: int = 8192,
    device: str = "auto",
    threads: int | None = None,
    out_dir: str | os.PathLike = RESULTS_DIR,
    mode: str = "both",
) -> dict:
    from sparsefit.app.compare import parse_methods, run_compare
    from sparsefit.app.defaults import COMPARE_EPOCHS
    from sparsefit.app.jobs import versions
    from sparsefit.atomic import write_file_atomically
    from sparsefit.errors import UsageError

    parsed = parse_settings(settings)
    parse_methods(methods)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    began = time.perf_counter()
    args = dict(model=model, settings=settings, methods=methods, nsamples=nsamples, seqlen=seqlen, budget=budget,
                calib=calib, corpora=corpora, eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens,
                device=device, mode=mode)  # fmt: skip
    runs: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", file=sys.stderr, flush=True)

    for label, sparsity, pattern in parsed:
        log(f"setting {label}")
        try:
            runs[label] = run_compare(
                model, out_dir / "compare" / label, prune="wanda", sparsity=sparsity, pattern=pattern,
                methods=methods, nsamples=nsamples, seqlen=seqlen, budget=budget, calib=calib,
                corpora=corpora.split(","), eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens,
                device=device, overwrite=True, mode=mode, log=log,
            )  # fmt: skip
        except UsageError:
            raise  # bad arguments: the same for every setting, so stop at once
        except Exception as exc:  # e.g. out of memory in one setting: keep the others
            failed[label] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log(f"setting {label} failed: {failed[label]}")
    bench = {
        "bench": "compare",
        "args": args,
        "budget_tokens": budget if budget is not None else COMPARE_EPOCHS * nsamples * seqlen,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "failed_settings": failed,
        "versions": versions(),
        "total_s": round(time.perf_counter() - began, 1),
    }
    write_file_atomically(out_dir / "compare.json", json.dumps(bench, indent=2, allow_nan=False))
    write_file_atomically(out_dir / "compare.md", to_markdown(bench))
    return bench


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="sparsities and N:M patterns, e.g. 0.5,0.7,2:4")
    parser.add_argument("--methods", default="none,dsnot,ebft,squarehead,lora,s2ft")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--budget", type=int, default=None, help="token passes per block (default 4 epochs)")
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--corpora", default="wiki,books", help="evaluation corpora")
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--eval-max-tokens", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--mode", default="both", help="interleaved, two-step or both (block-wise methods twice)")
    args = parser.parse_args(argv)
    from sparsefit.errors import UsageError

    try:
        bench = run_bench(
            args.model, args.settings, args.methods, args.nsamples, args.seqlen, args.budget, args.calib,
            args.corpora, args.eval_seqlen, args.eval_max_tokens, args.device, args.threads, args.out_dir, args.mode,
        )  # fmt: skip
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(to_markdown(bench))


if __name__ == "__main__":
    main()
