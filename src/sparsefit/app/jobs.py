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
from sparsefit import distributed
from sparsefit.app import defaults
from sparsefit.app import guard as model_guard
from sparsefit.app.streamed import act_dtype as act_dtype_of
from sparsefit.app.streamed import check_resources, open_streamed, parse_size, save_streamed_run
from sparsefit.atomic import check_output, write_atomically, write_file_atomically
from sparsefit.data import calibration_windows, get_corpus, test_stream, window_prefix
from sparsefit.errors import check
from sparsefit.evaluate.exact_match import exact_match, load_generative, split_tasks
from sparsefit.evaluate.perplexity import eval_windows, perplexity
from sparsefit.evaluate.zeroshot import evaluate_tasks
from sparsefit.export.run_folder import read_run
from sparsefit.models import load, parse_dtype
from sparsefit.models.loading import check_seqlen, check_teacher_config, resolve, streamable
from sparsefit.progress import Bar, silent
from sparsefit.prune import PruneConfig, parse_pattern, prune_model, sparsity_summary
from sparsefit.prune.structured import attach_structured
from sparsefit.recover import RecoveryContext, RecoveryMethod, get_method
from sparsefit.recover.base import report_json
from sparsefit.walk import BlockCheckpoint, TeacherStep, resolve_device
from sparsefit.walk.activations import Activations
from sparsefit.walk.blocks import InMemoryBlocks
from sparsefit.walk.checkpoint import FitCheckpoint, resumable
from sparsefit.walk.device import peak_gpu_mib
from sparsefit.walk.targets import check_teacher


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
    chat_template: bool = True,
) -> dict:
    """Perplexity on each corpus's test split, zero-shot accuracy and generative tasks' exact match (a built-in
    such as ``arithmetic``, or a ``.jsonl`` file's held-out part); one progress bar per corpus and task."""
    check(seqlen > 0, f"seqlen {seqlen} must be a positive number of tokens")
    check(max_tokens is None or max_tokens >= seqlen, f"max-tokens {max_tokens} is shorter than seqlen {seqlen}")
    corpora = [get_corpus(name) for name in ppl]  # validate every name before any work
    task_names, generative_names = split_tasks(parse_list(tasks))
    generative = [load_generative(name, limit, tokenizer) for name in generative_names]
    model.to(device)
    results: dict = {}
    if corpora:
        results["ppl"] = {}
    for corpus in corpora:
        stream = test_stream(tokenizer, corpus)
        total = eval_windows(stream, seqlen, max_tokens, corpus.max_windows).shape[0]
        with progress(f"ppl {corpus.name} @ {seqlen}", total) as update:
            res = perplexity(model, stream, seqlen=seqlen, max_tokens=max_tokens, max_windows=corpus.max_windows,
                             batch_size=batch_size, device=device,
                             progress=lambda done, total: update(done=done, total=total))  # fmt: skip
        results["ppl"][corpus.name] = res.to_dict()
    if task_names:
        results["tasks"] = {}
        for task in task_names:
            with progress(f"zero-shot {task}", 0) as update:
                results["tasks"].update(evaluate_tasks(
                    model, tokenizer, [task], limit=limit, device=device,
                    progress=lambda _task, done, total: update(done=done, total=total),
                ))  # fmt: skip
    for task in generative:
        with progress(f"generate {task.name}", len(task.examples)) as update:
            results.setdefault("tasks", {})[task.name] = exact_match(
                model, tokenizer, task, device=device, chat_template=chat_template,
                progress=lambda done, total: update(done=done, total=total),
            )  # fmt: skip
    model.to("cpu")
    return results


