"""Whole jobs built from the stages: prune (optionally with interleaved recovery), recover, evaluate.

The CLI and recipes call these; they take plain values and callbacks (``progress``), never parse arguments,
and check every argument before any model is loaded.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import sparsefit
from sparsefit.app import defaults
from sparsefit.atomic import check_output, write_atomically, write_file_atomically
from sparsefit.data import calibration_windows, get_corpus, test_stream, window_prefix
from sparsefit.errors import UsageError, check
from sparsefit.evaluate.perplexity import eval_windows, perplexity
from sparsefit.evaluate.zeroshot import evaluate_tasks, parse_tasks
from sparsefit.export.run_folder import read_run
from sparsefit.models import load, parse_dtype
from sparsefit.progress import Bar, silent
from sparsefit.prune import PruneConfig, parse_pattern, prune_model, sparsity_summary
from sparsefit.prune.structured import attach_structured
from sparsefit.recover import RecoveryContext, RecoveryMethod, get_method
from sparsefit.recover.base import report_json
from sparsefit.walk import BlockCheckpoint, TeacherStep, resolve_device


def versions() -> dict:
    import transformers

    return {
        "sparsefit": sparsefit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def parse_list(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"wiki,books"`` -> ``["wiki", "books"]``; empty -> ``[]``."""
    if text is None:
        return []
    items = list(text) if isinstance(text, (list, tuple)) else text.split(",")
    return [item.strip() for item in items if item.strip()]


def evaluate_model(
    model: nn.Module,
    tokenizer,
    *,
    ppl: list[str],
    seqlen: int = defaults.EVAL_SEQLEN,
    max_tokens: int | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: Bar = silent,
) -> dict:
    """Perplexity on each corpus's test split and zero-shot accuracy; one progress bar per corpus and task."""
    check(seqlen > 0, f"seqlen {seqlen} must be a positive number of tokens")
    check(max_tokens is None or max_tokens >= seqlen, f"max-tokens {max_tokens} is shorter than seqlen {seqlen}")
    corpora = [get_corpus(name) for name in ppl]  # validate every name before any work
    task_names = parse_tasks(",".join(tasks)) if tasks else []
    model.to(device)
    results: dict = {}
    if corpora:
        results["ppl"] = {}
    for corpus in corpora:
        stream, prefix = test_stream(tokenizer, corpus), window_prefix(tokenizer)  # prefix: a BOS if it adds one
        total = eval_windows(stream, seqlen, max_tokens, corpus.max_windows, prefix).shape[0]
        with progress(f"ppl {corpus.name} @ {seqlen}", total) as update:
            res = perplexity(model, stream, seqlen=seqlen, max_tokens=max_tokens, max_windows=corpus.max_windows,
                             batch_size=batch_size, device=device, prefix=prefix,
                             progress=lambda done, _total: update(done=done))  # fmt: skip
        results["ppl"][corpus.name] = res.to_dict()
    if task_names:
        results["tasks"] = {}
        for task in task_names:
            with progress(f"zero-shot {task}", 0) as update:
                results["tasks"].update(evaluate_tasks(
                    model, tokenizer, [task], limit=limit, device=device,
                    progress=lambda _task, done, total: update(done=done, total=total),
                ))  # fmt: skip
    model.to("cpu")
    return results


def record_results(run_dir: Path, results: dict) -> None:
    """Merge evaluation results into ``run_dir/run.json`` (atomically), where the model card finds them."""
    run, _ = read_run(run_dir)
    merged = run.setdefault("results", {})
    for key, value in results.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    write_file_atomically(Path(run_dir) / "run.json", json.dumps(run, indent=2))


