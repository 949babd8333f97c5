"""`sparsefit run`: the main job from a recipe. Prune, recover with any method against the dense teacher on
the same calibration windows, evaluate dense / pruned / recovered side by side, write a report.

A recipe is YAML with the sections below; every key is optional and unknown keys are an error.

    name: default
    model: smollm2-135m
    prune:   {method: wanda, sparsity: 0.5, pattern: unstructured, calib: wiki+books, nsamples: 16, seqlen: 512,
              seed: 0, owl_lambda: null, owl_m: 5}   # owl_lambda 0.08: OWL's per-block sparsities (null/0: uniform)
    recover: {method: ebft, preset: quick, batch_size: 1, epochs: 3}  # any method of `sparsefit recover`; the other
                                           # keys are its options (a named preset brings its own batch and epochs);
                                           # `recover: null` skips it
    polish:  {method: squarehead, preset: cpu}  # optional: a short whole-model pass after `recover` (masks fixed),
                                                # e.g. SquareHead's distillation after EBFT; default null
    eval:    {ppl: [wiki, books], seqlen: 1024, max_tokens: 4096, tasks: [], limit: null}
    guard: fallback   # the model guard after recovery (app/guard.py): fallback, warn or off
    finetune: {data: arithmetic, method: full, epochs: 1, lr: 1e-4}  # optional: tune the dense model on a task
                      # first (it is then the model pruned and the teacher); default null

A task (``data``: ``arithmetic`` or a ``.jsonl``) can also be what ``recover`` trains on: ``recover: {method:
squarehead, data: arithmetic}`` fine-tunes the sparse student on the task's examples (loss on the completions)
instead of the calibration windows. With ``prune.calib`` the same task and ``eval.tasks`` naming it, one file holds
SquareHead's whole recipe: tune the dense teacher, prune on the task's text, distil the student, score both
(``recipes/squarehead-arithmetic.yaml``). Besides ``data``, the task sections take ``max_examples``,
``max_length`` and ``chat_template`` (as ``sparsefit finetune``); the other keys are the method's options.

Every value, the recover options included, is checked before the model is loaded.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from sparsefit import distributed
from sparsefit.app import defaults
from sparsefit.app import guard as model_guard
from sparsefit.app.finetune import METHODS as FINETUNE_METHODS
from sparsefit.app.finetune import task_defaults
from sparsefit.app.jobs import choose_method, evaluate_model, recovery_files, save_run, versions
from sparsefit.app.reports import gap_closed_both, recipe_report
from sparsefit.atomic import check_output, check_run_name, write_file_atomically
from sparsefit.data import calibration_windows, get_corpus
from sparsefit.data.task import encode_examples, load_examples
from sparsefit.errors import UsageError, check
from sparsefit.evaluate.exact_match import check_tasks
from sparsefit.models import load
from sparsefit.progress import Bar, silent
from sparsefit.prune import PruneConfig, parse_pattern, prune_model, sparsity_summary
from sparsefit.recover import RecoveryContext
from sparsefit.recover.training import convert_value, convert_values, field_types
from sparsefit.walk import resolve_device

DEFAULT_PRUNE = {"method": defaults.RUN.method, "sparsity": None,  # None: PruneConfig's (an N:M pattern's own)
                 "pattern": defaults.RUN.pattern, **defaults.calibration(defaults.RUN),
                 "owl_lambda": defaults.RUN.owl_lambda, "owl_m": defaults.RUN.owl_m,
                 "gqa": defaults.RUN.gqa, "keep_heads": defaults.RUN.keep_heads}  # fmt: skip
DEFAULT_RECOVER = dict(defaults.RUN_RECOVER)
TASK_KEYS = ("data", "max_examples", "max_length", "chat_template")  # a task section's keys besides the method's
DEFAULT_EVAL = {"ppl": list(defaults.EVAL_CORPORA), "seqlen": defaults.EVAL_SEQLEN,
                "max_tokens": defaults.RUN_EVAL_MAX_TOKENS, "tasks": [], "limit": None}  # fmt: skip
# What each value of a section must be, checked (and converted, "4" -> 4) as the recipe loads.
PRUNE_TYPES = {key: kind for key, kind in field_types(PruneConfig).items() if key in DEFAULT_PRUNE}
EVAL_TYPES = {"ppl": list[str], "seqlen": int, "max_tokens": int | None, "tasks": list[str], "limit": int | None}


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers: ``2:4`` stays the N:M pattern "2:4" (safe_load reads 124)."""


