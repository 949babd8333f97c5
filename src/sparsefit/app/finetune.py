"""`sparsefit finetune`: fine-tune a dense or sparse model on a task (prompt / completion data), masks kept.

The methods are the recovery methods that train the whole model (``full``, ``lora``, ``s2ft``, ``squarehead``),
run in the one training loop on task examples instead of calibration windows: the loss is on the completion
tokens, batches are grouped by length. A sparse model keeps its masks under every method (LoRA and S²FT merge
their update and mask it). SquareHead distils from a teacher: ``--teacher`` (the paper's is the dense model tuned on
the task), else the dense model the run was pruned from, with a warning.

Every input is checked before a model loads: the method and its options, the data (every line of a JSONL), the
limits, the output folder, and the teacher's configuration against the model's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sparsefit.app import defaults
from sparsefit.app.jobs import choose_method, fit_checkpoint_for, recovery_files, save_run, timed, versions
from sparsefit.atomic import check_output, write_atomically
from sparsefit.data.task import encode_examples, load_examples
from sparsefit.errors import UsageError, check
from sparsefit.export.run_folder import read_pattern, read_run
from sparsefit.models import load
from sparsefit.models.loading import LoadedModel, check_seqlen, check_teacher_config
from sparsefit.progress import Bar, silent
from sparsefit.prune import parse_pattern, sparsity_summary
from sparsefit.recover import RecoveryContext
from sparsefit.recover.base import AUTO
from sparsefit.recover.lora import LORA_FILE, LoRAAdapter
from sparsefit.recover.s2ft import ADAPTER_FILE, S2Adapter
from sparsefit.walk import resolve_device
from sparsefit.walk.checkpoint import resumable
from sparsefit.walk.targets import check_teacher

METHODS = ("full", "lora", "s2ft", "squarehead")
# The methods whose update is an adapter apart from the base, which fuses into it and unfuses exactly: its file.
ADAPTER_METHODS = {"lora": LORA_FILE, "s2ft": ADAPTER_FILE}
ADAPTER_JSON = "adapter.json"
ADAPTERS = {"lora": LoRAAdapter, "s2ft": S2Adapter}
def _source_of(model: str) -> tuple[str | None, str]:
    """(the dense model a run folder was pruned from, its sparsity pattern); (None, unstructured) otherwise."""
    path = Path(model).expanduser()
    if (path / "run.json").is_file() and (path / "sparsity.json").is_file():
        run, sparsity = read_run(path)
        return run.get("source_model"), sparsity.get("pattern", "unstructured")
    if path.is_dir():
        return None, read_pattern(path)
    return None, "unstructured"


def task_defaults(method_name: str, options: dict) -> dict:
    """``options`` over the task defaults (app/defaults.py: one pass in batches of 8, the method's task rate) when
    they name no preset; a named preset keeps its own epochs, batch and rate."""
    if options.get("preset") not in (None, AUTO):
        return options
    rate = {"lr": defaults.FINETUNE_LR[method_name]} if method_name in defaults.FINETUNE_LR else {}
    return {"epochs": defaults.FINETUNE_EPOCHS, "batch_size": defaults.FINETUNE_BATCH, **rate, **options}


def run_finetune(
    model: str,
    data: str,
    method_name: str,
    out: Path,
    options: dict | None = None,
    *,
    teacher: str | None = None,
    max_examples: int | None = None,
    max_length: int = defaults.FINETUNE_MAX_LENGTH,
    chat_template: bool = True,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: Bar = silent,
    warn: Callable[[str], None] | None = None,
    adapter_only: bool = False,
    resume: bool = False,
) -> dict:
    """Fine-tune ``model`` on the ``train`` part of ``data`` with ``method_name``; write a run folder to ``out``.

    ``warn(line)`` hears, before the model loads, what the run will do that a user may not expect (it is also
    recorded in run.json). ``adapter_only`` (LoRA, S²FT): the folder holds the adapter and a pointer to the base
    instead of a whole checkpoint; :func:`load_tuned` loads the base and fuses it. The fit saves its state beside
    ``out`` now and then (and when interrupted); ``resume`` continues from it, the same settings required."""
    check(method_name in METHODS, f"finetune method {method_name!r} is not one of {', '.join(METHODS)}")
    check(not adapter_only or method_name in ADAPTER_METHODS,
          f"--adapter-only saves an adapter apart from the base: {method_name} trains the model's own weights and "
          f"has none (use {' or '.join(ADAPTER_METHODS)})")  # fmt: skip
    check(isinstance(max_length, int) and max_length >= 2,
          f"max length {max_length!r} must be at least 2 tokens")  # fmt: skip
    examples = load_examples(data, "train", max_examples)  # every line checked, before any model loads
    device_ = resolve_device(device)
    source, pattern = _source_of(model)
    options = dict(options or {})
    options = task_defaults(method_name, options)
    method, config = choose_method(method_name, options, len(examples), device_, pattern=pattern, seed=seed)
    warning = None
    if method_name == "squarehead":
        if teacher is None and source is not None:
            warning = (f"squarehead distils from {source!r}, the dense model this run was pruned from; the paper's "
                       "teacher is the dense model fine-tuned on the task (pass --teacher)")
        teacher = teacher or source
        check(teacher is not None, f"squarehead distils from a teacher: {model!r} records no dense source model; "
                                   "pass --teacher (the dense model tuned on the task)")  # fmt: skip
    elif teacher is not None:
        raise UsageError(f"--teacher is for squarehead; {method_name} trains without one")
    inputs = [("model", model), ("task data", data), ("teacher", teacher)]
    check_output(out, overwrite, inputs)
    if teacher is not None:
        check_teacher_config(model, teacher)
    fingerprint = {"model": model, "data": data, "method": method_name, "config": config.to_dict(),
                   "max_examples": max_examples, "max_length": max_length, "chat_template": chat_template,
                   "seed": seed, "teacher": teacher, "device": str(device_)}  # fmt: skip
    checkpoint = fit_checkpoint_for(out, fingerprint, resume)
    if warning and warn is not None:
        warn(warning)
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        loaded = load(model)
        dense = load(teacher) if teacher is not None else None
    check_seqlen(loaded.model.config, max_length, "--max-length")  # longer examples would index past the positions
    if dense is not None:
        check_teacher(loaded.model, dense.model, same_shapes=not parse_pattern(pattern).slim)
        vocab = [m.get_input_embeddings().weight.shape[0] for m in (loaded.model, dense.model)]
        check(vocab[0] == vocab[1], f"teacher {teacher!r} has a vocabulary of {vocab[1]} tokens, the model "
                                    f"{vocab[0]}; give the dense model of the same vocabulary")  # fmt: skip
    with timed(timings, "tokenize_s"):
        train = encode_examples(loaded.tokenizer, examples, max_length, chat_template)
    # The batch is checked again: examples dropped for length may leave fewer than it.
    config.validate(method_name, len(train))
    ctx = RecoveryContext(
        model=loaded.model, teacher=dense.model if dense is not None else loaded.model, tokenizer=loaded.tokenizer,
        calib_ids=train, pattern=parse_pattern(pattern), device=device_, seed=seed, progress=progress,
        fit_checkpoint=checkpoint,
    )  # fmt: skip
    with timed(timings, "finetune_s"), resumable(out):
        report = method.run(ctx, config)
    report["data"] = train.summary()
    sparsity = sparsity_summary(loaded.model, pattern)
    run = {
        "command": "finetune",
        "source_model": source or model,
        "source_run": model if source else None,
        "config": {"data": data, "max_examples": max_examples, "max_length": max_length,
                   "chat_template": chat_template, "seed": seed, "device": device, "teacher": teacher},  # fmt: skip
        "finetune": {"method": method_name, **config.to_dict()},
        "data": train.summary(),
        "versions": versions(),
        "timings": timings,
        "results": {"sparsity": sparsity["overall"]},
        "warnings": [warning] if warning else [],
    }
    if adapter_only:
        save_adapter(out, model, run, recovery_files(method, report), overwrite)
    else:
        save_run(out, loaded.model, loaded.tokenizer, run, sparsity, overwrite=overwrite,
                 extra_files=recovery_files(method, report))  # fmt: skip
    checkpoint.clear()
    return {**run, "report": report}


def _base_spec(model: str) -> str:
    """How an adapter folder names its base: a local path made absolute (the folder may be read from elsewhere)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def save_adapter(out: Path, model: str, run: dict, files: dict[str, bytes], overwrite: bool) -> None:
    """An adapter-only folder: the adapter file, ``adapter.json`` (its method and base), run.json, recovery.json."""
    method = run["finetune"]["method"]
    pointer = {"method": method, "base": _base_spec(model), "file": ADAPTER_METHODS[method]}

    def writer(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / ADAPTER_JSON).write_text(json.dumps(pointer, indent=2))
        (tmp / "run.json").write_text(json.dumps({**run, "adapter_only": True}, indent=2, default=str))

    write_atomically(out, writer, overwrite=overwrite)


def is_adapter_folder(spec: str) -> bool:
    return (Path(spec).expanduser() / ADAPTER_JSON).is_file()


def load_tuned(spec: str) -> LoadedModel:
    """A model, or an adapter-only folder: its base loaded and the adapter fused into it."""
    if not is_adapter_folder(spec):
        return load(spec)
    folder = Path(spec).expanduser()
    try:
        pointer = json.loads((folder / ADAPTER_JSON).read_text())
        base, file, kind = pointer["base"], pointer["file"], ADAPTERS[pointer["method"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{str(folder / ADAPTER_JSON)!r} is damaged ({type(exc).__name__}); finetune again") from None
    loaded = load(base)
    kind.load(loaded.model, folder / file).fuse()
    return LoadedModel(loaded.model, loaded.tokenizer, str(folder))
