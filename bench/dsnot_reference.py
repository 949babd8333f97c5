"""DSnoT against its own reference run (issue 22 §6): the official code on SmolLM2, beside sparsefit's DSnoT.

The reference (github.com/zyxxmu/DSnoT: ``main.py``, ``lib/prune.py``) is imported at run time from a checkout
given with ``--reference`` (nothing of it is copied here) and run with ``main.py``'s own argument defaults (its
``add_argument`` calls are read from the file) for unstructured Wanda-initialised DSnoT, on the CPU, with the
smallest changes that make it run:

* its data loader (``get_loaders``, which downloads C4) returns sparsefit's calibration windows (``wiki``,
  ``--nsamples`` x ``--seqlen``, seed 0 or 1) in its own ``(inp, tar)`` format; ``prune_DSnoT`` asks for 2048-token
  windows whatever ``model.seqlen`` is, the loader gives the same windows to every caller;
* ``model.seqlen`` is the windows' length (``main.py``'s ``get_llm`` sets 2048) and ``model.hf_device_map`` is empty
  (``get_llm`` loads with ``device_map="auto"``, which sets it; the code looks names up in it); device ``cpu``;
* transformers >= 4.48 computes the rotary embeddings once per model and hands each decoder layer
  ``position_embeddings``; the reference (transformers 4.3x) calls a layer with ``attention_mask`` and
  ``position_ids`` only, so a forward pre-hook on each decoder layer supplies them from ``model.model.rotary_emb``
  when a call has none. A check before each reference row runs its layer calls on two windows against the model's
  own forward (``adapter_max_abs_diff``).

Rows: the reference's Wanda (``prune_wanda``), its DSnoT at the default update threshold 0.1 and at other values
(the threshold's unit is a sum over one window: 0.1 over the reference's 2048 tokens is 0.0125 over 256), sparsefit's
Wanda and sparsefit's DSnoT (interleaved, as ``bench/compare.py`` runs it) on the same windows. Perplexity with
sparsefit's evaluation (``wiki`` and ``books``, ``--eval-seqlen`` tokens per window, the first ``--max-tokens``
test tokens). Each row's masks go to ``--masks-dir`` and the reference's are compared with sparsefit's made at the
same setting. ``--loop-check`` also gives sparsefit's loop (``dsnot_unstructured``) the reference's own statistics,
dense weights and Wanda masks, layer by layer, and counts where its masks differ from the reference's. One process,
the rows one after another (about 3 minutes each on one thread); run it with one thread on a shared machine:

    OMP_NUM_THREADS=1 .venv/bin/python bench/dsnot_reference.py --reference /tmp/dsnot_ref --threads 1 --loop-check

Writes bench/results/dsnot_reference.{json,md} after every row; ``--merge`` keeps the rows measured before.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import common  # noqa: E402
from common import peak_rss_mb, write_results  # noqa: E402

MODEL = "smollm2-135m"
SCALED = "scaled"  # a threshold of 0.1 * seqlen / 2048: the reference's default per token, at this window length
# name: (implementation, method, update threshold, calibration seed); threshold None: the implementation's default,
# which is 0.1 for both. The seed-1 rows draw other windows: how much one measurement of DSnoT's effect says.
ROWS: dict[str, tuple[str, str, float | str | None, int]] = {
    "dense": ("none", "dense", None, 0),
    "ref-wanda": ("ref", "wanda", None, 0),
    "ref-dsnot": ("ref", "dsnot", None, 0),
    "ref-dsnot-threshold-scaled": ("ref", "dsnot", SCALED, 0),
    "ref-dsnot-threshold-0": ("ref", "dsnot", 0.0, 0),
    "ref-dsnot-threshold-1": ("ref", "dsnot", 1.0, 0),
    "sparsefit-wanda": ("sparsefit", "wanda", None, 0),
    "sparsefit-dsnot": ("sparsefit", "dsnot", None, 0),
    "sparsefit-dsnot-threshold-scaled": ("sparsefit", "dsnot", SCALED, 0),
    "ref-wanda-seed1": ("ref", "wanda", None, 1),
    "ref-dsnot-seed1": ("ref", "dsnot", None, 1),
}
# Reference row -> sparsefit row made at the same setting: their masks are compared.
PAIRS = {
    "ref-wanda": "sparsefit-wanda",
    "ref-dsnot": "sparsefit-dsnot",
    "ref-dsnot-threshold-scaled": "sparsefit-dsnot-threshold-scaled",
}


def threshold_of(row: str, seqlen: int) -> float | None:
    value = ROWS[row][2]
    return 0.1 * seqlen / 2048 if value == SCALED else value


def baseline_of(row: str) -> str:
    """The Wanda row of the same implementation and windows."""
    implementation, _, _, seed = ROWS[row]
    return next(n for n, (i, m, _, s) in ROWS.items() if (i, m, s) == (implementation, "wanda", seed))


# --- the reference, as it is --------------------------------------------------------------------------------------


def reference_args(reference: Path, argv: list[str]) -> argparse.Namespace:
    """``main.py``'s own parser: its ``parser.add_argument`` calls, read from the file, so every default is its own."""
    tree = ast.parse((reference / "main.py").read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = [node for node in ast.walk(main) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "add_argument"]  # fmt: skip
    parser = argparse.ArgumentParser()
    exec(compile(ast.Module(body=calls, type_ignores=[]), str(reference / "main.py"), "exec"), {"parser": parser})
    return parser.parse_args(argv)


def import_reference(reference: Path):
    """The reference's ``lib.prune`` module, imported from the checkout (a namespace package ``lib``)."""
    if str(reference) not in sys.path:
        sys.path.insert(0, str(reference))
    prune = importlib.import_module("lib.prune")
    check_path = Path(prune.__file__).resolve()
    if not check_path.is_relative_to(reference.resolve()):
        raise RuntimeError(f"lib.prune came from {check_path}, not from {reference}")
    return prune


def windows_loader(calib: torch.Tensor, asked: list[dict]):
    """``get_loaders`` for the reference: sparsefit's windows as its ``[(inp, tar), ...]`` (tar: the last token,
    the rest -100, as its ``get_c4``); it records what each caller asked for."""

    def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        asked.append({"name": name, "nsamples": nsamples, "seed": seed, "seqlen": seqlen})
        if nsamples != calib.shape[0]:
            raise RuntimeError(f"the reference asked for {nsamples} windows; sparsefit made {calib.shape[0]}")
        loader = []
        for window in calib:
            inp = window.unsqueeze(0).clone()
            tar = inp.clone()
            tar[:, :-1] = -100
            loader.append((inp, tar))
        return loader, None

    return get_loaders


def supply_position_embeddings(model) -> list:
    """Forward pre-hooks that give each decoder layer ``position_embeddings`` when its caller passes none."""
    rotary = model.model.rotary_emb

    def hook(module, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[-2], device=hidden.device).unsqueeze(0)
        return args, {**kwargs, "position_embeddings": rotary(hidden, positions)}

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]


