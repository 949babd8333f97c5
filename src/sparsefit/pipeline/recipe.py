"""`sparsefit run`: the main job from a recipe. Prune, recover with EBFT against the dense teacher on
the same calibration windows, evaluate dense / pruned / recovered side by side, write a report.

A recipe is YAML with the sections below; every key is optional and unknown keys are an error.

    name: default
    model: smollm2-135m
    prune:   {method: wanda, sparsity: 0.5, pattern: unstructured, calib: wiki, nsamples: 32, seqlen: 256, seed: 0}
    recover: {method: ebft, preset: cpu}          # or `recover: null` to skip; other keys are EBFTConfig fields
    eval:    {ppl: [wiki, books], seqlen: 1024, max_tokens: 4096, tasks: [], limit: null}
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from sparsefit.errors import UsageError, check

DEFAULT_PRUNE = {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured", "calib": "wiki", "nsamples": 32,
                 "seqlen": 256, "seed": 0}  # fmt: skip
DEFAULT_RECOVER = {"method": "ebft", "preset": "cpu"}
DEFAULT_EVAL = {"ppl": ["wiki", "books"], "seqlen": 1024, "max_tokens": 4096, "tasks": [], "limit": None}


@dataclass
class Recipe:
    name: str = "default"
    model: str = "smollm2-135m"
    device: str = "auto"
    prune: dict = field(default_factory=lambda: dict(DEFAULT_PRUNE))
    recover: dict | None = field(default_factory=lambda: dict(DEFAULT_RECOVER))
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
                defaults = DEFAULT_PRUNE if key == "prune" else DEFAULT_EVAL
                bad = sorted(set(value) - set(defaults))
                check(not bad, f"recipe {key} key(s) {', '.join(bad)} not known; use {', '.join(defaults)}")
                setattr(recipe, key, {**defaults, **value})
            elif key == "recover":
                check(value is None or isinstance(value, dict), "recipe section 'recover' must be a mapping or null")
                recipe.recover = None if value is None else {**DEFAULT_RECOVER, **value}
            else:
                setattr(recipe, key, value)
        return recipe


def _gap_closed(dense: float, pruned: float, recovered: float) -> dict:
    """Share of the dense-to-pruned gap closed, linearly and in log-perplexity (DESIGN.md says why both)."""
    if pruned <= dense:
        return {"linear": None, "log": None}
    return {
        "linear": (pruned - recovered) / (pruned - dense),
        "log": (math.log(pruned) - math.log(recovered)) / (math.log(pruned) - math.log(dense)),
    }


def run_recipe(recipe: Recipe, runs_root: Path = Path("runs"), overwrite: bool = True) -> dict:
    """Run the whole job; returns the summary that report.md shows."""
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import get_adapter, load
    from sparsefit.pipeline.jobs import evaluate_model, save_run, sparsity_summary, versions
    from sparsefit.pipeline.prune_model import PruneConfig, check_pattern_fits, prune_model, resolve_device
    from sparsefit.progress import bar
    from sparsefit.prune import parse_pattern
    from sparsefit.recover import RecoveryContext, get_method

    config = PruneConfig(**{k: v for k, v in recipe.prune.items()}, device=recipe.device)
    config.validate()
    evaluation = recipe.eval
    for name in evaluation["ppl"]:
        get_corpus(name)
    method = None
    if recipe.recover is not None:
        method = get_method(recipe.recover.get("method", "ebft"))
    device = resolve_device(recipe.device)
    out = runs_root / recipe.name
    timings: dict[str, float] = {}

    began = time.perf_counter()
    dense = load(recipe.model)
    check_pattern_fits(dense.model, config.pattern)
    timings["load_s"] = time.perf_counter() - began

    def evaluate(model) -> dict:
        return evaluate_model(model, dense.tokenizer, ppl=evaluation["ppl"], seqlen=evaluation["seqlen"],
                              max_tokens=evaluation["max_tokens"], tasks=evaluation["tasks"],
                              limit=evaluation["limit"], device=device, bar=bar)  # fmt: skip

    rows: dict[str, dict] = {}
    t = time.perf_counter()
    rows["dense"] = evaluate(dense.model)
    timings["eval_dense_s"] = time.perf_counter() - t

    calib = calibration_windows(dense.tokenizer, get_corpus(config.calib), config.nsamples, config.seqlen, config.seed)
    sparse = copy.deepcopy(dense.model)
    t = time.perf_counter()
    blocks = len(get_adapter(sparse).get_blocks(sparse))
    with bar(f"prune {config.method}", blocks) as update:
        prune_model(sparse, calib, config, on_block_done=lambda ctx, _o: update(done=ctx.index + 1))
    timings["prune_s"] = time.perf_counter() - t
    sparsity = sparsity_summary(sparse, config.pattern)
    rows["pruned"] = evaluate(sparse)
    rows["pruned"]["sparsity"] = sparsity["overall"]
    base_run = {"source_model": recipe.model, "config": {**config.to_dict()}, "versions": versions()}
    save_run(out / "pruned", sparse, dense.tokenizer, {**base_run, "command": "run", "results": rows["pruned"]},
             sparsity, overwrite=overwrite)  # fmt: skip

    ebft_blocks: list[dict] = []
    ebft_config: dict = {}
    if method is not None:
        options = {k: v for k, v in recipe.recover.items() if k != "method"}
        ctx = RecoveryContext(model=sparse, teacher=dense.model, tokenizer=dense.tokenizer, calib_ids=calib,
                              pattern=parse_pattern(config.pattern), device=device, seed=config.seed,
                              batch_size=config.batch_size, options=options)  # fmt: skip
        t = time.perf_counter()
        with bar(f"recover {method.name}", 1) as update:
            report = method.run(ctx)
            update(done=1)
        timings["recover_s"] = time.perf_counter() - t
        ebft_blocks, ebft_config = report.get("blocks", []), report.get("config", {})
        recovered_sparsity = sparsity_summary(sparse, config.pattern)
        rows["recovered"] = evaluate(sparse)
        rows["recovered"]["sparsity"] = recovered_sparsity["overall"]
        from sparsefit.pipeline.jobs import ebft_artifacts

        extra = ebft_artifacts([{"block": b["block"], "ebft": b} for b in ebft_blocks], report["config"])
        save_run(out / "recovered", sparse, dense.tokenizer,
                 {**base_run, "command": "run", "ebft": report["config"], "results": rows["recovered"]},
                 recovered_sparsity, overwrite=overwrite, extra_files=extra)  # fmt: skip
    timings["total_s"] = time.perf_counter() - began
    summary = {"recipe": recipe.__dict__, "rows": rows, "timings": timings, "device": str(device)}
    if "recovered" in rows:
        summary["gap_closed"] = {
            corpus: _gap_closed(rows["dense"]["ppl"][corpus]["value"], rows["pruned"]["ppl"][corpus]["value"],
                                rows["recovered"]["ppl"][corpus]["value"])
            for corpus in rows["dense"].get("ppl", {})
        }  # fmt: skip
    _write_report(out, summary, ebft_blocks, ebft_config)
    return summary


def _write_report(out: Path, summary: dict, ebft_blocks: list[dict], ebft_config: dict) -> None:
    from sparsefit.evaluate.report import ebft_markdown, markdown_table
    from sparsefit.export.run_folder import write_file_atomically

    rows = summary["rows"]
    corpora = list(rows["dense"].get("ppl", {}))
    tasks = list(rows["dense"].get("tasks", {}))
    header = ["model", *[f"ppl {c}" for c in corpora], *tasks, "sparsity"]
    table = []
    for name, row in rows.items():
        table.append([name, *[round(row["ppl"][c]["value"], 3) for c in corpora],
                      *[round(row["tasks"][t].get("acc_norm", row["tasks"][t]["acc"]), 4) for t in tasks],
                      round(row.get("sparsity", 0.0), 4)])  # fmt: skip
    recipe = summary["recipe"]
    ev = recipe["eval"]
    first = rows["dense"]["ppl"][corpora[0]] if corpora else None
    lines = [
        f"# sparsefit run `{recipe['name']}`\n",
        f"Model `{recipe['model']}`; pruning {json.dumps(recipe['prune'])}; recovery {json.dumps(recipe['recover'])}.",
        f"Perplexity: WikiText-2 protocol on each corpus's test split, seqlen {ev['seqlen']}, "
        f"{first['tokens'] if first else 0} tokens per corpus (max_tokens {ev['max_tokens']}). "
        f"Device {summary['device']}.\n",
        markdown_table(header, table),
    ]
    if "gap_closed" in summary:
        gap_rows = [[c, g["linear"], g["log"]] for c, g in summary["gap_closed"].items()]
        lines += ["Share of the dense-to-pruned gap that recovery closes:\n",
                  markdown_table(["corpus", "linear", "log-perplexity"], gap_rows)]  # fmt: skip
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items()) + "\n")
    if ebft_blocks:
        lines.append(ebft_markdown(ebft_blocks, ebft_config).replace("# EBFT", "## EBFT"))
    write_file_atomically(out / "report.md", "\n".join(lines))
    write_file_atomically(out / "summary.json", json.dumps(summary, indent=2, default=str))