def save_run(
    out: Path,
    model: nn.Module,
    tokenizer,
    run: dict,
    sparsity: dict,
    *,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a run folder (checkpoint with exact zeros, sparsity.json, run.json, the method's files) atomically."""

    def writer(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "sparsity.json").write_text(json.dumps(sparsity, indent=2))
        (tmp / "run.json").write_text(json.dumps(run, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_atomically(out, writer, overwrite=overwrite)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall-clock seconds of the ``with`` body under ``timings[name]``."""
    began = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - began, 3)


def recovery_files(method: RecoveryMethod, report: dict) -> dict[str, bytes]:
    """What a recovered run folder holds besides the checkpoint: ``recovery.json`` and the method's own files."""
    return {"recovery.json": report_json(method.name, report), **method.artifacts(report)}


def choose_method(
    name: str, options: dict, n_windows: int, device: torch.device, *, pattern: str = "unstructured",
    seed: int | None = None, resume: bool = False,
) -> tuple[RecoveryMethod, object]:  # fmt: skip
    """``(method, config)`` with every option checked, before any model is loaded."""
    method = get_method(name)
    if resume and not method.blockwise:
        raise UsageError(f"--resume continues block-wise methods; {name} trains the whole model, run it again")
    config = method.configure(options, n_windows, device, seed=seed)
    reason = method.supports(parse_pattern(pattern))
    check(reason is None, f"{name} cannot recover a {pattern} model: {reason}")
    return method, config


def check_outputs(eval_ppl: str | list[str], out: Path, overwrite: bool) -> list[str]:
    """The evaluation corpora (each name checked) and the output folder, before any work."""
    corpora = parse_list(eval_ppl)
    for name in corpora:
        get_corpus(name)
    check_output(out, overwrite)
    return corpora


def prune_interleaved(
    model: nn.Module, calib: torch.Tensor, config: PruneConfig, method: RecoveryMethod | None = None,
    method_config=None, *, checkpoint: BlockCheckpoint | None = None, resume: bool = False, progress: Bar = silent,
) -> dict:  # fmt: skip
    """Prune ``model`` and, with a block-wise ``method``, recover each block right after pruning it: the order of
    EBFT's and DSnoT's reference code (statistics, targets and masks from the recovered model's own inputs)."""
    steps_before, recover_steps, keep_dense = [], [], False
    if method is not None:
        target = method.target(method_config)
        keep_block = method.needs_teacher_block(method_config)
        if target == "dense-path" or keep_block:
            steps_before = [TeacherStep(None, target="dense-path" if target == "dense-path" else None,
                                        keep_block=keep_block)]  # fmt: skip
        recover_steps = method.block_steps(method_config, parse_pattern(config.pattern))
        keep_dense = target == "sparse-path"
    return prune_model(model, calib, config, steps_before=steps_before, recover_steps=recover_steps,
                       keep_dense_outputs=keep_dense, checkpoint=checkpoint, resume=resume,
                       progress=progress)  # fmt: skip


def _evaluate_and_sparsity(model, tokenizer, pattern, corpora, seqlen, max_tokens, device, timings, progress):
    """The finished model's sparsity report and results (sparsity, plus perplexity when corpora are asked)."""
    sparsity = sparsity_summary(model, pattern)
    results: dict = {"sparsity": sparsity["overall"]}
    if corpora:
        with timed(timings, "eval_s"):
            results.update(evaluate_model(model, tokenizer, ppl=corpora, seqlen=seqlen, max_tokens=max_tokens,
                                          device=device, progress=progress))  # fmt: skip
    return sparsity, results


def _fingerprint(**parts) -> dict:
    return json.loads(json.dumps(parts, default=str))


def run_prune(
    model_name: str,
    config: PruneConfig,
    out: Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    eval_ppl: str | list[str] = "",
    eval_seqlen: int = defaults.EVAL_SEQLEN,
    eval_max_tokens: int | None = None,
    trust_remote_code: bool = False,
    recover: str | None = None,
    recover_options: dict | None = None,
    resume: bool = False,
    progress: Bar = silent,
) -> dict:
    """Load ``model_name``, prune it with ``config`` and, with ``recover`` (a block-wise method), recover each block
    right after pruning it (EBFT's official order, and DSnoT's); evaluate; save a run folder. The walk is
    checkpointed after every block; ``resume`` continues from the last saved block.
    """
    config.validate()
    check(not (resume and config.slim), "--resume does not continue a structured prune; run it again")
    device = resolve_device(config.device)
    method = method_config = None
    if recover:
        method, method_config = choose_method(recover, recover_options or {}, config.nsamples, device,
                                              pattern=config.pattern, seed=config.seed)  # fmt: skip
        check(method.blockwise, f"--recover {recover} trains the whole model, not block by block; prune first, "
                                f"then use sparsefit recover --method {recover} (or a recipe)")  # fmt: skip
    corpora = check_outputs(eval_ppl, out, overwrite)
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        loaded = load(model_name, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    config.check_model(loaded.model)
    if method is not None:
        method.check(loaded.model, method_config)
    with timed(timings, "calibration_s"):
        calib = calibration_windows(loaded.tokenizer, get_corpus(config.calib), config.nsamples, config.seqlen,
                                    config.seed)  # fmt: skip
    recovery_config = {"method": recover, **method_config.to_dict()} if method is not None else None
    checkpoint = BlockCheckpoint.for_output(
        out, _fingerprint(model=loaded.source, prune=config.to_dict(), dtype=dtype, recover=recovery_config)
    )
    with timed(timings, "prune_s"):
        walked = prune_interleaved(loaded.model, calib, config, method, method_config, checkpoint=checkpoint,
                                   resume=resume, progress=progress)  # fmt: skip
    reports = walked["blocks"]
    sparsity, results = _evaluate_and_sparsity(loaded.model, loaded.tokenizer, config.pattern, corpora, eval_seqlen,
                                               eval_max_tokens, device, timings, progress)  # fmt: skip
    run = {
        "command": "prune",
        "source_model": loaded.source,
        "config": {**config.to_dict(), "dtype": dtype, "recover": recover},
        "versions": versions(),
        "timings": timings,
        "progress": {"blocks_done": len(reports), "resumed_at": walked["start"]},
        "blocks": reports,
        "results": results,
    }
    if "owl" in walked:  # OWL: every block's outlier ratio and sparsity (the block reports carry them too)
        run["owl"] = walked["owl"]
    if "structured" in walked:  # the widths kept, the share removed, where FLAP's bias went
        run["structured"] = walked["structured"]
    extra = {}
    if method is not None:
        report = method.summarize(method_config, reports, loaded.model)
        run["recovery"] = recovery_config
        extra = recovery_files(method, report)
    save_run(out, loaded.model, loaded.tokenizer, run, sparsity, overwrite=overwrite, extra_files=extra)
    checkpoint.clear()
    return run


def run_recover(
    run_dir: Path,
    out: Path,
    method_name: str = defaults.RECOVER_METHOD,
    options: dict | None = None,
    *,
    teacher: str | None = None,
    calib: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int | None = None,
    batch_size: int = defaults.PRUNE.batch_size,
    device: str = "auto",
    budget: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    eval_ppl: str | list[str] = "",
    eval_seqlen: int = defaults.EVAL_SEQLEN,
    eval_max_tokens: int | None = None,
    progress: Bar = silent,
) -> dict:
    """Recover an existing sparse run folder with any method against a dense teacher (the two-step mode).

    The teacher defaults to the source model recorded in ``run_dir/run.json``; the calibration settings default
    to the ones the masks were made with. Block-wise methods checkpoint every block and ``resume``.
    """
    source_run, source_sparsity = read_run(run_dir)
    source_config = source_run.get("config", {})
    teacher = teacher or source_run.get("source_model")
    check(bool(teacher), f"{run_dir} records no source model in run.json; pass --teacher")
    calib = calib or source_config.get("calib", defaults.PRUNE.calib)
    nsamples = nsamples or source_config.get("nsamples", defaults.PRUNE.nsamples)
    seqlen = seqlen or source_config.get("seqlen", defaults.PRUNE.seqlen)
    seed = source_config.get("seed", defaults.PRUNE.seed) if seed is None else seed
    check(nsamples > 0, f"nsamples {nsamples} must be a positive number of windows")
    check(seqlen > 0, f"seqlen {seqlen} must be a positive number of tokens")
    check(batch_size > 0, f"batch size {batch_size} must be positive")
    check(budget is None or budget > 0, f"budget {budget} must be a positive number of tokens")
    device_ = resolve_device(device)
    pattern = source_sparsity.get("pattern", "unstructured")
    method, config = choose_method(method_name, options or {}, nsamples, device_, pattern=pattern, seed=seed,
                                   resume=resume)  # fmt: skip
    corpora = check_outputs(eval_ppl, out, overwrite)
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        sparse = load(str(run_dir))
        dense = load(teacher)
    if parse_pattern(pattern).slim:  # the share removed, measured against the dense teacher
        attach_structured(sparse.model, dense.model)
    with timed(timings, "calibration_s"):
        calib_ids = calibration_windows(sparse.tokenizer, get_corpus(calib), nsamples, seqlen, seed)
    settings = dict(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    recovery_config = {"method": method_name, **config.to_dict()}
    checkpoint = None
    if method.blockwise:
        checkpoint = BlockCheckpoint.for_output(
            out, _fingerprint(source=str(run_dir), teacher=teacher, recover=recovery_config, budget=budget, **settings)
        )
    ctx = RecoveryContext(
        model=sparse.model, teacher=dense.model, tokenizer=sparse.tokenizer, calib_ids=calib_ids,
        pattern=parse_pattern(pattern), device=device_, seed=seed, budget_tokens=budget, batch_size=batch_size,
        progress=progress, checkpoint=checkpoint, resume=resume,
    )  # fmt: skip
    with timed(timings, "recover_s"):
        report = method.run(ctx, config)
    sparsity, results = _evaluate_and_sparsity(sparse.model, sparse.tokenizer, pattern, corpora, eval_seqlen,
                                               eval_max_tokens, device_, timings, progress)  # fmt: skip
    run = {
        "command": "recover",
        "source_model": teacher,
        "source_run": str(run_dir),
        "config": {**source_config, **settings, "recover": method_name, "device": device},
        "recovery": recovery_config,
        "versions": versions(),
        "timings": timings,
        "results": results,
    }
    if method.blockwise:
        run["progress"] = {"blocks_done": len(report.get("blocks", []))}
    save_run(out, sparse.model, sparse.tokenizer, run, sparsity, overwrite=overwrite,
             extra_files=recovery_files(method, report))  # fmt: skip
    if checkpoint is not None:
        checkpoint.clear()
    return {**run, "report": report}
