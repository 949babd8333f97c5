"""The command line: parses, validates, calls the library, shows progress. Nothing runs at import."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from sparsefit.app import defaults
from sparsefit.cli_progress import bar
from sparsefit.errors import FileError, UsageError, first_line
from sparsefit.walk.device import peak_gpu_mib

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune Hugging Face causal LMs and recover their quality, block by block.",
)


def _echo_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    from sparsefit.cli_progress import console

    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    console.print(table)


# Recovery options, shared by `prune --recover` and `recover`. None keeps the preset's value; a method that has no
# such option refuses it in one line. `-o KEY=VALUE` sets any other option of the method.
PRESET = typer.Option(defaults.PRESET, "--preset",
                      help="a preset of the method (sparsefit methods); auto: cpu on a CPU, gpu (else paper) on a GPU")
LR = typer.Option(None, "--lr", help="learning rate (EBFT paper 2e-4; EBFT's cpu and quick presets take it relative "
                                     "to each weight's RMS, -o lr_scale=tensor-rms: 1.6e-2)")
EPOCHS = typer.Option(None, "--epochs", help="passes over the calibration windows (EBFT: per block, paper 10)")
TRAIN_BATCH = typer.Option(None, "--train-batch", help="windows per optimizer step (EBFT paper 8)")
WEIGHT_DECAY = typer.Option(None, "--weight-decay", help="AdamW weight decay (EBFT paper 0.1)")
FREEZE_NORMS = typer.Option(False, "--freeze-norms", help="EBFT: train only the masked linear weights")
TARGET = typer.Option(None, "--target",
                      help="EBFT target: sparse-path (official), dense-path, or mix[:W] (W: dense-path share, 0.5)")
HELDOUT = typer.Option(None, "--heldout", help="calibration windows kept out of training for the held-out loss")
EARLY_STOP = typer.Option(None, "--early-stop", help="stop after N epochs without held-out improvement, keep the best")
OPTION = typer.Option(None, "--option", "-o", help="any method option as KEY=VALUE (repeatable), e.g. -o layers=all")
RESUME = typer.Option(False, "--resume", help="continue an interrupted run from its last finished block (a walk) "
                                               "or its last saved step (a fit)")
# The block walk's memory: activations (inputs, targets, dense-path carry) in a dtype, spilled to disk beyond a budget.
ACT_DTYPE = typer.Option("auto", "--act-dtype", help="activations' dtype: auto (float32 on CPU, bfloat16 on GPU), "
                                                     "float32, bfloat16 or float16")  # fmt: skip
MAX_MEMORY = typer.Option(None, "--max-memory", help="memory budget, e.g. 24GB: activations beyond what one "
                          "block needs spill to a memory-mapped file in the partial folder")  # fmt: skip
GUARD = typer.Option(defaults.GUARD, "--guard", help="after recovery, the whole model's loss on held-out calibration "
                     "windows against the pruned model's: fallback (write the better of the two), warn (say it, "
                     "keep the recovered one) or off")  # fmt: skip
# OWL (outlier-weighted layerwise sparsity), for every pruning method; shared by `prune` and `compare`.
OWL_LAMBDA = typer.Option(None, "--owl-lambda", help="OWL: spread block sparsities over 2λ by outlier ratio, mean "
                                                     "kept (typical 0.08; 0 or unset: uniform)")  # fmt: skip
OWL_M = typer.Option(defaults.PRUNE.owl_m, "--owl-m", help="OWL: a score is an outlier above M x its block's mean")
GQA = typer.Option(defaults.PRUNE.gqa, "--gqa", help="structured: remove the same number of query heads from every "
                                                     "KV group (queries) or whole KV groups (groups)")  # fmt: skip
KEEP_HEADS = typer.Option(None, "--keep-heads", help="structured: query heads to keep per block (default: the share "
                                                     "of heads closest to --sparsity)")  # fmt: skip


def parse_options(pairs: list[str] | None, where: str = "--option") -> dict:
    """``["lr=1e-3", "epochs=2", "targets=q_proj,v_proj"]`` -> ``{"lr": "1e-3", "epochs": 2, "targets":
    "q_proj,v_proj"}`` (YAML scalars, as a recipe reads them); each method converts them to its options' types."""
    import yaml

    from sparsefit.app.recipe import load_yaml

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{where} {pair!r} is not KEY=VALUE; e.g. {where} lr=1e-3")
        try:
            parsed = load_yaml(value)
        except yaml.YAMLError:
            parsed = value
        options[key.strip().replace("-", "_")] = value if parsed is None and value else parsed
    return options