def evaluate_streamed(
    folder: Path, *, ppl: list[str], seqlen: int = defaults.EVAL_SEQLEN, max_tokens: int | None = None,
    tasks: list[str] | None = None, limit: int | None = None, device: torch.device | str = "cpu",
    progress: Bar = silent, chat_template: bool = True,
) -> dict:  # fmt: skip
    """Perplexity, zero-shot accuracy and generative tasks' exact match of a local safetensors folder, one block in
    memory at a time (perplexity: the numbers of :func:`evaluate_model`, bit for bit on the CPU; zero-shot and
    generation: up to float rounding, as nothing is padded here)."""
    from sparsefit.evaluate.perplexity import streamed_perplexity
    from sparsefit.evaluate.zeroshot import streamed_tasks

    check(seqlen > 0, f"seqlen {seqlen} must be a positive number of tokens")
    check(max_tokens is None or max_tokens >= seqlen, f"max-tokens {max_tokens} is shorter than seqlen {seqlen}")
    corpora = [get_corpus(name) for name in ppl]
    task_names, generative_names = split_tasks(parse_list(tasks))
    opened = open_streamed(folder, torch.float32)
    generative = [load_generative(name, limit, opened.tokenizer) for name in generative_names]
    if corpora:
        check_seqlen(opened.source.model.config, seqlen)
    results: dict = {"ppl": {}} if corpora else {}
    prefix = window_prefix(opened.tokenizer)  # a BOS when the tokenizer puts one in front of a text
    for corpus in corpora:
        stream = test_stream(opened.tokenizer, corpus)
        with progress(f"ppl {corpus.name} @ {seqlen}", len(opened.source)) as update:
            res = streamed_perplexity(opened.source, stream, seqlen=seqlen, max_tokens=max_tokens,
                                      max_windows=corpus.max_windows, device=device, prefix=prefix,
                                      progress=lambda done, total: update(done=done, total=total))  # fmt: skip
        results["ppl"][corpus.name] = res.to_dict()
    if task_names:
        results["tasks"] = {}
        for task in task_names:
            with progress(f"zero-shot {task}", 0) as update:
                results["tasks"].update(streamed_tasks(
                    opened.source, opened.tokenizer, [task], limit=limit, device=device,
                    progress=lambda _task, done, total: update(done=done, total=total),
                ))  # fmt: skip
    for task in generative:  # greedy generation, one walk of the blocks per new token
        with progress(f"generate {task.name}", len(task.examples)) as update:
            results.setdefault("tasks", {})[task.name] = exact_match(
                None, opened.tokenizer, task, device=device, chat_template=chat_template, source=opened.source,
                progress=lambda done, total: update(done=done, total=total),
            )  # fmt: skip
    return results


