"""`sparsefit run`: the main job from a recipe. Prune, recover with any method against the dense teacher on
the same calibration windows, evaluate dense / pruned / recovered side by side, write a report.

A recipe is YAML with the sections below; every key is optional and unknown keys are an error.

    name: default
    model: smollm2-135m
    prune:   {method: wanda, sparsity: 0.5, pattern: unstructured, calib: wiki, nsamples: 64, seqlen: 128, seed: 0,
              owl_lambda: null, owl_m: 5}   # owl_lambda 0.08: OWL's per-block sparsities (null/0: uniform)
    recover: {method: ebft, preset: quick} # any method of `sparsefit recover`; the other keys are its options;
                                           # `recover: null` skips it
    polish:  {method: squarehead, preset: cpu}  # optional: a short whole-model pass after `recover` (masks fixed),
                                                # e.g. SquareHead's distillation after EBFT; default null
    eval:    {ppl: [wiki, books], seqlen: 1024, max_tokens: 4096, tasks: [], limit: null}

Every value, the recover options included, is checked before the model is loaded.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from sparsefit import distributed
from sparsefit.app import defaults
from sparsefit.app.jobs import choose_method, evaluate_model, recovery_files, save_run, versions
from sparsefit.app.reports import gap_closed_both, recipe_report
from sparsefit.atomic import write_file_atomically
from sparsefit.data import calibration_windows, get_corpus
from sparsefit.errors import UsageError, check
from sparsefit.models import load
from sparsefit.progress import Bar, silent
from sparsefit.prune import PruneConfig, parse_pattern, prune_model, sparsity_summary
from sparsefit.recover import RecoveryContext
from sparsefit.walk import resolve_device

DEFAULT_PRUNE = {"method": defaults.QUICK.method, "sparsity": defaults.QUICK.sparsity,
                 "pattern": defaults.QUICK.pattern, **defaults.calibration(defaults.QUICK),
                 "owl_lambda": defaults.QUICK.owl_lambda, "owl_m": defaults.QUICK.owl_m,
                 "gqa": defaults.QUICK.gqa, "keep_heads": defaults.QUICK.keep_heads}  # fmt: skip
DEFAULT_RECOVER = {"method": defaults.RECOVER_METHOD, "preset": "quick"}
DEFAULT_EVAL = {"ppl": list(defaults.EVAL_CORPORA), "seqlen": defaults.EVAL_SEQLEN,
                "max_tokens": defaults.RUN_EVAL_MAX_TOKENS, "tasks": [], "limit": None}  # fmt: skip


@dataclass
class Recipe:
    name: str = "default"
    model: str = "smollm2-135m"
    device: str = "auto"
    prune: dict = field(default_factory=lambda: dict(DEFAULT_PRUNE))
    recover: dict | None = field(default_factory=lambda: dict(DEFAULT_RECOVER))
    polish: dict | None = None
    eval: dict = field(default_factory=lambda: dict(DEFAULT_EVAL))

    @classmethod
    def load(cls, path: Path | None) -> Recipe:
        if path is None:
            return cls()
        import yaml

        if not Path(path).is_file():
            raise UsageError(f"recipe {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"recipe {str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
        check(isinstance(data, dict), f"recipe {str(path)!r} must be a mapping of sections")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        check(not unknown, f"recipe key(s) {', '.join(unknown)} not known; use {', '.join(sorted(known))}")
        recipe = cls()
        for key, value in data.items():
            if key in ("prune", "eval"):
                check(isinstance(value, dict), f"recipe section {key!r} must be a mapping")
                section_defaults = DEFAULT_PRUNE if key == "prune" else DEFAULT_EVAL
                bad = sorted(set(value) - set(section_defaults))
                check(not bad, f"recipe {key} key(s) {', '.join(bad)} not known; use {', '.join(section_defaults)}")
                setattr(recipe, key, {**section_defaults, **value})
            elif key == "recover":
                check(value is None or isinstance(value, dict), "recipe section 'recover' must be a mapping or null")
                if value is None:
                    recipe.recover = None
                else:
                    # A recipe naming another method starts from that method's defaults, not EBFT's preset.
                    base = DEFAULT_RECOVER if value.get("method", defaults.RECOVER_METHOD) == "ebft" else {}
                    recipe.recover = {"method": defaults.RECOVER_METHOD, **base, **value}
            elif key == "polish":
                check(value is None or isinstance(value, dict), "recipe section 'polish' must be a mapping or null")
                recipe.polish = None if value is None else {"method": "squarehead", **value}
            else:
                setattr(recipe, key, value)
        return recipe

    def recover_options(self) -> dict:
        return {k: v for k, v in (self.recover or {}).items() if k != "method"}

    def polish_options(self) -> dict:
        return {k: v for k, v in (self.polish or {}).items() if k != "method"}


def run_recipe(recipe: Recipe, runs_root: Path = Path("runs"), overwrite: bool = True, progress: Bar = silent) -> dict:
    """Run the whole job; returns the summary that report.md shows."""
    config = PruneConfig(**recipe.prune, device=recipe.device)
    config.validate()
    device = resolve_device(recipe.device)
    method = method_config = None
    if recipe.recover is not None:
        method, method_config = choose_method(recipe.recover["method"], recipe.recover_options(), config.nsamples,
                                              device, pattern=config.pattern, seed=config.seed)  # fmt: skip
    polish = polish_config = None
    if recipe.polish is not None:
        polish, polish_config = choose_method(recipe.polish["method"], recipe.polish_options(), config.nsamples,
                                              device, pattern=config.pattern, seed=config.seed)  # fmt: skip
        check(not polish.blockwise, f"recipe polish {polish.name!r} works block by block; the polish pass is a "
              "whole-model method (squarehead, lora or s2ft)")  # fmt: skip
    evaluation = recipe.eval
    for name in evaluation["ppl"]:  # after the cheap checks: a built-in corpus may be fetched here
        get_corpus(name)
    out = runs_root / recipe.name
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
        ctx = RecoveryContext(model=sparse, teacher=dense.model, tokenizer=dense.tokenizer, calib_ids=calib,
                              pattern=parse_pattern(config.pattern), device=device, seed=config.seed,
                              batch_size=config.batch_size, progress=progress)  # fmt: skip
        recovery: dict = {}
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
        recovered_sparsity = sparsity_summary(sparse, config.pattern)
        rows["recovered"] = evaluate(sparse)
        rows["recovered"]["sparsity"] = recovered_sparsity["overall"]
        recovery.setdefault("method", method.name)
        save_run(out / "recovered", sparse, dense.tokenizer,
                 {**base_run, "command": "run", "recovery": recovery, "results": rows["recovered"]},
                 recovered_sparsity, overwrite=overwrite, extra_files=recovery_files(method, report))  # fmt: skip
    timings["total_s"] = time.perf_counter() - began
    summary = {"recipe": recipe.__dict__, "rows": rows, "timings": timings, "device": str(device)}
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

    distributed.on_main(write, "writing the report")
    return summary
