"""``sparsefit compare``: prune once, give every recovery method the same masks and calibration windows, and write
one side-by-side table (``compare.json``, ``compare.md``, ``compare.html``, written atomically).

Per method: perplexity on each evaluation corpus, the share of the dense-to-pruned gap it closes (linearly, and in
log-perplexity: at 70 % a small model's perplexity grows tens of times, so the linear share flatters every method),
wall time, peak memory (:mod:`.memory`), trainable parameters and final sparsity. ``none`` is the pruned model
itself. A method that raises is reported as failed, with its error, and the others still run. Every training
method gets the same token budget (token passes through each block; default: 4 passes over the calibration
windows). ``keep`` writes each method's model as a run folder beside the table.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from sparsefit import distributed
from sparsefit.app import defaults
from sparsefit.app.compare.memory import PeakMemory, release_memory
from sparsefit.app.compare.render import compare_html, compare_markdown
from sparsefit.app.jobs import (
    choose_method,
    evaluate_model,
    parse_list,
    prune_interleaved,
    recovery_files,
    save_run,
    versions,
)
from sparsefit.app.reports import gap_closed
from sparsefit.atomic import check_output, write_atomically
from sparsefit.data import calibration_windows, get_corpus
from sparsefit.errors import FileError, check
from sparsefit.models import load, parse_dtype
from sparsefit.progress import Bar, silent
from sparsefit.prune import PruneConfig, parse_pattern, prune_model, sparsity_summary
from sparsefit.recover import METHODS, RecoveryContext
from sparsefit.walk import resolve_device
from sparsefit.walk.masks import model_masks, same_zeros

NONE = "none"
MODES = ("interleaved", "two-step", "both")


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"none,dsnot"`` -> ``["none", "dsnot"]``; UsageError on an empty list, an unknown or repeated name."""
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [str(item).strip() for item in items if str(item).strip()]
    known = [NONE, *METHODS]
    check(len(names) > 0, f"--methods is empty; give a comma-separated list of {', '.join(known)}")
    for name in names:
        check(name in known, f"method {name!r} is not known; choose from {', '.join(known)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    check(not repeated, f"method {', '.join(repeated)} is listed twice in --methods; give each once")
    return names


def _fingerprint(model: nn.Module) -> torch.Tensor:
    """Cheap check that a model's weights did not change: one float64 sum per parameter."""
    with torch.no_grad():
        return torch.stack([p.detach().double().sum() for p in model.parameters()])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _clean(value):
    """JSON-safe: non-finite floats to null, tuples to lists, tensors to lists, anything else unknown to str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if torch.is_tensor(value):
        return _clean(value.tolist())
    return str(value)


def _options_for(name: str, method_options: dict) -> dict:
    options = dict(method_options.get(name, {}))
    if name == "ebft":
        # Every window trains, as for the other methods, so one budget buys every method the same token passes.
        options.setdefault("heldout", 0)
    return options


def tokens_per_block(report: dict, n_windows: int, seqlen: int) -> int:
    """Token passes a method actually spent through each block, read off its report (0: it does not train)."""
    if "fit" in report:
        return int(report["fit"].get("tokens", 0))
    blocks = [b for b in report.get("blocks", []) if "epochs_run" in b]  # EBFT: epochs over its training windows
    if blocks:
        train = n_windows - int(report.get("config", {}).get("heldout", 0))
        return max(int(b["epochs_run"]) for b in blocks) * train * seqlen
    return 0


def _ppl_values(results: dict) -> dict[str, float]:
    return {name: res["value"] for name, res in results.get("ppl", {}).items()}


def _with_gaps(ppl: dict[str, float], dense: dict[str, float], pruned: dict[str, float]) -> dict:
    return {
        "ppl": ppl,
        "gap_closed": {c: gap_closed(dense[c], pruned[c], v) for c, v in ppl.items()},
        "gap_closed_log": {c: gap_closed(dense[c], pruned[c], v, log=True) for c, v in ppl.items()},
    }


def run_compare(
    model: str,
    out: str | os.PathLike,
    *,
    prune: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    gqa: str = "queries",
    keep_heads: int | None = None,
    owl_lambda: float | None = None,
    owl_m: float = defaults.QUICK.owl_m,
    methods: str | Sequence[str] = defaults.COMPARE_METHODS,
    nsamples: int = defaults.QUICK.nsamples,
    seqlen: int = defaults.QUICK.seqlen,
    budget: int | None = None,
    calib: str = "wiki",
    corpora: str | Sequence[str] = defaults.EVAL_CORPORA,
    eval_seqlen: int = defaults.EVAL_SEQLEN,
    eval_max_tokens: int | None = defaults.COMPARE_EVAL_MAX_TOKENS,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    method_options: dict[str, dict] | None = None,
    overwrite: bool = False,
    keep: bool = False,
    mode: str = "interleaved",
    log: Callable[[str], None] | None = None,
    progress: Bar = silent,
) -> dict:
    """Prune ``model`` once and compare recovery ``methods`` on the same masks and windows; write ``out``.

    ``corpora``: evaluation corpora (names or local .txt/.jsonl paths, as ``calib``). ``budget``: token passes
    each training method may spend (None: ``4 * nsamples * seqlen``). ``method_options``: per method name, the
    options its config accepts (e.g. ``{"lora": {"lr": 3e-4}}``). ``log(message)`` reports progress;
    ``progress`` gets the bars of pruning, each method and each evaluation. ``keep``: also write each method's
    model as a run folder ``out/<method>/`` (the pruned one as ``out/none/``). Every argument is checked before
    any work. ``mode``: ``interleaved`` (block-wise methods prune and recover each block in turn, as their
    references do; time and memory then include their own pruning) or ``two-step`` (every method on the one set of
    masks), or ``both`` (block-wise methods twice: interleaved, and a ``<name> two-step`` row beside it).
    ``owl_lambda``/``owl_m``: OWL's per-block sparsities for the shared masks and every interleaved walk (see
    :class:`~sparsefit.prune.PruneConfig`). Returns the ``compare.json`` content.
    """
    say = log or (lambda message: None)
    # --- every check before any work -----------------------------------------------------------------------
    names = parse_methods(methods)
    check(mode in MODES, f"compare mode {mode!r} is not one of {', '.join(MODES)}")
    prune_config = PruneConfig(method=prune, sparsity=sparsity, pattern=pattern, calib=calib, nsamples=nsamples,
                               seqlen=seqlen, seed=seed, batch_size=batch_size, device=device,
                               owl_lambda=owl_lambda, owl_m=owl_m, gqa=gqa, keep_heads=keep_heads)  # fmt: skip
    prune_config.validate()
    parsed = parse_pattern(pattern)
    method_options = dict(method_options or {})
    stray = sorted(set(method_options) - set(names))
    check(not stray, f"options given for method(s) {', '.join(stray)} that are not in --methods ({', '.join(names)})")
    options = {name: _options_for(name, method_options) for name in names if name != NONE}
    device_ = resolve_device(device)
    recovery, configs = {}, {}
    for name in options:
        recovery[name], configs[name] = choose_method(name, options[name], nsamples, device_, pattern=pattern,
                                                      seed=seed)  # fmt: skip
    eval_corpora = parse_list(list(corpora) if not isinstance(corpora, str) else corpora)
    check(len(eval_corpora) > 0, "no evaluation corpus given; give e.g. wiki,books")
    for name in [calib, *eval_corpora]:
        get_corpus(name)
    check(eval_seqlen >= 2, f"eval seqlen {eval_seqlen} must be at least 2 tokens, such as 1024")
    check(
        eval_max_tokens is None or eval_max_tokens >= eval_seqlen,
        f"eval max tokens {eval_max_tokens} is shorter than eval seqlen {eval_seqlen}; give at least one window",
    )
    if budget is not None:
        check(isinstance(budget, int) and budget > 0, f"budget {budget!r} must be a positive number of tokens")
    dtype_ = parse_dtype(dtype)
    out = check_output(out, overwrite, [("model", model), ("calibration text", calib),
                                        *(("evaluation text", name) for name in eval_corpora)])  # fmt: skip
    budget_tokens = budget if budget is not None else defaults.COMPARE_EPOCHS * nsamples * seqlen
    # Under torchrun rank 0 writes the kept folders: every rank names the one rank 0 made.
    kept = Path(distributed.broadcast(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-keep-")
                                      if distributed.is_main() else None)) if keep else None  # fmt: skip

    # --- load, calibrate, evaluate the dense model ---------------------------------------------------------
    began = time.perf_counter()
    say(f"loading {model}")
    loaded = load(model, dtype=dtype_)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    prune_config.check_model(teacher)
    for name, method in recovery.items():
        reason = method.check_model(teacher, configs[name])
        check(reason is None, f"method {name!r} cannot run on this model: {reason}")
    calib_ids = calibration_windows(tokenizer, get_corpus(calib), nsamples, seqlen, seed)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return _ppl_values(evaluate_model(m, tokenizer, ppl=eval_corpora, seqlen=eval_seqlen,
                                          max_tokens=eval_max_tokens, device=device_, progress=progress))  # fmt: skip

    say("evaluating the dense model")
    teacher.requires_grad_(False)
    dense_ppl = evaluate(teacher)

    # --- prune once ------------------------------------------------------------------------------------------
    say(f"pruning: {prune} {pattern if parsed.structured else prune_config.sparsity}")
    pruned = copy.deepcopy(teacher)
    started = time.perf_counter()
    with PeakMemory(device_) as memory:
        owl_report = prune_model(pruned, calib_ids, prune_config, progress=progress).get("owl")
    prune_s = time.perf_counter() - started
    masks = model_masks(pruned)
    summary = sparsity_summary(pruned, pattern)
    pruned_ppl = evaluate(pruned)
    entries: dict[str, dict] = {}
    if NONE in names:
        entries[NONE] = {
            "status": "ok", **_with_gaps(pruned_ppl, dense_ppl, pruned_ppl), "time_s": round(prune_s, 2),
            "peak_mem_mb": memory.peak_mb, "trainable_params": 0, "sparsity": summary["overall"],
            "masks_kept": None if parsed.slim else True, "tokens_per_block": 0,
            "details": {"note": "the pruned model itself; time and memory are the pruning's"},
        }  # fmt: skip
        if parsed.structured:
            entries[NONE]["pattern_ok"] = summary.get("pattern_ok")
        if kept is not None:
            run = {"command": "compare", "source_model": model, "config": {**prune_config.to_dict(), "dtype": dtype},
                   "versions": versions(), "results": {"sparsity": summary["overall"], "ppl": pruned_ppl}}
            save_run(kept / NONE, pruned, tokenizer, run, summary)
    reference = _fingerprint(teacher)

    # --- every method on its own copy of the pruned model -----------------------------------------------
    runs = []  # (entry label, method name, own walk)
    for name in names:
        if name == NONE:
            continue
        if recovery[name].blockwise and mode in ("interleaved", "both"):
            runs.append((name, name, True))
        if not recovery[name].blockwise or mode != "interleaved":
            runs.append((f"{name} two-step" if recovery[name].blockwise and mode == "both" else name, name, False))
    for label, name, own_walk in runs:
        method = recovery[name]
        # Interleaved (the mode of record): a block-wise method prunes and recovers each block in turn from the
        # dense model, as its reference code does, so it gets the masks it would get on its own.
        say(f"recovering with {label}" + (" (interleaved: pruning again with it)" if own_walk else ""))
        student = copy.deepcopy(teacher if own_walk else pruned)
        meter = PeakMemory(device_)
        eval_s = [0.0]

        def unmerged(m: nn.Module, meter=meter, eval_s=eval_s) -> dict:
            started = time.perf_counter()
            with meter.paused():  # the evaluation is not the method's cost: neither its time nor its memory
                result = _with_gaps(evaluate(m), dense_ppl, pruned_ppl)
            eval_s[0] += time.perf_counter() - started
            return result

        ctx = RecoveryContext(
            model=student, teacher=teacher, tokenizer=tokenizer, calib_ids=calib_ids, pattern=parsed,
            device=device_, seed=seed, budget_tokens=budget_tokens if method.trains else None,
            batch_size=batch_size, options=options[name], progress=progress, evaluate=unmerged,
        )  # fmt: skip
        entry: dict = {"status": "ok"}
        started = time.perf_counter()
        try:
            with meter:
                if own_walk:
                    config = method.with_budget(configs[name], ctx.budget_tokens, nsamples, seqlen)
                    walked = prune_interleaved(student, calib_ids, prune_config, method, config, progress=progress)
                    report = method.summarize(config, walked["blocks"], method.blocks_of(student))
                else:
                    report = method.run(ctx, configs[name])
            entry["time_s"] = round(time.perf_counter() - started - eval_s[0], 2)
            entry["peak_mem_mb"] = meter.peak_mb
            student.to("cpu")
            final = sparsity_summary(student, pattern)
            entry.update(_with_gaps(evaluate(student), dense_ppl, pruned_ppl))
            entry["trainable_params"] = int(report.get("trainable_params", 0))
            entry["tokens_per_block"] = tokens_per_block(report, nsamples, seqlen)
            entry["sparsity"] = final["overall"]
            entry["masks_kept"] = None if own_walk or parsed.slim else same_zeros(student, masks)
            entry["mode"] = "interleaved" if own_walk else "two-step"
            if parsed.structured:
                entry["pattern_ok"] = final.get("pattern_ok")
            if name == "lora" and "unmerged" in report:
                entry["unmerged"] = report.pop("unmerged")
            entry["details"] = {k: v for k, v in report.items() if not isinstance(v, bytes)}  # files: kept apart
            if kept is not None:
                run = {"command": "compare", "source_model": model,
                       "config": {**prune_config.to_dict(), "dtype": dtype},
                       "recovery": {"method": name, **configs[name].to_dict()}, "versions": versions(),
                       "results": {"sparsity": final["overall"], "ppl": entry["ppl"]}}  # fmt: skip
                save_run(kept / label.replace(" ", "-"), student, tokenizer, run, final,
                         extra_files=recovery_files(method, report))  # fmt: skip
        except FileError:  # a full disk is not the method's failure, and the others would meet it too
            if kept is not None and distributed.is_main():
                shutil.rmtree(kept, ignore_errors=True)  # the kept models of a comparison that will not be written
            raise
        except Exception as exc:  # one method's failure must not cost the others their results
            entry = {
                "status": "failed", "error": _first_line(exc), "ppl": {}, "gap_closed": {}, "gap_closed_log": {},
                "time_s": round(time.perf_counter() - started - eval_s[0], 2), "peak_mem_mb": meter.peak_mb,
                "trainable_params": None, "sparsity": None,
            }  # fmt: skip
            say(f"{label} failed: {entry['error']}")
        teacher.to("cpu")
        teacher.requires_grad_(False)
        if not torch.equal(_fingerprint(teacher), reference):
            # A method must never change the teacher; if one did, reload it so the next method is not fooled.
            entry["teacher_restored"] = True
            teacher = load(model, dtype=dtype_).model
            teacher.requires_grad_(False)
        entries[label] = entry
        del student, ctx
        release_memory()

    result = {
        "command": "compare",
        "model": model,
        "settings": {
            "prune": prune, "sparsity": prune_config.sparsity, "pattern": str(parsed),
            "structured": summary.get("structured"),
            "owl_lambda": owl_lambda, "owl_m": owl_m if prune_config.owl else None, "owl": owl_report,
            "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "budget_tokens": budget_tokens,
            "budget_note": ("token passes through each block for every training method"
                            + ("" if budget is not None
                               else f" (default: {defaults.COMPARE_EPOCHS} passes over the windows)")),
            "eval_corpora": eval_corpora, "eval_seqlen": eval_seqlen, "eval_max_tokens": eval_max_tokens,
            "device": str(device_), "dtype": dtype, "peak_mem": PeakMemory.describe(device_),
            "method_options": options,
        },  # fmt: skip
        "dense": {"ppl": dense_ppl},
        "methods": entries,
        "versions": versions(),
        "total_s": round(time.perf_counter() - began, 1),
    }
    result = _clean(result)

    def writer(tmp: Path) -> None:
        if kept is not None:
            for folder in kept.iterdir():
                os.replace(folder, tmp / folder.name)
        (tmp / "compare.json").write_text(json.dumps(result, indent=2, allow_nan=False))
        (tmp / "compare.md").write_text(compare_markdown(result))
        (tmp / "compare.html").write_text(compare_html(result))

    def write() -> None:
        try:
            write_atomically(out, writer, overwrite=overwrite)
        finally:
            if kept is not None:
                shutil.rmtree(kept, ignore_errors=True)

    distributed.on_main(write, "writing the comparison")
    say(f"wrote {out}")
    return result