def record_results(run_dir: Path, results: dict) -> None:
    """Merge evaluation results into ``run_dir/run.json`` (atomically), where the model card finds them."""
    run, _ = read_run(run_dir)
    merged = run.setdefault("results", {})
    for key, value in results.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    text = json.dumps(run, indent=2)
    distributed.on_main(lambda: write_file_atomically(Path(run_dir) / "run.json", text), "writing run.json")


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
    """Write a run folder (checkpoint with exact zeros, sparsity.json, run.json, the method's files) atomically;
    under torchrun rank 0 writes it and the other ranks wait for it."""

    peak = peak_gpu_mib()
    if peak is not None:  # every command on CUDA reports its peak GPU memory
        run = {**run, "memory": {**run.get("memory", {}), "peak_gpu_mib": peak}}

    def writer(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "sparsity.json").write_text(json.dumps(sparsity, indent=2))
        (tmp / "run.json").write_text(json.dumps(run, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    with resumable(out):  # a full disk keeps the finished blocks for --resume
        distributed.on_main(lambda: write_atomically(out, writer, overwrite=overwrite), "writing the run folder")
    return Path(out)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall-clock seconds of the ``with`` body under ``timings[name]``."""
    began = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - began, 3)


def recovery_files(method: RecoveryMethod, report: dict,
                   guard: model_guard.GuardResult | None = None) -> dict[str, bytes]:  # fmt: skip
    """What a recovered run folder holds besides the checkpoint: ``recovery.json`` and the method's own files; the
    model guard's verdict heads ``report.md`` (which it starts when the method writes none)."""
    files = {"recovery.json": report_json(method.name, report), **method.artifacts(report)}
    if guard is not None:
        files["report.md"] = (guard.markdown() + "\n" + files.get("report.md", b"").decode()).encode()
    return files


def choose_method(
    name: str, options: dict, n_windows: int, device: torch.device, *, pattern: str = "unstructured",
    seed: int | None = None,
) -> tuple[RecoveryMethod, object]:  # fmt: skip
    """``(method, config)`` with every option checked, before any model is loaded."""
    method = get_method(name)
    config = method.configure(options, n_windows, device, seed=seed)
    reason = method.supports(parse_pattern(pattern))
    check(reason is None, f"{name} cannot recover a {pattern} model: {reason}")
    return method, config


def check_outputs(eval_ppl: str | list[str], out: Path, overwrite: bool,
                  inputs: list[tuple[str, object]] = ()) -> list[str]:  # fmt: skip
    """The evaluation corpora (each name checked) and the output folder, before any work: never one of the
    job's ``(role, value)`` ``inputs`` or the evaluation texts, nor a folder holding one."""
    corpora = parse_list(eval_ppl)
    for name in corpora:
        get_corpus(name)
    check_output(out, overwrite, [*inputs, *(("evaluation text", name) for name in corpora)])
    return corpora


def check_evaluation(seqlen: int, max_tokens: int | None, flag: str = "--") -> None:
    """The perplexity window and token cap (options ``{flag}seqlen``, ``{flag}max-tokens``), before any work:
    evaluation comes last, and a bad value found there would throw the whole run away."""
    check(seqlen > 0, f"{flag}seqlen {seqlen} must be a positive number of tokens")
    check(max_tokens is None or max_tokens > 0, f"{flag}max-tokens {max_tokens} must be a positive number of tokens")
    check(max_tokens is None or max_tokens >= seqlen,
          f"{flag}max-tokens {max_tokens} is shorter than {flag}seqlen {seqlen}; give at least {seqlen}")  # fmt: skip


def prune_interleaved(
    model: nn.Module, calib: torch.Tensor, config: PruneConfig, method: RecoveryMethod | None = None,
    method_config=None, *, checkpoint: BlockCheckpoint | None = None, resume: bool = False, progress: Bar = silent,
    source: InMemoryBlocks | None = None, activations: Activations | None = None,
    pruned: model_guard.PrunedBlocks | None = None,
) -> dict:  # fmt: skip
    """Prune ``model`` and, with a block-wise ``method``, recover each block right after pruning it: the order of
    EBFT's and DSnoT's reference code (statistics, targets and masks from the recovered model's own inputs).
    ``pruned`` keeps each block as pruned, before its recovery (the model guard's reference)."""
    steps_before, recover_steps, keep_dense = [], [], False
    if method is not None:
        target = method.target(method_config)
        keep_block = method.needs_teacher_block(method_config)
        # The pruning step keeps the dense block's outputs on the sparse inputs (the sparse-path target) for free;
        # a target with a dense-path share is set before it, while the block is still dense.
        before = target if target is not None and target != "sparse-path" else None
        if before is not None or keep_block:
            steps_before = [TeacherStep(None, target=before, keep_block=keep_block)]
        recover_steps = method.block_steps(method_config, parse_pattern(config.pattern))
        if pruned is not None:
            recover_steps = [pruned, *recover_steps]
        keep_dense = target == "sparse-path"
    return prune_model(model, calib, config, steps_before=steps_before, recover_steps=recover_steps,
                       keep_dense_outputs=keep_dense, checkpoint=checkpoint, resume=resume,
                       progress=progress, source=source, activations=activations)  # fmt: skip


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


def _memory_record(streamed: bool, activations: Activations) -> dict:
    """How the run held its weights and activations, for run.json."""
    return {"streamed": streamed, "act_dtype": str(activations.dtype).replace("torch.", ""),
            "activation_budget": activations.budget, "spilled_sets": activations.spilled}  # fmt: skip


def _window_span(method_config) -> int:
    window_blocks = getattr(method_config, "window_blocks", None)
    return max(window_blocks(), 1) if window_blocks is not None else 1


def _run_prune_streamed(
    folder: Path, model_name: str, config: PruneConfig, out: Path, method, method_config, *, dtype: str,
    overwrite: bool, corpora: list[str], eval_seqlen: int, eval_max_tokens: int | None, trust_remote_code: bool,
    recover: str | None, resume: bool, progress: Bar, act_dtype: torch.dtype, max_memory: int | None,
    guard: str = defaults.GUARD,
) -> dict:  # fmt: skip
    """:func:`run_prune` on a local safetensors folder, one block in memory at a time."""
    device = resolve_device(config.device)
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        opened = open_streamed(folder, parse_dtype(dtype), trust_remote_code)
    source, model = opened.source, opened.source.model
    seqlens = (("--seqlen", config.seqlen), *((("--eval-seqlen", eval_seqlen),) if corpora else ()))
    activations = check_resources(source, out, max_memory=max_memory, trains=method is not None and method.trains,
                                  span=_window_span(method_config), n_windows=config.nsamples, seqlen=config.seqlen,
                                  dtype=act_dtype, seqlens=seqlens)  # fmt: skip
    config.check_model(model)
    if method is not None:
        method.check(model, method_config)
    with timed(timings, "calibration_s"):
        calib = calibration_windows(opened.tokenizer, get_corpus(config.calib), config.nsamples, config.seqlen,
                                    config.seed)  # fmt: skip
    recovery_config = {"method": recover, **method_config.to_dict()} if method is not None else None
    checkpoint = BlockCheckpoint.for_output(
        out, _fingerprint(model=model_name, prune=config.to_dict(), dtype=dtype, recover=recovery_config,
                          act_dtype=str(act_dtype))  # fmt: skip
    )
    guarded = method is not None and guard != "off"
    if guarded:
        with timed(timings, "guard_before_s"):
            windows = model_guard.guard_windows(opened.tokenizer, get_corpus(config.calib), config.nsamples,
                                                config.seqlen, config.seed, calib,
                                                model_guard.guard_length(model.config, config.seqlen, eval_seqlen))
            dense_loss = model_guard.streamed_lm_loss(source, windows, device)
    pruned = model_guard.PrunedBlocks(checkpoint.folder) if guarded else None
    with timed(timings, "prune_s"), resumable(out):
        walked = prune_interleaved(model, calib, config, method, method_config, checkpoint=checkpoint, resume=resume,
                                   progress=progress, source=source, activations=activations,
                                   pruned=pruned)  # fmt: skip
    reports = walked["blocks"]
    verdict = None
    if method is not None:
        if not guarded:
            verdict = model_guard.skipped(guard, None, "off")
        elif not pruned.complete(len(source)):
            verdict = model_guard.skipped(guard, windows, "the blocks before the resumed one were not kept as pruned")
        else:
            with timed(timings, "guard_after_s"), resumable(out):
                verdict = model_guard.check_streamed_recovery(source, pruned, windows, guard, device, dense_loss)
    sparsity = sparsity_summary(model, config.pattern, blocks=source.finished())
    report = method.summarize(method_config, reports, (b for _, b in source.finished())) if method else None

    def make_run(results: dict) -> tuple[dict, dict, dict[str, bytes]]:
        run = {
            "command": "prune",
            "source_model": model_name,
            "config": {**config.to_dict(), "dtype": dtype, "recover": recover},
            "versions": versions(),
            "timings": timings,
            "progress": {"blocks_done": len(reports), "resumed_at": walked["start"]},
            "blocks": reports,
            "results": {"sparsity": sparsity["overall"], **results},
            "memory": _memory_record(True, activations),
        }
        if "owl" in walked:
            run["owl"] = walked["owl"]
        extra = {}
        if method is not None:
            run["recovery"] = recovery_config
            run["guard"] = verdict.to_dict()
            extra = recovery_files(method, report, verdict)
        return run, sparsity, extra

    save_streamed_run(out, opened, make_run, overwrite=overwrite, corpora=[get_corpus(c) for c in corpora],
                      eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens, device=device,
                      activations=Activations(act_dtype, activations.budget), timings=timings,
                      progress=progress)  # fmt: skip
    checkpoint.clear()
    return json.loads((out / "run.json").read_text())


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
    act_dtype: str = "auto",
    max_memory: str | int | None = None,
    stream: bool | None = None,
    guard: str = defaults.GUARD,
) -> dict:
    """Load ``model_name``, prune it with ``config`` and, with ``recover`` (a block-wise method), recover each block
    right after pruning it (EBFT's official order, and DSnoT's); evaluate; save a run folder. The walk is
    checkpointed after every block; ``resume`` continues from the last saved block.

    A local safetensors folder streams (``stream`` None: whenever it can; False: load it whole, as built-ins,
    GGUF files and hub models are): one block in memory at a time, the output written shard by shard.
    ``act_dtype`` is the activations' dtype (auto: float32 on a CPU, bfloat16 on a GPU); beyond ``max_memory``
    (e.g. "24GB") they spill to memory-mapped files in the run's partial folder.

    ``guard`` (fallback, warn, off): after recovery, the model guard (:mod:`sparsefit.app.guard`) compares the
    recovered model with the pruned one on held-out windows of the calibration corpus; ``run["guard"]`` says what
    it found, and with ``fallback`` the pruned model is written when recovery made it worse.
    """
    model_guard.check_mode(guard)
    config.validate()
    check(not (resume and config.slim), "--resume does not continue a structured prune; run it again")
    device = resolve_device(config.device)
    activations_dtype = act_dtype_of(act_dtype, device)
    budget = parse_size(max_memory)
    method = method_config = None
    if recover:
        method, method_config = choose_method(recover, recover_options or {}, config.nsamples, device,
                                              pattern=config.pattern, seed=config.seed)  # fmt: skip
        check(method.blockwise, f"--recover {recover} trains the whole model, not block by block; prune first, "
                                f"then use sparsefit recover --method {recover} (or a recipe)")  # fmt: skip
    corpora = check_outputs(eval_ppl, out, overwrite, [("model", model_name), ("calibration text", config.calib)])
    check_evaluation(eval_seqlen, eval_max_tokens, "--eval-")
    get_corpus(config.calib)  # a calibration file that cannot be read is refused before the model loads
    # A structured prune slices the blocks: its output is not shaped like the source's shards, so it loads whole.
    folder = streamable(model_name) if stream is not False and not config.slim else None
    check(budget is None or folder is not None, f"--max-memory applies only to the streamed path (a local "
          f"safetensors folder, not a structured prune); {model_name!r} is loaded whole")  # fmt: skip
    if folder is not None:
        return _run_prune_streamed(folder, model_name, config, out, method, method_config, dtype=dtype,
                                   overwrite=overwrite, corpora=corpora, eval_seqlen=eval_seqlen,
                                   eval_max_tokens=eval_max_tokens, trust_remote_code=trust_remote_code,
                                   recover=recover, resume=resume, progress=progress, act_dtype=activations_dtype,
                                   max_memory=budget, guard=guard)  # fmt: skip
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        loaded = load(model_name, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    check_seqlen(loaded.model.config, config.seqlen)
    if corpora:
        check_seqlen(loaded.model.config, eval_seqlen, "--eval-seqlen")
    config.check_model(loaded.model)
    if method is not None:
        method.check(loaded.model, method_config)
    with timed(timings, "calibration_s"):
        calib = calibration_windows(loaded.tokenizer, get_corpus(config.calib), config.nsamples, config.seqlen,
                                    config.seed)  # fmt: skip
    recovery_config = {"method": recover, **method_config.to_dict()} if method is not None else None
    checkpoint = BlockCheckpoint.for_output(
        out, _fingerprint(model=loaded.source, prune=config.to_dict(), dtype=dtype, recover=recovery_config,
                          act_dtype=str(activations_dtype))  # fmt: skip
    )
    activations = Activations(activations_dtype, budget)
    guarded = method is not None and guard != "off"
    if guarded:
        with timed(timings, "guard_before_s"):
            windows = model_guard.guard_windows(
                loaded.tokenizer, get_corpus(config.calib), config.nsamples, config.seqlen, config.seed, calib,
                model_guard.guard_length(loaded.model.config, config.seqlen, eval_seqlen))
            dense_loss = model_guard.lm_loss(loaded.model, windows, device, config.batch_size)
    pruned = model_guard.PrunedBlocks(checkpoint.folder) if guarded else None  # files: a --resume finds them
    with timed(timings, "prune_s"), resumable(out):
        walked = prune_interleaved(loaded.model, calib, config, method, method_config, checkpoint=checkpoint,
                                   resume=resume, progress=progress, activations=activations,
                                   pruned=pruned)  # fmt: skip
    reports = walked["blocks"]
    verdict = None
    if method is not None:
        blocks = method.blocks_of(loaded.model)
        if not guarded:
            verdict = model_guard.skipped(guard, None, "off")
        elif not pruned.complete(len(blocks)):  # a walk resumed from a checkpoint written before the guard existed
            verdict = model_guard.skipped(guard, windows, "the blocks before the resumed one were not kept as pruned")
        else:
            with timed(timings, "guard_after_s"):
                verdict = model_guard.check_recovery(loaded.model, blocks, pruned.states(len(blocks)), windows,
                                                     guard, device, dense_loss, config.batch_size)  # fmt: skip
        del pruned
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
        "memory": _memory_record(False, activations),
    }
    if "owl" in walked:  # OWL: every block's outlier ratio and sparsity (the block reports carry them too)
        run["owl"] = walked["owl"]
    if "structured" in walked:  # the widths kept, the share removed, where FLAP's bias went
        run["structured"] = walked["structured"]
    extra = {}
    if method is not None:
        report = method.summarize(method_config, reports, method.blocks_of(loaded.model))
        run["recovery"] = recovery_config
        run["guard"] = verdict.to_dict()
        extra = recovery_files(method, report, verdict)
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
    act_dtype: str = "auto",
    max_memory: str | int | None = None,
    stream: bool | None = None,
    guard: str = defaults.GUARD,
) -> dict:
    """Recover an existing sparse run folder with any method against a dense teacher (the two-step mode).

    The teacher defaults to the source model recorded in ``run_dir/run.json``; the calibration settings default
    to the ones the masks were made with. Block-wise methods checkpoint every block and ``resume``.
    Block-wise methods stream a run folder of safetensors shards (``stream``, ``act_dtype`` and ``max_memory`` as
    in :func:`run_prune`); the teacher streams too when it is a local safetensors folder (a built-in's cached
    copy included), else it is loaded whole.

    ``guard``: the model guard, as in :func:`run_prune` (the reference is the run folder's model, before recovery),
    for every method.
    """
    model_guard.check_mode(guard)
    source_run, source_sparsity = read_run(run_dir)
    source_config = source_run.get("config", {})
    teacher = teacher or source_run.get("source_model")
    check(bool(teacher), f"{run_dir} records no source model in run.json; pass --teacher")
    # None: as the masks were made (a 0 given is refused below, never replaced)
    calib = source_config.get("calib", defaults.PRUNE.calib) if calib is None else calib
    nsamples = source_config.get("nsamples", defaults.PRUNE.nsamples) if nsamples is None else nsamples
    seqlen = source_config.get("seqlen", defaults.PRUNE.seqlen) if seqlen is None else seqlen
    seed = source_config.get("seed", defaults.PRUNE.seed) if seed is None else seed
    check(nsamples > 0, f"nsamples {nsamples} must be a positive number of windows")
    distributed.check_windows(nsamples)
    check(seqlen > 0, f"seqlen {seqlen} must be a positive number of tokens")
    check(batch_size > 0, f"batch size {batch_size} must be positive")
    check(budget is None or budget > 0, f"budget {budget} must be a positive number of tokens")
    device_ = resolve_device(device)
    pattern = source_sparsity.get("pattern", "unstructured")
    method, config = choose_method(method_name, options or {}, nsamples, device_, pattern=pattern, seed=seed)
    check_teacher_config(str(run_dir), teacher)  # every method, before either model loads
    corpora = check_outputs(eval_ppl, out, overwrite, [("run folder", run_dir), ("teacher", teacher),
                                                       ("calibration text", calib)])  # fmt: skip
    check_evaluation(eval_seqlen, eval_max_tokens, "--eval-")
    get_corpus(calib)  # a calibration file that cannot be read is refused before the models load
    activations_dtype = act_dtype_of(act_dtype, device_)
    max_bytes = parse_size(max_memory)
    settings = dict(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    recovery_config = {"method": method_name, **config.to_dict()}
    fingerprint = _fingerprint(source=str(run_dir), teacher=teacher, recover=recovery_config, budget=budget,
                               act_dtype=str(activations_dtype), **settings)  # fmt: skip
    streams = stream is not False and method.blockwise and not parse_pattern(pattern).slim  # sliced: in memory
    folder = streamable(str(run_dir)) if streams else None
    check(max_bytes is None or folder is not None, f"--max-memory applies only to the streamed path (a block-wise "
          f"method on a run folder of safetensors); {method_name} on {str(run_dir)!r} loads it whole")  # fmt: skip
    if folder is not None:
        def make_run(results: dict, sparsity: dict, report: dict, timings: dict, activations: Activations) -> dict:
            return {
                "command": "recover", "source_model": teacher, "source_run": str(run_dir),
                "config": {**source_config, **settings, "recover": method_name, "device": device},
                "recovery": recovery_config, "versions": versions(), "timings": timings,
                "results": {"sparsity": sparsity["overall"], **results},
                "progress": {"blocks_done": len(report.get("blocks", []))},
                "memory": _memory_record(True, activations),
            }  # fmt: skip

        return _run_recover_streamed(
            folder, teacher, out, method, config, pattern=pattern, calib=calib, nsamples=nsamples, seqlen=seqlen,
            seed=seed, batch_size=batch_size, device=device_, budget=budget, overwrite=overwrite, resume=resume,
            corpora=corpora, eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens, progress=progress,
            act_dtype=activations_dtype, max_memory=max_bytes, fingerprint=fingerprint, make_run=make_run,
            guard=guard,
        )  # fmt: skip
    fit_checkpoint = fit_checkpoint_for(out, fingerprint, resume) if not method.blockwise else None
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        sparse = load(str(run_dir))
        dense = load(teacher)
    if not method.blockwise:  # a hub teacher, whose config.json was not at hand (block-wise runs check it in run())
        check_teacher(sparse.model, dense.model, same_shapes=not parse_pattern(pattern).slim)
    if parse_pattern(pattern).slim:  # the share removed, measured against the dense teacher
        attach_structured(sparse.model, dense.model)
    check_seqlen(sparse.model.config, seqlen)
    if corpora:
        check_seqlen(sparse.model.config, eval_seqlen, "--eval-seqlen")
    with timed(timings, "calibration_s"):
        calib_ids = calibration_windows(sparse.tokenizer, get_corpus(calib), nsamples, seqlen, seed)
    checkpoint = BlockCheckpoint.for_output(out, fingerprint) if method.blockwise else None
    activations = Activations(activations_dtype, max_bytes)
    if guard != "off":
        with timed(timings, "guard_before_s"):
            windows = model_guard.guard_windows(sparse.tokenizer, get_corpus(calib), nsamples, seqlen, seed, calib_ids,
                                                model_guard.guard_length(sparse.model.config, seqlen, eval_seqlen))
            dense_loss = model_guard.lm_loss(dense.model, windows, device_, batch_size)
            before = model_guard.snapshot([sparse.model])
    ctx = RecoveryContext(
        model=sparse.model, teacher=dense.model, tokenizer=sparse.tokenizer, calib_ids=calib_ids,
        pattern=parse_pattern(pattern), device=device_, seed=seed, budget_tokens=budget, batch_size=batch_size,
        progress=progress, checkpoint=checkpoint, resume=resume, activations=activations,
        fit_checkpoint=fit_checkpoint,
    )  # fmt: skip
    with timed(timings, "recover_s"), resumable(out):
        report = method.run(ctx, config)
    if guard == "off":
        verdict = model_guard.skipped(guard, None, "off")
    else:
        with timed(timings, "guard_after_s"):
            verdict = model_guard.check_recovery(sparse.model, [sparse.model], before, windows, guard, device_,
                                                 dense_loss, batch_size)  # fmt: skip
        del before
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
        "guard": verdict.to_dict(),
    }
    if method.blockwise:
        run["progress"] = {"blocks_done": len(report.get("blocks", []))}
        run["memory"] = _memory_record(False, activations)
    save_run(out, sparse.model, sparse.tokenizer, run, sparsity, overwrite=overwrite,
             extra_files=recovery_files(method, report, verdict))  # fmt: skip
    for kept in checkpoint, fit_checkpoint:
        if kept is not None:
            kept.clear()
    return {**run, "report": report}