@torch.no_grad()
def adapter_check(prune_lib, args, model, calib: torch.Tensor) -> float:
    """Max |difference| between the last decoder layer's output in the model's own forward and by the reference's
    path (``prepare_calibration_input``, then each layer called as the reference calls it)."""
    windows = calib[:2]
    saved = args.nsamples
    args.nsamples = windows.shape[0]
    try:
        loader = [(w.unsqueeze(0), None) for w in windows]
        inps, _, attention_mask, position_ids = prune_lib.prepare_calibration_input(args, model, loader, "cpu")
    finally:
        args.nsamples = saved
    for layer in model.model.layers:
        inps = torch.stack([layer(x.unsqueeze(0), attention_mask=attention_mask, position_ids=position_ids)[0]
                            for x in inps])  # fmt: skip
    captured = []
    handle = model.model.layers[-1].register_forward_hook(lambda module, inp, out: captured.append(out))
    try:
        model(windows)
    finally:
        handle.remove()
    own = captured[0][0] if isinstance(captured[0], tuple) else captured[0]  # the last decoder layer's output
    return float((own - inps).abs().max())


def run_reference(prune_lib, reference: Path, model, tokenizer, calib: torch.Tensor, method: str,
                  sparsity: float, threshold: float | None, seed: int) -> dict:  # fmt: skip
    # --seed: the windows' seed, for the record (it seeds only the reference's own loader, replaced here)
    argv = ["--model", MODEL, "--nsamples", str(calib.shape[0]), "--seed", str(seed), "--sparsity_ratio",
            str(sparsity), "--sparsity_type", "unstructured", "--initial_method", "wanda",
            "--prune_method", "DSnoT" if method == "dsnot" else "wanda"]  # fmt: skip
    if threshold is not None:
        argv += ["--update_threshold", repr(threshold)]
    args = reference_args(reference, argv)
    asked: list[dict] = []
    prune_lib.get_loaders = windows_loader(calib, asked)  # the one module-level change: its data
    model.seqlen = calib.shape[1]
    model.hf_device_map = {}
    hooks = supply_position_embeddings(model)
    device = torch.device("cpu")
    log = io.StringIO()
    try:
        adapter = adapter_check(prune_lib, args, model, calib)
        # main.py: seeds, eval mode, then the pruner (nothing in the pruning draws a random number)
        torch.random.manual_seed(args.seed)
        model.eval()
        began = time.perf_counter()
        with contextlib.redirect_stdout(log):
            if method == "dsnot":
                prune_lib.prune_DSnoT(args, model, tokenizer, device, prune_n=0, prune_m=0)
            else:
                prune_lib.prune_wanda(args, model, tokenizer, device, prune_n=0, prune_m=0)
        prune_s = time.perf_counter() - began
    finally:
        for hook in hooks:
            hook.remove()
        del model.hf_device_map
    keys = ["prune_method", "initial_method", "sparsity_ratio", "sparsity_type", "nsamples", "seed", "max_cycle_time",
            "update_threshold", "pow_of_var_regrowing", "pow_of_var_pruning", "skip_layer", "skip_sub_layer",
            "without_same_sign", "without_DSnoT"]  # fmt: skip
    return {"args": {k: getattr(args, k) for k in keys}, "loader_calls": asked, "adapter_max_abs_diff": adapter,
            "prune_s": round(prune_s, 1), "log_lines": len(log.getvalue().splitlines())}  # fmt: skip


