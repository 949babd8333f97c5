"""``sparsefit compare``: prune once, give every recovery method the same masks and calibration windows, and write
one side-by-side table (``compare.json``, ``compare.md``, ``compare.html``, written atomically).

Per method: perplexity on each evaluation corpus, the share of the dense-to-pruned gap it closes (linearly, and in
log-perplexity: at 70 % a small model's perplexity grows tens of times, so the linear share flatters every method),
wall time, peak memory, trainable parameters and final sparsity. ``none`` is the pruned model itself. A method that
raises is reported as failed, with its error, and the others still run. Every training method gets the same token
budget (token passes through each block; default: 4 passes over the calibration windows).

Peak memory is measured per method: on CUDA ``torch.cuda.max_memory_allocated`` during the method minus what was
allocated before it; elsewhere a thread samples this process's resident memory (``VmRSS``) every 10 ms and the
peak above the level just before the method is reported, after ``gc`` and ``malloc_trim`` returned freed memory
to the system (so an earlier method's freed memory is not silently reused by a later one). The model copy a
method starts from is made before that baseline: the number is the method's own working memory.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import html
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sparsefit.errors import check

NONE = "none"
DEFAULT_METHODS = ("none", "dsnot", "ebft", "squarehead", "lora", "s2ft")
DEFAULT_CORPORA = ("wiki", "books")
DEFAULT_EPOCHS = 4  # the default budget: this many passes over the calibration windows, for every training method
SAMPLE_S = 0.01


# --- pure numbers --------------------------------------------------------------------------------------------


def gap_closed(dense: float, pruned: float, recovered: float) -> float | None:
    """Share of the dense-to-pruned perplexity gap that ``recovered`` closes (1 = back to dense; < 0 = worse)."""
    gap = pruned - dense
    if not all(math.isfinite(v) for v in (dense, pruned, recovered)) or gap == 0:
        return None
    return (pruned - recovered) / gap


def gap_closed_log(dense: float, pruned: float, recovered: float) -> float | None:
    """The same share in log-perplexity (mean loss per token), where a 44x perplexity blow-up is not 44 units."""
    if min(dense, pruned, recovered) <= 0:
        return None
    return gap_closed(math.log(dense), math.log(pruned), math.log(recovered))


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"none,dsnot"`` -> ``["none", "dsnot"]``; UsageError on an empty list, an unknown or repeated name."""
    from sparsefit.recover import METHODS

    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [str(item).strip() for item in items if str(item).strip()]
    known = [NONE, *METHODS]
    check(len(names) > 0, f"--methods is empty; give a comma-separated list of {', '.join(known)}")
    for name in names:
        check(name in known, f"method {name!r} is not known; choose from {', '.join(known)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    check(not repeated, f"method {', '.join(repeated)} is listed twice in --methods; give each once")
    return names


# --- peak memory ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed heap memory; give it back so the next baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the ``with`` body above the level at its start, in MiB (``peak_mb``); ``paused()`` excludes
    a part of it (LoRA's unmerged evaluation, which is not the method's own cost)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._peak = 0
        self._base = 0
        self._thread: threading.Thread | None = None

    @staticmethod
    def describe(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the method minus the allocation before it (MiB)"
        if _rss_bytes() is None:
            return "not measured (no /proc/self/status on this system)"
        return ("peak resident memory (VmRSS sampled every 10 ms) above the level just before the method, after gc "
                "and malloc_trim (MiB); the model copy the method starts from is not counted")  # fmt: skip

    def __enter__(self) -> PeakMemory:
        _release_memory()
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self._peak = self._base
            return self
        base = _rss_bytes()
        if base is None:
            return self
        self._base = self._peak = base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            if not self._paused.is_set():
                self._peak = max(self._peak, _rss_bytes() or 0)

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            self._peak = max(self._peak, torch.cuda.max_memory_allocated())
        else:
            self._peak = max(self._peak, _rss_bytes() or 0)
            self._paused.set()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._paused.clear()

    def __exit__(self, *exc) -> bool:
        if self.cuda:
            torch.cuda.synchronize()
            self._peak = max(self._peak, torch.cuda.max_memory_allocated())
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
        else:
            return False
        self.peak_mb = round(max(0, self._peak - self._base) / 2**20, 1)
        return False


# --- orchestration -------------------------------------------------------------------------------------------


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


def _validate_options(name: str, method, options: dict, nsamples: int) -> None:
    configure = getattr(method, "configure", None)
    if configure is not None:
        configure(options, nsamples)
    elif name == "ebft":
        from sparsefit.recover.ebft import preset

        options = dict(options)
        preset(options.pop("preset", "cpu"), **options).validate(nsamples)


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
        "gap_closed_log": {c: gap_closed_log(dense[c], pruned[c], v) for c, v in ppl.items()},
    }


def run_compare(
    model: str,
    out: str | os.PathLike,
    *,
    prune: str = "wanda",
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    methods: str | Sequence[str] = DEFAULT_METHODS,
    nsamples: int = 32,
    seqlen: int = 256,
    budget: int | None = None,
    calib: str = "wiki",
    corpora: str | Sequence[str] = DEFAULT_CORPORA,
    eval_seqlen: int = 1024,
    eval_max_tokens: int | None = 8192,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    method_options: dict[str, dict] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    bar=None,
) -> dict:
    """Prune ``model`` once and compare recovery ``methods`` on the same masks and windows; write ``out``.

    ``corpora``: evaluation corpora (names or local .txt/.jsonl paths, as ``calib``). ``budget``: token passes
    each training method may spend (None: ``4 * nsamples * seqlen``). ``method_options``: per method name, the
    options its config accepts (e.g. ``{"lora": {"lr": 3e-4}}``). ``log(message)`` reports progress;
    ``bar(description, total)`` is passed to the perplexity evaluation. Every argument is checked before any work.
    Returns the ``compare.json`` content.
    """
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.export.run_folder import check_output, write_atomically
    from sparsefit.models import load, parse_dtype
    from sparsefit.pipeline.jobs import evaluate_model, parse_list, sparsity_summary, versions
    from sparsefit.pipeline.prune_model import PruneConfig, check_pattern_fits, prune_model, resolve_device
    from sparsefit.prune import parse_pattern
    from sparsefit.recover import RecoveryContext, get_method
    from sparsefit.recover.lora import EVAL_CALLBACK
    from sparsefit.recover.training import model_masks, same_zeros

    say = log or (lambda message: None)
    # --- every check before any work -----------------------------------------------------------------------
    names = parse_methods(methods)
    prune_config = PruneConfig(method=prune, sparsity=sparsity, pattern=pattern, calib=calib, nsamples=nsamples,
                               seqlen=seqlen, seed=seed, batch_size=batch_size, device=device)  # fmt: skip
    prune_config.validate()
    parsed = parse_pattern(pattern)
    method_options = dict(method_options or {})
    stray = sorted(set(method_options) - set(names))
    check(not stray, f"options given for method(s) {', '.join(stray)} that are not in --methods ({', '.join(names)})")
    recovery = {name: get_method(name) for name in names if name != NONE}
    options = {name: _options_for(name, method_options) for name in recovery}
    for name, method in recovery.items():
        reason = method.supports(parsed)
        check(reason is None, f"method {name!r} cannot run with pattern {parsed}: {reason}")
        _validate_options(name, method, options[name], nsamples)
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
    device_ = resolve_device(device)
    out = check_output(out, overwrite)
    budget_tokens = budget if budget is not None else DEFAULT_EPOCHS * nsamples * seqlen

    # --- load, calibrate, evaluate the dense model ---------------------------------------------------------
    began = time.perf_counter()
    say(f"loading {model}")
    loaded = load(model, dtype=dtype_)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    check_pattern_fits(teacher, pattern)
    for name, method in recovery.items():
        check_model = getattr(method, "check_model", None)
        reason = check_model(teacher, options[name]) if check_model else None
        check(reason is None, f"method {name!r} cannot run on this model: {reason}")
    calib_ids = calibration_windows(tokenizer, get_corpus(calib), nsamples, seqlen, seed)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return _ppl_values(evaluate_model(m, tokenizer, ppl=eval_corpora, seqlen=eval_seqlen,
                                          max_tokens=eval_max_tokens, device=device_, bar=bar))  # fmt: skip

    say("evaluating the dense model")
    teacher.requires_grad_(False)
    dense_ppl = evaluate(teacher)

    # --- prune once ------------------------------------------------------------------------------------------
    say(f"pruning: {prune} {pattern if parsed.structured else sparsity}")
    pruned = copy.deepcopy(teacher)
    started = time.perf_counter()
    with PeakMemory(device_) as memory:
        prune_model(pruned, calib_ids, prune_config)
    prune_s = time.perf_counter() - started
    masks = model_masks(pruned)
    summary = sparsity_summary(pruned, pattern)
    pruned_ppl = evaluate(pruned)
    entries: dict[str, dict] = {}
    if NONE in names:
        entries[NONE] = {
            "status": "ok", **_with_gaps(pruned_ppl, dense_ppl, pruned_ppl), "time_s": round(prune_s, 2),
            "peak_mem_mb": memory.peak_mb, "trainable_params": 0, "sparsity": summary["overall"],
            "masks_kept": True, "tokens_per_block": 0,
            "details": {"note": "the pruned model itself; time and memory are the pruning's"},
        }  # fmt: skip
        if parsed.structured:
            entries[NONE]["pattern_ok"] = summary.get("pattern_ok")
    reference = _fingerprint(teacher)

    # --- every method on its own copy of the pruned model -----------------------------------------------
    for name in names:
        if name == NONE:
            continue
        method = recovery[name]
        say(f"recovering with {name}")
        student = copy.deepcopy(pruned)
        ctx_options = dict(options[name])
        meter = PeakMemory(device_)
        eval_s = [0.0]
        if name == "lora":

            def unmerged(m: nn.Module, meter=meter, eval_s=eval_s) -> dict:
                started = time.perf_counter()
                with meter.paused():  # the evaluation is not the method's cost: neither its time nor its memory
                    result = _with_gaps(evaluate(m), dense_ppl, pruned_ppl)
                eval_s[0] += time.perf_counter() - started
                return result

            ctx_options[EVAL_CALLBACK] = unmerged
        ctx = RecoveryContext(
            model=student, teacher=teacher, tokenizer=tokenizer, calib_ids=calib_ids, pattern=parsed,
            device=device_, seed=seed, budget_tokens=budget_tokens if method.trains else None,
            batch_size=batch_size, options=ctx_options,
        )  # fmt: skip
        entry: dict = {"status": "ok"}
        started = time.perf_counter()
        try:
            with meter:
                report = method.run(ctx)
            entry["time_s"] = round(time.perf_counter() - started - eval_s[0], 2)
            entry["peak_mem_mb"] = meter.peak_mb
            student.to("cpu")
            final = sparsity_summary(student, pattern)
            entry.update(_with_gaps(evaluate(student), dense_ppl, pruned_ppl))
            entry["trainable_params"] = int(report.get("trainable_params", 0))
            entry["tokens_per_block"] = tokens_per_block(report, nsamples, seqlen)
            entry["sparsity"] = final["overall"]
            entry["masks_kept"] = same_zeros(student, masks)
            if parsed.structured:
                entry["pattern_ok"] = final.get("pattern_ok")
            if name == "lora" and "unmerged" in report:
                entry["unmerged"] = report.pop("unmerged")
            entry["details"] = report
        except Exception as exc:  # one method's failure must not cost the others their results
            entry = {
                "status": "failed", "error": _first_line(exc), "ppl": {}, "gap_closed": {}, "gap_closed_log": {},
                "time_s": round(time.perf_counter() - started - eval_s[0], 2), "peak_mem_mb": meter.peak_mb,
                "trainable_params": None, "sparsity": None,
            }  # fmt: skip
            say(f"{name} failed: {entry['error']}")
        teacher.to("cpu")
        teacher.requires_grad_(False)
        if not torch.equal(_fingerprint(teacher), reference):
            # A method must never change the teacher; if one did, reload it so the next method is not fooled.
            entry["teacher_restored"] = True
            teacher = load(model, dtype=dtype_).model
            teacher.requires_grad_(False)
        entries[name] = entry
        del student, ctx
        _release_memory()

    result = {
        "command": "compare",
        "model": model,
        "settings": {
            "prune": prune, "sparsity": sparsity if not parsed.structured else parsed.sparsity, "pattern": str(parsed),
            "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "budget_tokens": budget_tokens,
            "budget_note": ("token passes through each block for every training method"
                            + ("" if budget is not None else f" (default: {DEFAULT_EPOCHS} passes over the windows)")),
            "eval_corpora": eval_corpora, "eval_seqlen": eval_seqlen, "eval_max_tokens": eval_max_tokens,
            "device": str(device_), "dtype": dtype, "peak_mem": PeakMemory.describe(device_),
            "method_options": {k: {o: v for o, v in opts.items() if o != EVAL_CALLBACK} for k, opts in options.items()},
        },  # fmt: skip
        "dense": {"ppl": dense_ppl},
        "methods": entries,
        "versions": versions(),
        "total_s": round(time.perf_counter() - began, 1),
    }
    result = _clean(result)

    def writer(tmp: Path) -> None:
        (tmp / "compare.json").write_text(json.dumps(result, indent=2, allow_nan=False))
        (tmp / "compare.md").write_text(compare_markdown(result))
        (tmp / "compare.html").write_text(compare_html(result))

    write_atomically(out, writer, overwrite=overwrite)
    say(f"wrote {out}")
    return result


# --- rendering -----------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (the same in Markdown and HTML)."""
    corpora = result["settings"]["eval_corpora"]
    header = ["method", "status"]
    header += [f"ppl {c}" for c in corpora]
    header += [f"gap closed {c} (lin / log)" for c in corpora]
    header += ["tokens/block", "time s", "peak MB", "trainable", "sparsity"]
    rows = [["dense", "–", *[_fmt(result["dense"]["ppl"].get(c)) for c in corpora], *["–"] * len(corpora),
             "–", "–", "–", "–", "–"]]  # fmt: skip

    def row(label: str, entry: dict) -> list[str]:
        gaps = [f"{_pct(entry.get('gap_closed', {}).get(c))} / {_pct(entry.get('gap_closed_log', {}).get(c))}"
                for c in corpora]  # fmt: skip
        return [label, entry.get("status", "ok"), *[_fmt(entry.get("ppl", {}).get(c)) for c in corpora], *gaps,
                _fmt(entry.get("tokens_per_block")), _fmt(entry.get("time_s"), 1), _fmt(entry.get("peak_mem_mb"), 0),
                _fmt(entry.get("trainable_params")), _fmt(entry.get("sparsity"), 4)]  # fmt: skip

    for name, entry in result["methods"].items():
        rows.append(row(name, entry))
        if "unmerged" in entry:
            rows.append(row(f"{name} (unmerged adapter)", {"status": "ok", **entry["unmerged"]}))
    return header, rows


def _notes(result: dict) -> list[str]:
    s = result["settings"]
    what = f"{s['pattern']}" if s["pattern"] != "unstructured" else f"{s['sparsity']:.0%} unstructured"
    notes = [
        f"model `{result['model']}`, {s['prune']} {what}; calibration `{s['calib']}` {s['nsamples']} x {s['seqlen']} "
        f"tokens (seed {s['seed']}), the same windows and masks for every method",
        f"budget: {s['budget_tokens']:,} {s['budget_note']}",
        f"perplexity: windows of {s['eval_seqlen']} tokens, first {_fmt(s['eval_max_tokens'])} test tokens per corpus",
        "gap closed: (pruned - method) / (pruned - dense) in perplexity (lin) and in log-perplexity (log)",
        f"peak memory: {s['peak_mem']}",
        f"device {s['device']}, dtype {s['dtype']}; `none` is the pruned model (its time and memory are the pruning's)",
    ]
    if "lora" in result["methods"]:
        notes.append("lora: the saved model is merged and re-masked; the unmerged row is the adapter as trained")
    for name, entry in result["methods"].items():
        if entry.get("status") == "failed":
            notes.append(f"{name} failed: {entry.get('error')}")
        if entry.get("teacher_restored"):
            notes.append(f"{name} changed the dense teacher; it was reloaded before the next method")
        if entry.get("status") == "ok" and entry.get("masks_kept") is False and name != "dsnot":
            notes.append(f"{name} changed the zero positions of the masks")
    return notes


def compare_markdown(result: dict) -> str:
    header, rows = table_rows(result)
    lines = ["# sparsefit compare", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *[f"- {note}" for note in _notes(result)], ""]
    return "\n".join(lines)


def _bar_chart(title: str, series: list[tuple[str, dict[str, float | None]]], corpora: list[str]) -> str:
    """A grouped bar chart as inline SVG: one group per method, one bar per corpus; zero line; values labelled."""
    colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"]
    values = [v for _, vals in series for v in vals.values() if v is not None]
    low, high = min([0.0, *values]), max([1.0, *values])
    width, height, left, top, bottom = max(420, 90 * len(series) + 80), 300, 50, 30, 60
    plot_h = height - top - bottom
    group_w = (width - left - 20) / max(1, len(series))
    bar_w = group_w * 0.8 / max(1, len(corpora))

    def y(value: float) -> float:
        return top + (high - value) / (high - low) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'font-family="sans-serif" font-size="11"><title>{html.escape(title)}</title>',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']  # fmt: skip
    for tick in (low, 0.0, 0.5, 1.0, high):
        if low <= tick <= high:
            parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                         f'stroke="{"#333" if tick == 0 else "#ddd"}"/>'
                         f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.0%}</text>')  # fmt: skip
    for g, (label, vals) in enumerate(series):
        x0 = left + g * group_w + group_w * 0.1
        for c, corpus in enumerate(corpora):
            value = vals.get(corpus)
            if value is None:
                continue
            top_y, bottom_y = sorted((y(value), y(0.0)))
            x = x0 + c * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{top_y:.1f}" width="{bar_w - 2:.1f}" height="{bottom_y - top_y:.1f}" '
                         f'fill="{colors[c % len(colors)]}"><title>{html.escape(label)} {html.escape(corpus)}: '
                         f'{value:.1%}</title></rect>')  # fmt: skip
        parts.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                     f'{html.escape(label)}</text>')  # fmt: skip
    for c, corpus in enumerate(corpora):
        x = left + c * 110
        parts.append(f'<rect x="{x}" y="{height - 22}" width="10" height="10" fill="{colors[c % len(colors)]}"/>'
                     f'<text x="{x + 14}" y="{height - 13}">{html.escape(corpus)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def compare_html(result: dict) -> str:
    """A self-contained page: the table, two inline SVG bar charts (gap closed, log and linear), the notes."""
    header, rows = table_rows(result)
    corpora = result["settings"]["eval_corpora"]
    ok = [(name, entry) for name, entry in result["methods"].items() if entry.get("status") == "ok"]
    charts = [
        _bar_chart("Share of the perplexity gap closed, in log-perplexity",
                   [(name, entry.get("gap_closed_log", {})) for name, entry in ok], corpora),
        _bar_chart("Share of the perplexity gap closed, linear",
                   [(name, entry.get("gap_closed", {})) for name, entry in ok], corpora),
    ]  # fmt: skip
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr" + (' class="failed"' if row[1] == "failed" else "") + ">"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )  # fmt: skip
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in _notes(result))
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child"
             "{text-align:left}tr.failed td{background:#fde2e2}svg{display:block;margin:1em 0}")  # fmt: skip
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sparsefit compare</title><style>{style}"
            f"</style></head><body><h1>sparsefit compare</h1><table><thead><tr>{head}</tr></thead><tbody>{body}"
            f"</tbody></table>{''.join(charts)}<ul>{notes}</ul></body></html>\n")  # fmt: skip
