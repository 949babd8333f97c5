"""Whole jobs built from the stages: prune a model and save a run folder, evaluate a model.

The CLI and recipes call these; they take plain values and callbacks, never parse arguments.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

import sparsefit
from sparsefit.errors import check
from sparsefit.prune import sparsity_report


def versions() -> dict:
    import transformers

    return {
        "sparsefit": sparsefit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def parse_list(text: str | list[str] | None) -> list[str]:
    """``"wiki,books"`` -> ``["wiki", "books"]``; empty -> ``[]``."""
    if text is None:
        return []
    items = text if isinstance(text, list) else text.split(",")
    return [item.strip() for item in items if item.strip()]


def evaluate_model(
    model: nn.Module,
    tokenizer,
    *,
    ppl: list[str],
    seqlen: int = 1024,
    max_tokens: int | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    bar=None,
) -> dict:
    """Perplexity on each corpus's test split and zero-shot accuracy; ``bar(description, total)`` shows progress."""
    from sparsefit.data import get_corpus, test_stream
    from sparsefit.evaluate.perplexity import perplexity

    check(seqlen > 0, f"seqlen {seqlen} must be a positive number of tokens")
    check(max_tokens is None or max_tokens >= seqlen, f"max-tokens {max_tokens} is shorter than seqlen {seqlen}")
    corpora = [get_corpus(name) for name in ppl]  # validate every name before any work
    task_names: list[str] = []
    if tasks:
        from sparsefit.evaluate.zeroshot import parse_tasks

        task_names = parse_tasks(",".join(tasks))
    model.to(device)
    results: dict = {}
    if corpora:
        results["ppl"] = {}
    for corpus in corpora:
        stream = test_stream(tokenizer, corpus)
        total = (min(stream.shape[1], max_tokens or stream.shape[1])) // seqlen
        with _maybe_bar(bar, f"ppl {corpus.name} @ {seqlen}", total) as update:
            res = perplexity(
                model,
                stream,
                seqlen=seqlen,
                max_tokens=max_tokens,
                batch_size=batch_size,
                device=device,
                progress=(lambda done, _total: update(done=done)) if update else None,
            )
        results["ppl"][corpus.name] = res.to_dict()
    if task_names:
        from sparsefit.evaluate.zeroshot import evaluate_tasks

        results["tasks"] = {}
        for task in task_names:
            with _maybe_bar(bar, f"zero-shot {task}", 1) as update:
                progress = (lambda _t, done, total: update(done=done / total)) if update else None
                results["tasks"].update(
                    evaluate_tasks(model, tokenizer, [task], limit=limit, device=device, progress=progress)
                )
    model.to("cpu")
    return results


def _maybe_bar(bar, description: str, total: int):
    return bar(description, total) if bar else nullcontext()


def sparsity_summary(model: nn.Module, pattern: str) -> dict:
    from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
    from sparsefit.prune import check_pattern, parse_pattern

    report = sparsity_report(model)
    report["pattern"] = pattern
    parsed = parse_pattern(pattern)
    if parsed.structured:
        report["pattern_ok"] = all(
            check_pattern(weight_matrix(layer), parsed)
            for block in get_adapter(model).get_blocks(model)
            for layer in prunable_layers(block).values()
        )
    return report