def _number_or_text(constructor):
    def construct(loader: yaml.SafeLoader, node: yaml.ScalarNode):
        text = loader.construct_scalar(node)
        return text if ":" in text else constructor(loader, node)

    return construct


_Loader.add_constructor("tag:yaml.org,2002:int", _number_or_text(yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor("tag:yaml.org,2002:float", _number_or_text(yaml.SafeLoader.construct_yaml_float))


def load_yaml(text: str):
    """``text`` parsed as YAML the way recipes and ``-o KEY=VALUE`` read it (no base-60 numbers)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class Recipe:
    name: str = "default"
    model: str = "smollm2-135m"
    device: str = "auto"
    prune: dict = field(default_factory=lambda: dict(DEFAULT_PRUNE))
    recover: dict | None = field(default_factory=lambda: dict(DEFAULT_RECOVER))
    polish: dict | None = None
    eval: dict = field(default_factory=lambda: dict(DEFAULT_EVAL))
    guard: str = defaults.GUARD
    finetune: dict | None = None

    @classmethod
    def load(cls, path: Path | None) -> Recipe:
        if path is None:
            return cls()
        if not Path(path).is_file():
            raise UsageError(f"recipe {str(path)!r} does not exist")
        try:
            data = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise UsageError(f"recipe {str(path)!r} is not UTF-8 text; give a YAML file") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"recipe {str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
        check(isinstance(data, dict), f"recipe {str(path)!r} must be a mapping of sections")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        check(not unknown, f"recipe key(s) {', '.join(unknown)} not known; use {', '.join(sorted(known))}")
        recipe = cls()
        scalars = field_types(cls)
        for key, value in data.items():
            if key in ("prune", "eval"):
                check(isinstance(value, dict), f"recipe section {key!r} must be a mapping")
                section_defaults = DEFAULT_PRUNE if key == "prune" else DEFAULT_EVAL
                bad = sorted(set(value) - set(section_defaults))
                check(not bad, f"recipe {key} key(s) {', '.join(bad)} not known; use {', '.join(section_defaults)}")
                types = PRUNE_TYPES if key == "prune" else EVAL_TYPES
                setattr(recipe, key, {**section_defaults, **convert_values(value, types, f"recipe {key}")})
            elif key == "recover":
                check(value is None or isinstance(value, dict), "recipe section 'recover' must be a mapping or null")
                if value is None:
                    recipe.recover = None
                else:
                    # A recipe naming another method starts from that method's defaults, not EBFT's preset. The
                    # method's own options are converted with its config's types (make_config), before any load.
                    method = convert_value(value.get("method", defaults.RECOVER_METHOD), str, "recipe recover method")
                    # A named preset brings its own batch and epochs.
                    base = DEFAULT_RECOVER if method == "ebft" and "preset" not in value else {}
                    recipe.recover = {"method": method, **base, **value} | {"method": method}
            elif key == "finetune":
                check(value is None or isinstance(value, dict), "recipe section 'finetune' must be a mapping or null")
                if value is not None:
                    check("data" in value, "recipe finetune needs data: arithmetic or a .jsonl file")
                    method = convert_value(value.get("method", "full"), str, "recipe finetune method")
                    recipe.finetune = {"method": method, **value} | {"method": method}
            elif key == "polish":
                check(value is None or isinstance(value, dict), "recipe section 'polish' must be a mapping or null")
                if value is None:
                    recipe.polish = None
                else:
                    method = convert_value(value.get("method", "squarehead"), str, "recipe polish method")
                    recipe.polish = {"method": method, **value} | {"method": method}
            else:
                setattr(recipe, key, convert_value(value, scalars[key], f"recipe {key}"))
        return recipe

    def recover_options(self) -> dict:
        return {k: v for k, v in (self.recover or {}).items() if k != "method" and k not in TASK_KEYS}

    def polish_options(self) -> dict:
        return {k: v for k, v in (self.polish or {}).items() if k != "method"}


def run_recipe(recipe: Recipe, runs_root: Path = Path("runs"), overwrite: bool = False, progress: Bar = silent) -> dict:
    """Run the whole job; returns the summary that report.md shows."""
    model_guard.check_mode(recipe.guard, "recipe guard")
    config = PruneConfig(**recipe.prune, device=recipe.device)
    config.validate()
    recipe.prune = {**recipe.prune, "sparsity": config.sparsity}  # the summary records the sparsity it ran at
    device = resolve_device(recipe.device)
    method = method_config = None
    recover_task = None
    if recipe.recover is not None:
        options, n_windows = recipe.recover_options(), config.nsamples
        if "data" in recipe.recover:  # on a task: its examples, and the task defaults (as `sparsefit finetune`)
            recover_task = task_section(recipe.recover, "recipe recover")
            options, n_windows = task_defaults(recipe.recover["method"], options), len(recover_task.examples)
        method, method_config = choose_method(recipe.recover["method"], options, n_windows, device,
                                              pattern=config.pattern, seed=config.seed)  # fmt: skip
    polish = polish_config = None
    if recipe.polish is not None:
        polish, polish_config = choose_method(recipe.polish["method"], recipe.polish_options(), config.nsamples,
                                              device, pattern=config.pattern, seed=config.seed)  # fmt: skip
        check(not polish.blockwise, f"recipe polish {polish.name!r} works block by block; the polish pass is a "
              "whole-model method (squarehead, lora or s2ft)")  # fmt: skip
    tune = tune_config = None
    tune_task = None
    if recipe.finetune is not None:
        tune_task = task_section(recipe.finetune, "recipe finetune")
        options = {k: v for k, v in recipe.finetune.items() if k != "method" and k not in TASK_KEYS}
        options = task_defaults(recipe.finetune["method"], options)
        tune, tune_config = choose_method(recipe.finetune["method"], options, len(tune_task.examples), device,
                                          seed=config.seed)  # fmt: skip
        check(recipe.finetune["method"] in FINETUNE_METHODS, f"recipe finetune method {tune.name!r} is not one of "
              f"{', '.join(FINETUNE_METHODS)}")  # fmt: skip
    stray = sorted(set(recipe.recover or {}) & set(TASK_KEYS) - {"data"})
    check(not stray or "data" in recipe.recover, f"recipe recover {', '.join(stray)} go with data: (a task to "
                                                 "recover on)")  # fmt: skip
    if recover_task is not None:
        check(not method.blockwise, f"recipe recover {method.name!r} works block by block on calibration windows; "
              f"to recover it on the task's text, set prune calib: {recipe.recover['data']}")  # fmt: skip
    evaluation = recipe.eval
    seqlen, max_tokens, limit = evaluation["seqlen"], evaluation["max_tokens"], evaluation["limit"]
    check(seqlen > 0, f"recipe eval seqlen {seqlen} must be a positive number of tokens")
    check(max_tokens is None or max_tokens >= seqlen, f"recipe eval max_tokens {max_tokens} is shorter than "
                                                      f"its seqlen {seqlen}")  # fmt: skip
    check(limit is None or limit > 0, f"recipe eval limit {limit} must be a positive number of documents")
    check_tasks(evaluation["tasks"], limit)
    for name in evaluation["ppl"]:  # after the cheap checks: a built-in corpus may be fetched here
        get_corpus(name)
    get_corpus(config.calib)  # a calibration file that cannot be read is refused before the model loads
    out = check_output(Path(runs_root) / check_run_name(recipe.name), overwrite,
                       [("model", recipe.model), ("calibration text", config.calib),
                        *(("evaluation text", name) for name in evaluation["ppl"])])  # fmt: skip
    timings: dict[str, float] = {}

    began = time.perf_counter()
    dense = load(recipe.model)
    config.check_model(dense.model)
    if method is not None:
        method.check(dense.model, method_config)
    if polish is not None:
        polish.check(dense.model, polish_config)
    timings["load_s"] = time.perf_counter() - began

    def evaluate(model) -> dict:
        return evaluate_model(model, dense.tokenizer, ppl=evaluation["ppl"], seqlen=evaluation["seqlen"],
                              max_tokens=evaluation["max_tokens"], tasks=evaluation["tasks"],
                              limit=evaluation["limit"], device=device, progress=progress)  # fmt: skip

    rows: dict[str, dict] = {}
    if tune is not None:  # the dense model tuned on the task: the model pruned, and the teacher
        rows["base"] = evaluate(dense.model)
        t = time.perf_counter()
        examples = tune_task.encode(dense.tokenizer)
        tuned = tune.run(RecoveryContext(model=dense.model, teacher=dense.model, tokenizer=dense.tokenizer,
                                         calib_ids=examples, pattern=parse_pattern("unstructured"), device=device,
                                         seed=config.seed, progress=progress), tune_config)  # fmt: skip
        timings["finetune_s"] = time.perf_counter() - t
        save_run(out / "tuned", dense.model, dense.tokenizer,
                 {"source_model": recipe.model, "command": "run", "finetune": {"method": tune.name,
                  **tune_config.to_dict()}, "data": examples.summary(), "versions": versions()},
                 sparsity_summary(dense.model, "unstructured"), overwrite=overwrite,
                 extra_files=recovery_files(tune, tuned))  # fmt: skip
    t = time.perf_counter()
    rows["dense"] = evaluate(dense.model)
    timings["eval_dense_s"] = time.perf_counter() - t

    calib = calibration_windows(dense.tokenizer, get_corpus(config.calib), config.nsamples, config.seqlen, config.seed)
    sparse = copy.deepcopy(dense.model)
    t = time.perf_counter()
    walked = prune_model(sparse, calib, config, progress=progress)
    timings["prune_s"] = time.perf_counter() - t
    sparsity = sparsity_summary(sparse, config.pattern)
    rows["pruned"] = evaluate(sparse)
    rows["pruned"]["sparsity"] = sparsity["overall"]
    base_run = {"source_model": recipe.model, "config": config.to_dict(), "versions": versions()}
    if "owl" in walked:  # OWL: every block's outlier ratio and sparsity
        base_run["owl"] = walked["owl"]
    save_run(out / "pruned", sparse, dense.tokenizer, {**base_run, "command": "run", "results": rows["pruned"]},
             sparsity, overwrite=overwrite)  # fmt: skip

    report: dict = {}
    if method is not None or polish is not None:
        # With a task, recovery trains on its examples (loss on the completions), else on the calibration windows.
        train = recover_task.encode(dense.tokenizer) if recover_task is not None else calib
        ctx = RecoveryContext(model=sparse, teacher=dense.model, tokenizer=dense.tokenizer, calib_ids=train,
                              pattern=parse_pattern(config.pattern), device=device, seed=config.seed,
                              batch_size=config.batch_size, progress=progress)  # fmt: skip
        recovery: dict = {}
        if recipe.guard != "off":  # the pruned model, to compare with (and fall back to) after recovery
            t = time.perf_counter()
            length = model_guard.guard_length(dense.model.config, config.seqlen, recipe.eval["seqlen"])
            windows = model_guard.guard_windows(dense.tokenizer, get_corpus(config.calib), config.nsamples,
                                                config.seqlen, config.seed, calib, length)  # fmt: skip
            dense_loss = model_guard.lm_loss(dense.model, windows, device, config.batch_size)
            before = model_guard.snapshot([sparse])
            timings["guard_before_s"] = time.perf_counter() - t
        if method is not None:
            t = time.perf_counter()
            report = method.run(ctx, method_config)
            timings["recover_s"] = time.perf_counter() - t
            recovery = {"method": method.name, **method_config.to_dict()}
        if polish is not None:  # the global pass, on the block-wise result
            t = time.perf_counter()
            polished = polish.run(ctx, polish_config)
            timings["polish_s"] = time.perf_counter() - t
            recovery["polish"] = {"method": polish.name, **polish_config.to_dict()}
            report = {**report, "polish": {"method": polish.name, **polished}}
            if method is None:
                method, method_config = polish, polish_config
        if recipe.guard == "off":
            verdict = model_guard.skipped(recipe.guard, None, "off")
        else:
            t = time.perf_counter()
            verdict = model_guard.check_recovery(sparse, [sparse], before, windows, recipe.guard, device, dense_loss,
                                                 config.batch_size)  # fmt: skip
            timings["guard_after_s"] = time.perf_counter() - t
            del before
        recovered_sparsity = sparsity_summary(sparse, config.pattern)
        rows["recovered"] = evaluate(sparse)
        rows["recovered"]["sparsity"] = recovered_sparsity["overall"]
        recovery.setdefault("method", method.name)
        save_run(out / "recovered", sparse, dense.tokenizer,
                 {**base_run, "command": "run", "recovery": recovery, "results": rows["recovered"],
                  "guard": verdict.to_dict()}, recovered_sparsity, overwrite=overwrite,
                 extra_files=recovery_files(method, report, verdict))  # fmt: skip
    timings["total_s"] = time.perf_counter() - began
    summary = {"recipe": recipe.__dict__, "rows": rows, "timings": timings, "device": str(device)}
    if "recovered" in rows:
        summary["guard"] = verdict.to_dict()
    if "recovered" in rows:
        summary["gap_closed"] = {
            corpus: gap_closed_both(rows["dense"]["ppl"][corpus]["value"], rows["pruned"]["ppl"][corpus]["value"],
                                    rows["recovered"]["ppl"][corpus]["value"])
            for corpus in rows["dense"].get("ppl", {})
        }  # fmt: skip
    report_md = recipe_report(summary, method.markdown(report) if method else None)

    def write() -> None:
        write_file_atomically(out / "report.md", report_md)
        write_file_atomically(out / "summary.json", json.dumps(summary, indent=2, default=str))
        if "recovered" not in rows and (out / "recovered").is_dir():
            # An earlier run of this name (replaced with --overwrite) recovered; this one did not: its model
            # would sit beside a report that no longer speaks of it. Removed last, once this result is complete.
            shutil.rmtree(out / "recovered")

    distributed.on_main(write, "writing the report")
    return summary


@dataclass
class TaskSection:
    """A recipe section's task: its training examples, checked at load time, tokenized once the model loads."""

    data: str
    examples: list
    max_length: int
    chat_template: bool

    def encode(self, tokenizer):
        return encode_examples(tokenizer, self.examples, self.max_length, self.chat_template)


def task_section(section: dict, where: str) -> TaskSection:
    """The task named by ``section["data"]`` (every line checked), with the section's task options."""
    options = convert_values({k: v for k, v in section.items() if k in TASK_KEYS},
                             {"data": str, "max_examples": int | None, "max_length": int, "chat_template": bool},
                             where)  # fmt: skip
    max_length = options.get("max_length", defaults.FINETUNE_MAX_LENGTH)
    check(max_length >= 2, f"{where} max_length {max_length} must be at least 2 tokens")
    examples = load_examples(options["data"], "train", options.get("max_examples"))
    return TaskSection(options["data"], examples, max_length, options.get("chat_template", True))