# --- sparsefit ----------------------------------------------------------------------------------------------------


def run_sparsefit(model, calib: torch.Tensor, method: str, sparsity: float, threshold: float | None) -> dict:
    from sparsefit.app.jobs import prune_interleaved
    from sparsefit.prune import PruneConfig
    from sparsefit.recover import get_method

    nsamples, seqlen = calib.shape
    config = PruneConfig(method="wanda", sparsity=sparsity, pattern="unstructured", nsamples=nsamples, seqlen=seqlen,
                         device="cpu")  # fmt: skip
    began = time.perf_counter()
    result: dict = {}
    if method == "wanda":
        prune_interleaved(model, calib, config)
    else:
        dsnot = get_method("dsnot")
        options = {} if threshold is None else {"threshold": threshold}
        dsnot_config = dsnot.configure(options, nsamples, torch.device("cpu"))
        walked = prune_interleaved(model, calib, config, dsnot, dsnot_config)
        report = dsnot.summarize(dsnot_config, walked["blocks"], dsnot.blocks_of(model))
        result["dsnot"] = {k: report[k] for k in ("config", "swaps", "abs_error_before", "abs_error_after")}
    result["prune_s"] = round(time.perf_counter() - began, 1)
    return result


# --- one row ------------------------------------------------------------------------------------------------------