def finite_options(**options) -> dict:
    """``options``, each float checked by the one converter of option values: typer's float options take nan and
    inf, which pass every range check unnoticed."""
    from sparsefit.recover.training import convert_value

    return {name: convert_value(value, float, f"--{name.replace('_', '-')}") if isinstance(value, float) else value
            for name, value in options.items()}  # fmt: skip


def method_options(preset, lr, epochs, batch, weight_decay, freeze_norms, target, heldout, early_stop, extra) -> dict:
    options = {"preset": preset, "lr": lr, "epochs": epochs, "batch_size": batch, "weight_decay": weight_decay,
               "train_norms": False if freeze_norms else None, "target": target, "heldout": heldout,
               "early_stop": early_stop}  # fmt: skip
    options = {k: v for k, v in options.items() if v is not None}
    options.update(parse_options(extra))
    return options


@app.command()
def prune(
    model: str = typer.Option("smollm2-135m", help="built-in name, local folder, .gguf file or hub id"),
    method: str = typer.Option(defaults.PRUNE.method, help="magnitude, wanda or sparsegpt (structured: wanda or flap)"),
    sparsity: float = typer.Option(None, help=f"fraction of weights to remove, in (0, 1), default "
                                              f"{defaults.PRUNE.sparsity:g} (N:M: the pattern's own; structured: of "
                                              f"the decoder blocks' linear weights)"),
    pattern: str = typer.Option(defaults.PRUNE.pattern, help="unstructured, N:M (e.g. 2:4) or structured (heads and "
                                                             "FFN channels removed: a smaller dense model)"),
    gqa: str = GQA,
    keep_heads: int = KEEP_HEADS,
    calib: str = typer.Option(defaults.PRUNE.calib, help="corpus: wiki, books, a .txt/.jsonl file or folder"),
    nsamples: int = typer.Option(defaults.PRUNE.nsamples, help="calibration windows"),
    seqlen: int = typer.Option(defaults.PRUNE.seqlen, help="tokens per calibration window"),
    seed: int = typer.Option(defaults.PRUNE.seed),
    batch_size: int = typer.Option(defaults.PRUNE.batch_size, help="windows per forward pass"),
    device: str = typer.Option(defaults.PRUNE.device, help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (bf16 is very slow on CPU)"),
    sparsegpt_update: bool = typer.Option(True, help="SparseGPT: apply the OBS weight update (else masks only)"),
    owl_lambda: float = OWL_LAMBDA,
    owl_m: float = OWL_M,
    eval_ppl: str = typer.Option("", help="after pruning, perplexity on these corpora (e.g. wiki,books)"),
    eval_seqlen: int = typer.Option(defaults.EVAL_SEQLEN),
    eval_max_tokens: int = typer.Option(None, help="evaluate only the first N test tokens"),
    out: Path = typer.Option(..., help="output run folder"),
    overwrite: bool = typer.Option(False, help="replace a non-empty output folder"),
    trust_remote_code: bool = typer.Option(False),
    recover: str = typer.Option("", help="recover each block right after pruning it: ebft or dsnot (block-wise)"),
    preset: str = PRESET,
    lr: float = LR,
    epochs: int = EPOCHS,
    train_batch: int = TRAIN_BATCH,
    weight_decay: float = WEIGHT_DECAY,
    freeze_norms: bool = FREEZE_NORMS,
    target: str = TARGET,
    heldout: int = HELDOUT,
    early_stop: int = EARLY_STOP,
    option: list[str] = OPTION,
    resume: bool = RESUME,
    act_dtype: str = ACT_DTYPE,
    max_memory: str = MAX_MEMORY,
    guard: str = GUARD,
) -> None:
    """Prune a model and write a run folder (safetensors with exact zeros, sparsity.json, run.json).

    A local safetensors folder is streamed block by block (one block in memory); built-ins, GGUF files and hub
    models are loaded whole."""
    from sparsefit.app.jobs import run_prune
    from sparsefit.prune import PruneConfig

    config = PruneConfig(**finite_options(
        method=method, sparsity=sparsity, pattern=pattern, calib=calib, nsamples=nsamples, seqlen=seqlen,
        seed=seed, batch_size=batch_size, device=device, sparsegpt_update=sparsegpt_update, owl_lambda=owl_lambda,
        owl_m=owl_m, gqa=gqa, keep_heads=keep_heads,
    ))  # fmt: skip
    options = method_options(preset, lr, epochs, train_batch, weight_decay, freeze_norms, target, heldout,
                             early_stop, option)  # fmt: skip
    if not recover and len(options) > 1:
        raise UsageError(f"recovery option(s) {', '.join(sorted(set(options) - {'preset'}))} need --recover")
    run = run_prune(
        model, config, out, dtype=dtype, overwrite=overwrite, eval_ppl=eval_ppl, eval_seqlen=eval_seqlen,
        eval_max_tokens=eval_max_tokens, trust_remote_code=trust_remote_code, recover=recover or None,
        recover_options=options, resume=resume, progress=bar, act_dtype=act_dtype, max_memory=max_memory,
        guard=guard,
    )  # fmt: skip
    _say_guard(run)
    typer.echo(f"wrote {out} (sparsity {run['results']['sparsity']:.4f}, {run['timings']['prune_s']:.1f} s)")


@app.command()
def run(
    recipe: Path = typer.Argument(None, help="recipe YAML; default: Wanda 50% + EBFT (cpu preset) on smollm2-135m"),
    runs_dir: Path = typer.Option(Path("runs"), help="where runs/<name>/ is written"),
    overwrite: bool = typer.Option(False, help="replace an earlier run of the same name"),
) -> None:
    """The main job: prune, recover, evaluate dense / pruned / recovered, write runs/<name>/report.md."""
    from sparsefit.app.recipe import Recipe, run_recipe

    summary = run_recipe(Recipe.load(recipe), runs_root=runs_dir, overwrite=overwrite, progress=bar)
    _say_guard(summary)
    out = runs_dir / summary["recipe"]["name"]
    typer.echo((out / "report.md").read_text())
    typer.echo(f"wrote {out}/report.md in {summary['timings']['total_s']:.0f} s")


@app.command("recover")
def recover_(
    run_dir: Path = typer.Argument(..., help="a sparse run folder (from sparsefit prune)"),
    method: str = typer.Option(defaults.RECOVER_METHOD, help="ebft, dsnot, squarehead, lora, s2ft or full"),
    teacher: str = typer.Option(None, help="dense model; default: the source model recorded in run.json"),
    calib: str = typer.Option(None, help="calibration corpus; default: the one the masks were made with"),
    nsamples: int = typer.Option(None, help="calibration windows; default: as in run.json"),
    seqlen: int = typer.Option(None, help="tokens per window; default: as in run.json"),
    seed: int = typer.Option(None),
    batch_size: int = typer.Option(defaults.PRUNE.batch_size, help="windows per forward pass when propagating"),
    device: str = typer.Option("auto"),
    budget: int = typer.Option(None, help="token passes through each block (training methods); default: epochs"),
    preset: str = PRESET,
    lr: float = LR,
    epochs: int = EPOCHS,
    train_batch: int = TRAIN_BATCH,
    weight_decay: float = WEIGHT_DECAY,
    freeze_norms: bool = FREEZE_NORMS,
    target: str = TARGET,
    heldout: int = HELDOUT,
    early_stop: int = EARLY_STOP,
    option: list[str] = OPTION,
    eval_ppl: str = typer.Option("", help="after recovery, perplexity on these corpora (e.g. wiki,books)"),
    eval_seqlen: int = typer.Option(defaults.EVAL_SEQLEN),
    eval_max_tokens: int = typer.Option(None),
    out: Path = typer.Option(..., help="output run folder"),
    overwrite: bool = typer.Option(False),
    resume: bool = RESUME,
    act_dtype: str = ACT_DTYPE,
    max_memory: str = MAX_MEMORY,
    guard: str = GUARD,
) -> None:
    """Recover a sparse run folder against its dense teacher with any method, masks fixed (the two-step mode)."""
    from sparsefit.app.jobs import run_recover
    from sparsefit.export.run_folder import check_run_folder

    check_run_folder(run_dir)
    options = method_options(preset, lr, epochs, train_batch, weight_decay, freeze_norms, target, heldout,
                             early_stop, option)  # fmt: skip
    run = run_recover(
        run_dir, out, method, options, teacher=teacher, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
        batch_size=batch_size, device=device, budget=budget, overwrite=overwrite, resume=resume, eval_ppl=eval_ppl,
        eval_seqlen=eval_seqlen, eval_max_tokens=eval_max_tokens, progress=bar, act_dtype=act_dtype,
        max_memory=max_memory, guard=guard,
    )  # fmt: skip
    _say_guard(run)
    typer.echo(f"wrote {out} ({method}: {_recovery_line(run['report'])})")


def _say_guard(run: dict) -> None:
    """The model guard's verdict on stderr when recovery made the model worse (or when it could not measure)."""
    from sparsefit.app.guard import GuardResult

    if "guard" in run:
        verdict = GuardResult(**run["guard"])
        if verdict.worse or (verdict.skipped and verdict.mode != "off"):
            typer.echo(f"warning: {verdict.line()}", err=True)


def _recovery_line(report: dict) -> str:
    if "fit" in report:
        fit = report["fit"]
        return f"{fit['steps']} steps, probe loss {fit['initial_loss']:.4g} -> {fit['final_loss']:.4g}"
    if "swaps" in report:
        return f"{report['swaps']} swaps, |error| {report['abs_error_before']:.4g} -> {report['abs_error_after']:.4g}"
    blocks = report.get("blocks", [])
    gain = sum(b["initial_loss"] - b["final_loss"] for b in blocks if "initial_loss" in b)
    return f"{len(blocks)} blocks, summed reconstruction MSE reduced by {gain:.4g}"


@app.command()
def compare(
    model: str = typer.Option("smollm2-135m"),
    prune: str = typer.Option(defaults.QUICK.method, help="pruning method for the shared masks"),
    sparsity: float = typer.Option(None, help=f"default {defaults.QUICK.sparsity:g} (N:M: the pattern's own)"),
    pattern: str = typer.Option(defaults.QUICK.pattern, help="unstructured, N:M or structured"),
    gqa: str = GQA,
    keep_heads: int = KEEP_HEADS,
    owl_lambda: float = OWL_LAMBDA,
    owl_m: float = OWL_M,
    methods: str = typer.Option(",".join(defaults.COMPARE_METHODS), help="comma-separated recovery methods"),
    nsamples: int = typer.Option(defaults.QUICK.nsamples, help="calibration windows, the same for every method"),
    seqlen: int = typer.Option(defaults.QUICK.seqlen),
    budget: int = typer.Option(None, help="token passes through each block for every training method"),
    calib: str = typer.Option(defaults.QUICK.calib),
    ppl: str = typer.Option(",".join(defaults.EVAL_CORPORA), help="evaluation corpora"),
    eval_seqlen: int = typer.Option(defaults.EVAL_SEQLEN),
    eval_max_tokens: int = typer.Option(defaults.COMPARE_EVAL_MAX_TOKENS),
    seed: int = typer.Option(defaults.QUICK.seed),
    device: str = typer.Option("auto"),
    option: list[str] = typer.Option(None, "--option", "-o", help="METHOD.KEY=VALUE, e.g. -o lora.lr=3e-4"),
    keep: bool = typer.Option(False, "--keep", help="also write each method's model as a run folder in OUT"),
    mode: str = typer.Option("interleaved", help="interleaved (block-wise methods prune in their own walk, as their "
                                                 "references), two-step (all on one set of masks) or both"),
    out: Path = typer.Option(..., help="output folder for compare.json / .md / .html"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Prune once, then every recovery method on the same masks and calibration windows, side by side."""
    from sparsefit.app.compare import run_compare

    finite_options(sparsity=sparsity, owl_lambda=owl_lambda, owl_m=owl_m)
    per_method: dict[str, dict] = {}
    for key, value in parse_options(option).items():
        name, dot, field = key.partition(".")
        if not dot or not field:
            raise UsageError(f"--option {key}={value!r} needs METHOD.KEY=VALUE, e.g. -o lora.lr=3e-4")
        per_method.setdefault(name, {})[field] = value
    run_compare(
        model, out, prune=prune, sparsity=sparsity, pattern=pattern, gqa=gqa, keep_heads=keep_heads,
        owl_lambda=owl_lambda, owl_m=owl_m,
        methods=methods, nsamples=nsamples,
        seqlen=seqlen, budget=budget, calib=calib, corpora=ppl, eval_seqlen=eval_seqlen,
        eval_max_tokens=eval_max_tokens, seed=seed, device=device, overwrite=overwrite, method_options=per_method,
        keep=keep, mode=mode, log=lambda line: typer.echo(line, err=True), progress=bar,
    )  # fmt: skip
    typer.echo((out / "compare.md").read_text())


@app.command()
def finetune(
    model: str = typer.Option("smollm2-135m", help="dense model (built-in, folder, .gguf, hub id) or a run folder"),
    data: str = typer.Option(..., help="training data: arithmetic, or a .jsonl of prompt/completion or messages"),
    method: str = typer.Option("full", help="full, lora, s2ft or squarehead"),
    teacher: str = typer.Option(None, help="squarehead: the dense model tuned on the task (default: the run's "
                                           "source model, with a warning)"),
    epochs: int = typer.Option(None, help=f"passes over the training examples (default {defaults.FINETUNE_EPOCHS})"),
    lr: float = typer.Option(None, help="learning rate (default: the method's preset)"),
    train_batch: int = typer.Option(None, help=f"examples per optimizer step (default {defaults.FINETUNE_BATCH})"),
    max_examples: int = typer.Option(None, help="train on the first N training examples"),
    max_length: int = typer.Option(defaults.FINETUNE_MAX_LENGTH, help="tokens per example (longer: cut, counted)"),
    chat_template: bool = typer.Option(True, help="conversations ({messages}) through the tokenizer's chat template"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    option: list[str] = OPTION,
    adapter_only: bool = typer.Option(False, "--adapter-only", help="lora, s2ft: save the adapter apart from the "
                                                                    "base (fuses and unfuses exactly)"),
    out: Path = typer.Option(..., help="output run folder"),
    overwrite: bool = typer.Option(False),
    resume: bool = RESUME,
) -> None:
    """Fine-tune a dense or sparse model on a task, masks kept; the loss is on the completions."""
    from sparsefit.app.finetune import run_finetune

    if max_examples is not None and max_examples <= 0:
        raise UsageError(f"--max-examples {max_examples} must be a positive number of examples")
    options = finite_options(lr=lr, epochs=epochs, batch_size=train_batch)
    options = {k: v for k, v in options.items() if v is not None}
    options.update(parse_options(option))
    run = run_finetune(model, data, method, out, options, teacher=teacher, max_examples=max_examples,
                       max_length=max_length, chat_template=chat_template, seed=seed, device=device,
                       overwrite=overwrite, progress=bar, warn=lambda line: typer.echo(f"warning: {line}", err=True),
                       adapter_only=adapter_only, resume=resume)
    data_summary = run["data"]
    typer.echo(f"wrote {out} ({method}: {_recovery_line(run['report'])}; {data_summary['examples']} examples, "
               f"{data_summary['cut']} cut and {data_summary['dropped']} dropped at {max_length} tokens)")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="run folder, local folder, built-in name, .gguf file or hub id"),
    ppl: str = typer.Option(None, help="corpora for perplexity (comma-separated; empty for none); default: "
                                       f"{','.join(defaults.EVAL_CORPORA)}, or none when --tasks are given"),
    seqlen: int = typer.Option(1024, help="tokens per perplexity window"),
    max_tokens: int = typer.Option(None, help="evaluate only the first N test tokens"),
    tasks: str = typer.Option("", help="zero-shot tasks (e.g. arc_easy,piqa) and generative ones, scored by exact "
                                      "match: arithmetic or a .jsonl file (its held-out part)"),
    limit: int = typer.Option(None, help="first N documents per task"),
    chat_template: bool = typer.Option(True, help="generative tasks: conversations through the chat template"),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    record: bool = typer.Option(False, "--record", help="also store the results in the run folder's run.json"),
) -> None:
    """Perplexity (WikiText-2 protocol, seqlen printed with every number) and zero-shot accuracy."""
    from sparsefit.app.finetune import is_adapter_folder, load_tuned
    from sparsefit.app.jobs import check_evaluation, evaluate_model, evaluate_streamed, parse_list
    from sparsefit.data import get_corpus
    from sparsefit.evaluate.exact_match import check_tasks
    from sparsefit.models.loading import streamable
    from sparsefit.walk import resolve_device

    if limit is not None and limit <= 0:
        raise UsageError(f"--limit {limit} must be a positive number of documents")
    if ppl is None:  # asked for tasks only: score them, not also the whole test splits of the default corpora
        ppl = "" if parse_list(tasks) else ",".join(defaults.EVAL_CORPORA)
    if not parse_list(ppl) and not parse_list(tasks):
        raise UsageError(f"--ppl {ppl!r} and no --tasks leave nothing to evaluate; name corpora (e.g. --ppl "
                         f"{','.join(defaults.EVAL_CORPORA)}) or tasks (e.g. --tasks arc_easy)")
    check_evaluation(seqlen, max_tokens)  # every setting before the model loads
    for name in parse_list(ppl):
        get_corpus(name)
    check_tasks(parse_list(tasks), limit)  # names known, generative data read and checked before the model loads
    if record:
        from sparsefit.export.run_folder import check_run_folder

        check_run_folder(model)  # before any work: --record needs a run folder
    device_ = resolve_device(device)
    # An adapter-only folder loads whole: its base, with the adapter fused.
    folder = streamable(model) if not is_adapter_folder(model) else None
    if folder is not None:
        # A local safetensors folder is walked block by block: any size fits.
        results = evaluate_streamed(folder, ppl=parse_list(ppl), seqlen=seqlen, max_tokens=max_tokens,
                                    tasks=parse_list(tasks), limit=limit, device=device_, progress=bar,
                                    chat_template=chat_template)  # fmt: skip
    else:
        loaded = load_tuned(model)
        results = evaluate_model(loaded.model, loaded.tokenizer, ppl=parse_list(ppl), seqlen=seqlen,
                                 max_tokens=max_tokens, tasks=parse_list(tasks), limit=limit, device=device_,
                                 progress=bar, chat_template=chat_template)  # fmt: skip
    if record:
        from sparsefit.app.jobs import record_results

        record_results(Path(model), results)
    for task, r in results.get("tasks", {}).items():
        if r.get("empty"):
            typer.echo(f"warning: {r['empty']} of {r['n']} generations on {task} were empty (the model ended its "
                       f"answer at once); check the prompt format, e.g. --chat-template / --no-chat-template", err=True)
    if as_json:
        typer.echo(json.dumps(results))
        return
    rows = [
        [f"ppl {name}", f"{r['value']:.3f}", f"seqlen {r['seqlen']}, {r['tokens']} tokens"]
        for name, r in results.get("ppl", {}).items()
    ]
    rows += [
        [task, " / ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "n" and isinstance(v, float)),
         f"n {r['n']}" + (f", {r['empty']} empty" if r.get("empty") else "")]
        for task, r in results.get("tasks", {}).items()
    ]  # fmt: skip
    _echo_table(f"evaluation of {model}", ["metric", "value", "on"], rows)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a sparsefit run folder"),
    format: str = typer.Option("hf", "--format", help="hf (exact zeros) or compressed (bitmask + values)"),
    masks: bool = typer.Option(False, "--masks", help="also write masks.safetensors (packed bits)"),
    out: Path = typer.Option(..., help="output folder"),
    overwrite: bool = typer.Option(False),
) -> None:
    """Export a run folder: a checkpoint plain transformers loads, with a model card."""
    from sparsefit.export import export_compressed, export_hf

    if format == "hf":
        path = export_hf(run_dir, out, overwrite=overwrite, masks=masks)
    elif format == "compressed":
        if masks:
            raise UsageError("--masks goes with --format hf; the compressed format already stores bitmasks")
        path = export_compressed(run_dir, out, overwrite=overwrite)
    else:
        raise UsageError(f"--format {format!r} is not known; use hf or compressed")
    typer.echo(f"wrote {path}")


@app.command()
def generate(
    model: str = typer.Argument(..., help="run folder, hf or compressed export, or built-in model name"),
    prompt: str = typer.Option(..., help="the text to continue"),
    max_new_tokens: int = typer.Option(32, help="greedy tokens to generate"),
    kernels: str = typer.Option("auto", help="auto (sparse where faster), sparse or dense"),
    values: str = typer.Option("float32", help="the sparse layers' kept values: float32, bf16 or int8"),
    threads: int = typer.Option(None, help="CPU threads (default: torch's)"),
    compare_dense: bool = typer.Option(False, "--compare-dense", help="time dense decoding too and compare"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
) -> None:
    """Greedy text from a sparse model on the sparse kernel, its tokens/s and weight memory."""
    from sparsefit.app.decode import generate_text

    result = generate_text(model, prompt, max_new_tokens, kernels, values, threads, compare_dense)
    if "warning" in result:
        typer.echo(f"warning: {result['warning']}", err=True)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(result["text"])
    mib = result["weights_mib"]
    layers = result["layers"]
    rows = [["decode tokens/s", f"{result['tokens_per_s']:.1f}", f"{result['threads']} threads, {kernels} kernels"],
            ["weights MiB", f"{mib['sparse'] or 0:.1f}", f"dense {mib['dense']:.1f}"],
            ["pruned layers", f"{layers['sparse']} sparse", f"{layers['dense']} dense"]]  # fmt: skip
    if compare_dense:
        rows += [["speed-up", f"{result['speedup']:.2f}x", f"dense {result['dense']['tokens_per_s']:.1f} tokens/s"],
                 ["same greedy tokens", str(result["same_tokens"]), f"of {max_new_tokens}"]]  # fmt: skip
    _echo_table(f"generate from {model}", ["", "value", "note"], rows)


@app.command()
def methods() -> None:
    """Every recovery method: how it works, its presets, and each option with its value in each preset."""
    from dataclasses import fields

    from sparsefit.recover import METHODS

    for name, cls in METHODS.items():
        method = cls()
        presets = method.presets
        kind = "block-wise (prune --recover, recover, --resume)" if method.blockwise else "whole model (recover, run)"
        rows = [[f.name, *(_cell(getattr(config, f.name)) for config in presets.values())]
                for f in fields(next(iter(presets.values())))]  # fmt: skip
        title = f"{name}: {kind}; preset auto = cpu on a CPU, gpu (else paper) on a GPU"
        _echo_table(title, ["option", *presets], rows)


def _cell(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "auto" if value is None else str(value)  # e.g. SquareHead's lr: from the reference's table


@app.command()
def info(run_dir: Path = typer.Argument(..., help="a run folder or checkpoint folder")) -> None:
    """Sparsity per layer and the N:M pattern check."""
    from sparsefit.export.run_folder import read_pattern
    from sparsefit.models import load
    from sparsefit.prune import sparsity_summary

    pattern = read_pattern(run_dir)
    loaded = load(str(run_dir))
    report = sparsity_summary(loaded.model, pattern)
    rows = [
        [name, "x".join(map(str, r["shape"])), f"{r['sparsity']:.4f}"] for name, r in report["layers"].items()
    ]
    _echo_table(f"{run_dir}: overall sparsity {report['overall']:.4f}", ["layer", "shape", "sparsity"], rows)
    if "pattern_ok" in report:
        typer.echo(f"pattern {pattern}: {'holds in every layer' if report['pattern_ok'] else 'VIOLATED'}")


_ERRORS: list = []  # where a rank other than 0 prints its errors, once its other output is silenced


def _error_stream():
    return _ERRORS[0] if _ERRORS else sys.stderr


def _join_processes() -> str:
    """Under torchrun: join the process group, check every rank got the same command line, and keep the output
    to rank 0 (the others print errors only). Returns the prefix of this process's error lines."""
    from sparsefit import distributed

    if not distributed.init():
        return ""
    distributed.check_same(sys.argv[1:], "arguments")
    if not distributed.is_main():  # errors still reach the real stderr (see main)
        _ERRORS.append(sys.stderr)
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        import sparsefit.cli_progress as shown

        shown.console.quiet = True
    return f"rank {distributed.rank()}: "


def _parser_errors(name: str) -> tuple[type, ...]:
    """The exception classes called ``name`` that the command-line parser may raise: click's, and the copies that
    recent typer releases (0.29 among them) bundle as ``typer._click`` and raise instead; whichever are installed."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback.

    Under torchrun (``torchrun --nproc-per-node N -m sparsefit ...``) each rank runs the same command on its share
    of the windows; a rank that stops makes the others stop with one line and exit code 1, not hang.
    """
    from sparsefit import distributed

    who = ""

    def leave(code: int, joined: bool = False) -> None:
        """Exit with ``code``; at once in a process group, or after one (``joined``): its threads torn down by the
        interpreter's exit abort the process ("terminate called without an active exception", exit -6) instead of
        giving the exit code, even after the group was destroyed (about one run in five, after every output)."""
        if joined or distributed.active():
            sys.stdout.flush()
            _error_stream().flush()
            os._exit(code)
        sys.exit(code)

    def error(message: str, code: int) -> None:
        print(f"error: {message}", file=_error_stream(), flush=True)
        leave(code)

    try:
        who = _join_processes()
        code = app(standalone_mode=False)  # returns 130 on Ctrl-C instead of raising
    except UsageError as exc:
        error(f"{who}{exc}", 2)
    except FileError as exc:  # a damaged file or a failed write, found while working
        error(f"{who}{exc}", 1)
    except distributed.DistributedError as exc:
        error(str(exc), 1)
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=_error_stream())
        leave(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except OSError as exc:  # a file the command was pointed at cannot be read: permissions, a folder, /proc
        named = isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError))
        where = f"{exc.filename}: " if exc.filename else ""
        error(f"{who}cannot read {where}{exc.strerror or first_line(exc)}", 2 if named else 1)
    except Exception as exc:  # the parser's own usage errors
        if isinstance(exc, _parser_errors("NoArgsIsHelpError")):  # `sparsefit` alone: the help, then exit 2
            if exc.format_message().strip():  # typer's rich help has already printed itself
                print(exc.format_message(), file=_error_stream())
            leave(2)
        if isinstance(exc, _parser_errors("ClickException")):
            error(f"{who}{' '.join(exc.format_message().split())}", 2)
        if isinstance(exc, _parser_errors("Abort")):
            sys.exit(130)
        if _ERRORS:
            sys.stderr = _ERRORS[0]  # a bug's traceback is shown on every rank
        raise
    peak = peak_gpu_mib()
    if peak is not None:
        print(f"{who}peak GPU memory {peak:.0f} MiB", file=_error_stream())  # every rank's
    ran_distributed = distributed.active()
    distributed.finish()
    code = code if isinstance(code, int) else 0
    if code == 130:
        typer.echo("interrupted; run again with --resume to continue from the last finished block or saved step",
                   err=True)
    if code or ran_distributed:
        leave(code, joined=ran_distributed)


if __name__ == "__main__":
    main()