def record_results(run_dir: Path, results: dict) -> None:
    """Merge evaluation results into ``run_dir/run.json`` (atomically), where the model card finds them."""
    from sparsefit.export.run_folder import read_run, write_file_atomically

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
    """Write a run folder (checkpoint with exact zeros, sparsity.json, run.json) atomically."""
    from sparsefit.export.run_folder import write_atomically

    def writer(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sparsity.json").write_text(json.dumps(sparsity, indent=2))
        (tmp / "run.json").write_text(json.dumps(run, indent=2))
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


def _sparsity_and_results(model, tokenizer, pattern, corpora, seqlen, max_tokens, device, timings) -> tuple[dict, dict]:
    """The finished model's sparsity report, and its results: sparsity, plus perplexity when corpora are asked."""
    from sparsefit.progress import bar

    sparsity = sparsity_summary(model, pattern)
    results: dict = {"sparsity": sparsity["overall"]}
    if corpora:
        with timed(timings, "eval_s"):
            results.update(evaluate_model(model, tokenizer, ppl=corpora, seqlen=seqlen, max_tokens=max_tokens,
                                          device=device, bar=bar))  # fmt: skip
    return sparsity, results


def _fingerprint(**parts) -> dict:
    return json.loads(json.dumps(parts, default=str))


def _ebft_steps(recover, on_fit):
    from sparsefit.recover.ebft import EBFTStep

    return [EBFTStep(recover, on_fit=on_fit)]


def run_prune(
    model_name: str,
    config,
    out: Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    eval_ppl: str | list[str] = "",
    eval_seqlen: int = 1024,
    eval_max_tokens: int | None = None,
    trust_remote_code: bool = False,
    recover=None,
    resume: bool = False,
) -> dict:
    """Load ``model_name``, prune it with ``config`` (a PruneConfig) and, when ``recover`` (an EBFTConfig)
    is given, fine-tune each block right after pruning it (EBFT's official order); evaluate; save a run
    folder. The walk checkpoints after every block; ``resume`` continues from the last saved block.
    """
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import get_adapter, load, parse_dtype
    from sparsefit.pipeline.checkpoint import BlockCheckpoint
    from sparsefit.pipeline.prune_model import check_pattern_fits, prune_model, resolve_device
    from sparsefit.pipeline.targets import TargetStep
    from sparsefit.progress import bar

    config.validate()
    if recover is not None:
        recover.validate(config.nsamples)
    corpora = parse_list(eval_ppl)
    for name in corpora:
        get_corpus(name)
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        loaded = load(model_name, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    check_pattern_fits(loaded.model, config.pattern)
    with timed(timings, "calibration_s"):
        calib = calibration_windows(
            loaded.tokenizer, get_corpus(config.calib), config.nsamples, config.seqlen, config.seed
        )
    recover_dict = recover.to_dict() if recover is not None else None
    checkpoint = BlockCheckpoint.for_output(
        out, _fingerprint(model=loaded.source, prune=config.to_dict(), dtype=dtype, recover=recover_dict)
    )
    start, reports, carry = checkpoint.start(resume)
    blocks = get_adapter(loaded.model).get_blocks(loaded.model)
    checkpoint.restore_blocks(blocks, start)

    steps_before, recover_steps, fits = [], [], {}
    dense_path = None
    if recover is not None:
        if recover.target == "dense-path":
            dense_path = TargetStep(target="dense-path", dense_inputs=carry.get("dense_inputs"))
            steps_before.append(dense_path)
        recover_steps = _ebft_steps(recover, on_fit=lambda index, fit: fits.__setitem__(index, fit))
    label = f"{config.method} {config.sparsity if config.pattern == 'unstructured' else config.pattern}"
    label += " + ebft" if recover is not None else ""
    with timed(timings, "prune_s"), bar(label, len(blocks)) as update:
        update(done=start)

        def done(ctx, outputs):
            reports.append({"block": ctx.index, **ctx.report})
            state = {"inputs": outputs}
            if dense_path is not None:
                state["dense_inputs"] = dense_path.dense_inputs
            checkpoint.save(ctx.index, ctx.block, state, reports)
            update(done=ctx.index + 1)

        prune_model(
            loaded.model,
            calib,
            config,
            steps_before=steps_before,
            recover_steps=recover_steps,
            keep_dense_outputs=recover is not None and recover.target == "sparse-path",
            on_block_done=done,
            start=start,
            inputs=carry.get("inputs"),
        )
    sparsity, results = _sparsity_and_results(
        loaded.model, loaded.tokenizer, config.pattern, corpora, eval_seqlen, eval_max_tokens,
        resolve_device(config.device), timings,
    )  # fmt: skip
    run = {
        "command": "prune",
        "source_model": loaded.source,
        "config": {**config.to_dict(), "dtype": dtype, "recover": "ebft" if recover else None},
        "versions": versions(),
        "timings": timings,
        "blocks": reports,
        "results": results,
    }
    extra = {}
    if recover is not None:
        run["ebft"] = recover_dict
        extra = ebft_artifacts(reports, recover_dict)
    save_run(out, loaded.model, loaded.tokenizer, run, sparsity, overwrite=overwrite, extra_files=extra)
    checkpoint.clear()
    return run


def ebft_artifacts(reports: list[dict], config: dict) -> dict[str, bytes]:
    """ebft.json, the loss-curve PNG and the per-block table for a run folder."""
    from sparsefit.evaluate.report import ebft_markdown, ebft_plot_png

    blocks = [{"block": r["block"], **r["ebft"]} for r in reports if "ebft" in r]
    data = {"config": config, "blocks": blocks}
    return {
        "ebft.json": json.dumps(data, indent=2).encode(),
        "ebft.png": ebft_plot_png(blocks),
        "report.md": ebft_markdown(blocks, config).encode(),
    }


def run_recover(
    run_dir: Path,
    out: Path,
    recover,
    *,
    teacher: str | None = None,
    calib: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    eval_ppl: str | list[str] = "",
    eval_seqlen: int = 1024,
    eval_max_tokens: int | None = None,
) -> dict:
    """Recover an existing sparse run folder with EBFT against a dense teacher (the two-step mode).

    The teacher defaults to the source model recorded in ``run_dir/run.json``; the calibration
    settings default to the ones the masks were made with.
    """
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.export.run_folder import read_run
    from sparsefit.models import load
    from sparsefit.pipeline.checkpoint import BlockCheckpoint
    from sparsefit.pipeline.prune_model import resolve_device
    from sparsefit.pipeline.recover_model import recover_model
    from sparsefit.progress import bar

    source_run, source_sparsity = read_run(run_dir)
    source_config = source_run.get("config", {})
    teacher = teacher or source_run.get("source_model")
    check(bool(teacher), f"{run_dir} records no source model in run.json; pass --teacher")
    calib = calib or source_config.get("calib", "wiki")
    nsamples = nsamples or source_config.get("nsamples", 128)
    seqlen = seqlen or source_config.get("seqlen", 512)
    seed = source_config.get("seed", 0) if seed is None else seed
    check(nsamples > 0, f"nsamples {nsamples} must be a positive number of windows")
    check(seqlen > 0, f"seqlen {seqlen} must be a positive number of tokens")
    recover.validate(nsamples)
    device_ = resolve_device(device)
    corpora = parse_list(eval_ppl)
    for name in corpora:
        get_corpus(name)
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        sparse = load(str(run_dir))
        dense = load(teacher)
    with timed(timings, "calibration_s"):
        calib_ids = calibration_windows(sparse.tokenizer, get_corpus(calib), nsamples, seqlen, seed)
    recover_dict = recover.to_dict()
    settings = dict(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
    checkpoint = BlockCheckpoint.for_output(
        out, _fingerprint(source=str(run_dir), teacher=teacher, recover=recover_dict, **settings)
    )
    start, reports, carry = checkpoint.start(resume)
    from sparsefit.models import get_adapter

    blocks = get_adapter(sparse.model).get_blocks(sparse.model)
    checkpoint.restore_blocks(blocks, start)
    with timed(timings, "recover_s"), bar("ebft", len(blocks)) as update:
        update(done=start)

        def done(ctx, outputs, state):
            reports.append({"block": ctx.index, **ctx.report})
            checkpoint.save(ctx.index, ctx.block, state, reports)
            update(done=ctx.index + 1)

        recover_model(
            sparse.model,
            dense.model,
            calib_ids,
            _ebft_steps(recover, on_fit=None),
            target=recover.target,
            device=device_,
            batch_size=batch_size,
            start=start,
            carry=carry,
            on_block_done=done,
        )
    pattern = source_sparsity.get("pattern", "unstructured")
    sparsity, results = _sparsity_and_results(
        sparse.model, sparse.tokenizer, pattern, corpora, eval_seqlen, eval_max_tokens, device_, timings
    )
    run = {
        "command": "recover",
        "source_model": teacher,
        "source_run": str(run_dir),
        "config": {**source_config, **settings, "recover": "ebft", "device": device},
        "ebft": recover_dict,
        "versions": versions(),
        "timings": timings,
        "blocks": reports,
        "results": results,
    }
    extra = ebft_artifacts(reports, recover_dict)
    save_run(out, sparse.model, sparse.tokenizer, run, sparsity, overwrite=overwrite, extra_files=extra)
    checkpoint.clear()
    return run