def layer_masks(model) -> dict[str, torch.Tensor]:
    """sparsefit's ``model_masks``, named as the reference names layers inside ``model.model.layers``
    (``0.self_attn.q_proj``)."""
    from sparsefit.walk.masks import model_masks

    return {name.removeprefix("model.layers."): keep for name, keep in model_masks(model).items()}


def measure(args: argparse.Namespace, row: str) -> dict:
    from sparsefit.app.jobs import evaluate_model
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load

    implementation, method, _, seed = ROWS[row]
    threshold = threshold_of(row, args.seqlen)
    loaded = load(MODEL)
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), args.nsamples, args.seqlen, seed)
    result: dict = {"status": "ok", "implementation": implementation, "method": method, "threshold": threshold,
                    "calib_seed": seed}  # fmt: skip
    began = time.perf_counter()
    if implementation == "ref":
        result.update(run_reference(import_reference(args.reference), args.reference, loaded.model, loaded.tokenizer,
                                    calib, method, args.sparsity, threshold, seed))  # fmt: skip
    elif implementation == "sparsefit":
        result.update(run_sparsefit(loaded.model, calib, method, args.sparsity, threshold))
    if implementation != "none":
        masks = layer_masks(loaded.model)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        result["sparsity"] = 1 - kept / total
        args.masks_dir.mkdir(parents=True, exist_ok=True)
        torch.save({name: m.cpu() for name, m in masks.items()}, args.masks_dir / f"{row}.pt")
    eval_began = time.perf_counter()
    res = evaluate_model(loaded.model, loaded.tokenizer, ppl=["wiki", "books"], seqlen=args.eval_seqlen,
                         max_tokens=args.max_tokens)  # fmt: skip
    result["ppl"] = {corpus: value["value"] for corpus, value in res["ppl"].items()}
    result["eval_s"] = round(time.perf_counter() - eval_began, 1)
    result["row_s"] = round(time.perf_counter() - began, 1)
    result["peak_rss_mb"] = round(peak_rss_mb())
    return result


def compare_masks(masks_dir: Path, left: str, right: str) -> dict | None:
    """Where the masks of two rows differ: overall, per block, and the first layer that differs."""
    paths = masks_dir / f"{left}.pt", masks_dir / f"{right}.pt"
    if not all(p.exists() for p in paths):
        return None
    a, b = (torch.load(p, weights_only=True) for p in paths)  # this script's own files; kept in layer order
    differ = {name: int((a[name] != b[name]).sum()) for name in a}
    total = sum(m.numel() for m in a.values())
    first = next((name for name in a if differ[name]), None)  # named_modules order: block by block
    block0 = {name.split(".", 1)[1]: differ[name] for name in a if name.startswith("0.")}
    return {"differ": sum(differ.values()), "of": total, "share": sum(differ.values()) / total,
            "first_layer_that_differs": first, "block0": block0}  # fmt: skip