def fit_checkpoint_for(out: Path, fingerprint: dict, resume: bool) -> FitCheckpoint:
    """The fit checkpoint of a whole-model run writing ``out``, saved every ``defaults.FIT_CHECKPOINT_EVERY_S``; a
    resume whose saved settings differ is refused here, before the model loads."""
    checkpoint = FitCheckpoint.for_output(out, fingerprint, resume=resume, every_s=defaults.FIT_CHECKPOINT_EVERY_S)
    checkpoint.saved()
    return checkpoint


def _run_recover_streamed(
    folder: Path, teacher: str, out: Path, method: RecoveryMethod, config, *, pattern: str, calib: str,
    nsamples: int, seqlen: int, seed: int, batch_size: int, device: torch.device, budget: int | None,
    overwrite: bool, resume: bool, corpora: list[str], eval_seqlen: int, eval_max_tokens: int | None,
    progress: Bar, act_dtype: torch.dtype, max_memory: int | None, fingerprint: dict, make_run,
    guard: str = defaults.GUARD,
) -> dict:  # fmt: skip
    """:func:`run_recover` of a block-wise method on a run folder of safetensors shards, one block at a time."""
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        sparse = open_streamed(folder, torch.float32)
        teacher_folder = resolve(teacher)
        if teacher_folder is not None and streamable(str(teacher_folder)) is not None:
            dense = open_streamed(teacher_folder, torch.float32, tokenizer=False).source  # one block at a time
        else:
            dense = load(teacher).model
    model = sparse.source.model
    seqlens = (("--seqlen", seqlen), *((("--eval-seqlen", eval_seqlen),) if corpora else ()))
    activations = check_resources(sparse.source, out, max_memory=max_memory, trains=method.trains,
                                  span=_window_span(config), n_windows=nsamples, seqlen=seqlen, dtype=act_dtype,
                                  seqlens=seqlens)  # fmt: skip
    with timed(timings, "calibration_s"):
        calib_ids = calibration_windows(sparse.tokenizer, get_corpus(calib), nsamples, seqlen, seed)
    checkpoint = BlockCheckpoint.for_output(out, fingerprint)
    ctx = RecoveryContext(
        model=model, teacher=dense, tokenizer=sparse.tokenizer, calib_ids=calib_ids, pattern=parse_pattern(pattern),
        device=device, seed=seed, budget_tokens=budget, batch_size=batch_size, progress=progress,
        checkpoint=checkpoint, resume=resume, source=sparse.source, activations=activations,
    )  # fmt: skip
    if guard != "off":
        with timed(timings, "guard_before_s"):
            windows = model_guard.guard_windows(sparse.tokenizer, get_corpus(calib), nsamples, seqlen, seed, calib_ids,
                                                model_guard.guard_length(model.config, seqlen, eval_seqlen))
    with timed(timings, "recover_s"), resumable(out):
        report = method.run(ctx, config)
    if guard == "off":
        verdict = model_guard.skipped(guard, None, "off")
    else:  # the pruned model is the run folder the walk reads
        with timed(timings, "guard_after_s"), resumable(out):
            verdict = model_guard.check_streamed_recovery(sparse.source, None, windows, guard, device)
    sparsity = sparsity_summary(model, pattern, blocks=sparse.source.finished())

    def files(results: dict) -> tuple[dict, dict, dict[str, bytes]]:
        run = {**make_run(results, sparsity, report, timings, activations), "guard": verdict.to_dict()}
        return run, sparsity, recovery_files(method, report, verdict)

    save_streamed_run(out, sparse, files, overwrite=overwrite, corpora=[get_corpus(c) for c in corpora],
                      eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens, device=device,
                      activations=Activations(act_dtype, activations.budget), timings=timings,
                      progress=progress)  # fmt: skip
    checkpoint.clear()
    return {**json.loads((out / "run.json").read_text()), "report": report}