@torch.no_grad()
def loop_check(args: argparse.Namespace) -> dict:
    """sparsefit's DSnoT loop on the reference's own statistics: run ``prune_DSnoT`` (default arguments, seed-0
    windows) with its ``WrappedGPT`` recording each layer's statistics and dense weight, then give every attention
    layer's statistics, Wanda mask and dense weight to ``dsnot_unstructured`` and compare its mask with the one the
    reference left in the model. Tells a difference of the loops from one of the statistics fed to them."""
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load
    from sparsefit.recover.dsnot import DSnoTConfig, dsnot_unstructured, is_attention

    loaded = load(MODEL)
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), args.nsamples, args.seqlen, 0)
    prune_lib = import_reference(args.reference)
    original = prune_lib.WrappedGPT
    recorded = []

    class Recording(original):
        def __init__(self, layer, *rest, **options):
            super().__init__(layer, *rest, **options)
            self.dense = layer.weight.detach().clone()  # made before the block is pruned: the dense weight
            recorded.append(self)

    prune_lib.WrappedGPT = Recording
    try:
        run = run_reference(prune_lib, args.reference, loaded.model, loaded.tokenizer, calib, "dsnot", args.sparsity,
                            None, 0)  # fmt: skip
    finally:
        prune_lib.WrappedGPT = original
    names = {id(m): n for n, m in loaded.model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    config = DSnoTConfig(max_cycles=run["args"]["max_cycle_time"], threshold=run["args"]["update_threshold"],
                         var_power=run["args"]["pow_of_var_regrowing"])  # fmt: skip
    layers, differ, swaps, first = 0, 0, 0, None
    for rec in recorded:
        name = names[id(rec.layer)]
        if not is_attention(name.split(".", 1)[1]):
            continue
        w = rec.dense
        wanda = w.abs() * rec.scaler_row.sqrt().reshape(1, -1)  # the reference's Wanda mask (prune_DSnoT's own)
        pruned = torch.sort(wanda, dim=-1, stable=True)[1][:, : int(w.shape[1] * args.sparsity)]
        keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, pruned, False)
        result = dsnot_unstructured(w, w * keep, keep, rec.sum_metric_row, rec.var.reshape(-1), rec.scaler_row, config)
        ours, theirs = result.keep & (w != 0), rec.layer.weight != 0
        layers += 1
        swaps += result.swaps
        n = int((ours != theirs).sum())
        differ += n
        first = first or (name if n else None)
    return {"attention_layers": layers, "entries_that_differ": differ, "first_layer_that_differs": first,
            "sparsefit_swaps": swaps, "reference_prune_s": run["prune_s"]}  # fmt: skip


# --- the report ---------------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, runs: dict[str, dict], loop: dict | None) -> None:
    from sparsefit.app.reports import gap_closed

    dense = runs.get("dense", {}).get("ppl")
    rows = []
    for name in [n for n in ROWS if n in runs]:
        r = runs[name]
        if r.get("status") != "ok":
            rows.append([name, "failed", r.get("error", "")] + [""] * 7)
            continue
        base = runs.get(baseline_of(name), {}).get("ppl") if name != "dense" else None
        cells = []
        for corpus in ("wiki", "books"):
            q = r["ppl"][corpus]
            share = gap_closed(dense[corpus], base[corpus], q, log=True) if dense and base and r["method"] == "dsnot" \
                else None  # fmt: skip
            cells.append(f"{q:.1f}" + (f" ({share:+.0%})" if share is not None else ""))
        threshold = r.get("threshold")
        threshold = 0.1 if threshold is None and r["method"] == "dsnot" else threshold
        swaps = r.get("dsnot", {}).get("swaps", "")
        rows.append([name, *cells, "" if threshold is None else f"{threshold:g}",
                     f"{r['sparsity']:.4f}" if "sparsity" in r else "", swaps, r.get("prune_s", ""), r["eval_s"],
                     r["row_s"]])  # fmt: skip
    pairs = {f"{left} vs {right}": compare_masks(args.masks_dir, left, right) for left, right in PAIRS.items()}
    pairs = {k: v for k, v in pairs.items() if v is not None}
    mask_text = "; ".join(
        f"{k}: {v['share']:.3%} of {v['of']:,} entries differ, first in `{v['first_layer_that_differs']}`"
        for k, v in pairs.items()
    )  # fmt: skip
    ref_args = next((r["args"] for n, r in runs.items() if n == "ref-dsnot" and r.get("status") == "ok"), None)
    adapter = max((r["adapter_max_abs_diff"] for r in runs.values() if "adapter_max_abs_diff" in r), default=None)
    notes = (
        f"SmolLM2-135M (float32), Wanda {args.sparsity:.0%} unstructured; calibration `wiki` {args.nsamples} x "
        f"{args.seqlen} tokens (sparsefit's windows; seed 0, seed 1 in the `-seed1` rows) for every row; perplexity "
        f"with sparsefit's evaluation on the first {args.max_tokens:,} test tokens at seqlen {args.eval_seqlen} (in "
        "brackets: share of the "
        "log-perplexity gap closed by DSnoT against the same implementation's Wanda; negative: worse). `ref-*`: the "
        "reference code (github.com/zyxxmu/DSnoT `lib/prune.py`, `prune_wanda` / `prune_DSnoT`) imported as it is, "
        "with `main.py`'s defaults"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in ref_args.items() if k not in ('prune_method', 'sparsity_ratio'))})"
            if ref_args
            else ""
        )
        + "; changed to run: its data loader returns these windows, device cpu, `model.seqlen` the windows' length, "
        "an empty `hf_device_map`, and the rotary `position_embeddings` that transformers >= 4.48 decoder layers "
        "need, supplied by a pre-hook"
        + (f" (its layer calls reproduce the model's own forward to {adapter:.1e})" if adapter is not None else "")
        + ". `sparsefit-*`: `prune_interleaved` with Wanda, and DSnoT's default config, as bench/compare.py's "
        "interleaved rows. Threshold `scaled`: 0.1 x seqlen / 2048 (the reference's 0.1 is a sum over a 2048-token "
        f"window). Swaps: sparsefit's count (the reference reports none). Times in seconds, one thread, "
        f"torch {torch.__version__}." + (f" Masks: {mask_text}." if mask_text else "")
    )
    if loop:
        notes += (
            f" Loop check (sparsefit's `dsnot_unstructured` on the reference's own statistics, dense weights and Wanda "
            f"masks, every attention layer of its `ref-dsnot` run): {loop['entries_that_differ']:,} mask entries "
            f"differ in {loop['attention_layers']} layers ({loop['sparsefit_swaps']:,} swaps)."
        )
    header = ["row", "wiki ppl", "books ppl", "threshold", "sparsity", "swaps", "prune s", "eval s", "row s"]
    data = {"setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "dense": dense, "runs": runs, "masks": pairs, "loop_check": loop}  # fmt: skip
    write_results(args.name, data, header, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of github.com/zyxxmu/DSnoT")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--masks-dir", type=Path, default=Path("/tmp/dsnot_reference_masks"))
    parser.add_argument("--merge", action="store_true", help="keep the other rows of the results json")
    parser.add_argument("--name", default="dsnot_reference", help="results file name")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--loop-check", action="store_true", help="also run sparsefit's loop on the reference's stats")
    args = parser.parse_args()
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    if not (args.reference / "lib" / "prune.py").exists():
        sys.exit(f"{args.reference} holds no lib/prune.py; export github.com/zyxxmu/DSnoT there")
    torch.set_num_threads(args.threads)
    common.RESULTS = args.out_dir
    stored_path = args.out_dir / f"{args.name}.json"
    stored = json.loads(stored_path.read_text()) if args.merge and stored_path.exists() else {}
    runs = {k: v for k, v in stored.get("runs", {}).items() if k not in names}
    loop = stored.get("loop_check")
    if args.loop_check:
        print("loop check ...", file=sys.stderr, flush=True)
        loop = loop_check(args)
        print(f"loop check: {json.dumps(loop)}", file=sys.stderr, flush=True)
        report(args, runs, loop)
    for name in names:
        print(f"row {name} ...", file=sys.stderr, flush=True)
        try:
            runs[name] = measure(args, name)
        except Exception as exc:  # keep the other rows
            runs[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        r = runs[name]
        ppl = r.get("ppl", {})
        print(f"row {name}: {r.get('status')} wiki {ppl.get('wiki', math.nan):.2f} books "
              f"{ppl.get('books', math.nan):.2f} ({r.get('row_s', '?')} s)", file=sys.stderr, flush=True)  # fmt: skip
        report(args, runs, loop)


if __name__ == "__main__":
    main()
