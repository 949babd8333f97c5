"""DSnoT (Zhang et al., arXiv 2310.08915): training-free prune-and-grow of a sparse model's masks.

As the official code runs it (``lib/prune.py``, ``lib/layerwrapper.py``), per layer and output row:

* statistics per input channel j from the calibration inputs: ``sum_j`` (the sum of x_j over a window, averaged
  over windows: the reference's ``sum_metric_row``), ``var_j`` (the variance of x_j within a window, averaged over
  windows) and ``||x_j||^2`` (Wanda's norm);
* the row's reconstruction error is ``e = sum over pruned j of W_j * sum_j``: the expected difference between the
  dense and the sparse output;
* each cycle regrows the pruned weight that shrinks ``|e|`` most, ranked by ``|W_j sum_j| / var_j^p``, and prunes
  the kept weight of opposite contribution with the smallest Wanda score ``|W_j| ||x_j||``; a swap happens only
  while ``|e| > threshold`` and only if ``e`` keeps its sign; a row stops at its first refused swap or after
  ``max_cycles``. N:M: the weight pruned is the lowest-Wanda kept weight of the regrown weight's group, so
  every group keeps exactly N.
* no weight value changes: a regrown weight takes the dense teacher's value, a kept one keeps its own.

Three deliberate differences from the reference, each keeping the sparsity exact: candidates are filtered by
sign, so a row never "regrows" a kept weight or prunes a pruned one when its candidates run out (the reference
does, on narrow layers, which changes the sparsity); a weight regrown during the run is never pruned again in
N:M (the reference can prune an already-pruned weight there); and when the kept weights differ from the teacher's
(SparseGPT with its weight update, or after EBFT) the error counts their difference too, ``e = sum_j (W_dense -
W_sparse)_j sum_j``, which equals the reference's whenever the kept weights are the teacher's.

Statistics come from the dense block (the teacher's) run on the sparse model's own block inputs, the pass in
which the reference collects them together with Wanda's. The threshold is in the reference's unit (sums over a
window), so it is looser at shorter windows than the reference's 2048 tokens. Attention layers only by default,
as the reference (``skip_layer mlp``). Works through the adapters for every architecture.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsefit.errors import check
from sparsefit.models.adapters import prunable_layers, weight_matrix
from sparsefit.prune.masks import flatten_inputs
from sparsefit.prune.pattern import Pattern
from sparsefit.recover.base import BlockwiseMethod
from sparsefit.walk.hooks import layer_inputs
from sparsefit.walk.walker import BlockContext, BlockStep

LAYER_SETS = ("attn", "mlp", "all")
VAR_FLOOR = 1e-12  # a channel constant over every window has zero variance: rank it first, never divide by 0


@dataclass
class DSnoTConfig:
    """The official defaults: 50 cycles, threshold 0.1, variance power 1, attention layers only."""

    max_cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0
    layers: str = "attn"  # attn (the reference's default), mlp, or all

    def validate(self, name: str = "dsnot", n_windows: int | None = None) -> None:
        check(
            isinstance(self.max_cycles, int) and self.max_cycles >= 1,
            f"dsnot max cycles {self.max_cycles!r} must be an integer >= 1",
        )
        check(self.threshold >= 0, f"dsnot threshold {self.threshold} must be >= 0")
        check(self.var_power >= 0, f"dsnot variance power {self.var_power} must be >= 0")
        check(self.layers in LAYER_SETS, f"dsnot layers {self.layers!r} is not one of {', '.join(LAYER_SETS)}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {"paper": DSnoTConfig()}


def is_attention(name: str) -> bool:
    """Attention layers by their name inside the block (self_attn.q_proj, attn.c_attn, ...); the rest is MLP."""
    head = name.split(".")[0]
    return "attn" in head or "attention" in head


def select_layers(layers: dict[str, nn.Module], which: str) -> dict[str, nn.Module]:
    if which == "all":
        return dict(layers)
    return {name: layer for name, layer in layers.items() if is_attention(name) == (which == "attn")}


class ChannelStats:
    """Per input channel, float64: sum of squares, per-window sums and per-window variances, over windows."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.columns = columns
        self.sq_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.window_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.window_var = torch.zeros(columns, dtype=torch.float64, device=device)
        self.windows = 0

    def add(self, inp: torch.Tensor) -> None:
        """A batch of layer inputs (B, L, in); a 2-D input (tokens, in) counts as one window."""
        x = inp.detach()
        x = x.unsqueeze(0) if x.dim() == 2 else x.reshape(-1, x.shape[-2], x.shape[-1])
        flat = flatten_inputs(x, self.columns).reshape(x.shape[0], x.shape[1], self.columns)  # float32
        self.sq_sum += flat.square().sum(dim=(0, 1)).double().to(self.sq_sum.device)
        self.window_sum += flat.sum(dim=1).sum(dim=0).double().to(self.sq_sum.device)
        # Population variance within each window, as the reference (which feeds one window at a time).
        self.window_var += flat.var(dim=1, unbiased=False).sum(dim=0).double().to(self.sq_sum.device)
        self.windows += x.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean window sum, mean window variance, sum of squares), float32 vectors."""
        if self.windows == 0:
            raise RuntimeError("dsnot needs calibration inputs; none reached this layer")
        n = self.windows
        return (self.window_sum / n).float(), (self.window_var / n).float(), self.sq_sum.float()


@dataclass
class SwapResult:
    keep: torch.Tensor  # the new bool keep mask (out, in)
    error_before: torch.Tensor  # per-row reconstruction error e, before
    error_after: torch.Tensor  # and after
    swaps: int
    cycles: int


def _setup(w_dense, w_sparse, keep, window_sum, sq_norm):
    w_dense, w_sparse = w_dense.float(), w_sparse.float()
    mean = window_sum.to(w_dense.device, torch.float32).reshape(1, -1)
    grow = w_dense * mean  # regrowing j lowers e by this
    drop = w_sparse * keep * mean  # pruning kept j raises e by this
    error = ((w_dense - w_sparse * keep) * mean).sum(dim=1)
    wanda = w_sparse.abs() * sq_norm.to(w_dense.device, torch.float32).sqrt().reshape(1, -1)
    return grow, drop, error, wanda


def _regrow_order(grow, keep, var, direction, var_power, cycles):
    """Per row, the first ``cycles`` pruned weights whose regrowth moves e towards 0, best first; and their count."""
    rank = grow.abs() / var.to(grow.device, torch.float32).clamp_min(VAR_FLOOR).pow(var_power).reshape(1, -1)
    candidate = ~keep & (torch.sign(grow) == direction.unsqueeze(1))
    key = torch.where(candidate, -rank, torch.full_like(rank, float("inf")))
    order = torch.argsort(key, dim=1, stable=True)[:, :cycles]
    return order, candidate.sum(dim=1)


def dsnot_unstructured(
    w_dense: torch.Tensor,
    w_sparse: torch.Tensor,
    keep: torch.Tensor,
    window_sum: torch.Tensor,
    window_var: torch.Tensor,
    sq_norm: torch.Tensor,
    config: DSnoTConfig,
) -> SwapResult:
    """DSnoT's prune-and-grow on one (out, in) layer; pure (the inputs are not modified).

    Every swap regrows one weight and prunes one in the same row, so each row keeps its count of zeros.
    """
    keep = keep.clone().bool()
    grow, drop, error, wanda = _setup(w_dense, w_sparse, keep, window_sum, sq_norm)
    before = error.clone()
    direction = torch.sign(error)
    rows = torch.arange(keep.shape[0], device=keep.device)
    cycles = min(config.max_cycles, keep.shape[1])
    regrow, n_regrow = _regrow_order(grow, keep, window_var, direction, config.var_power, cycles)
    # Prune candidates: kept weights whose removal pushes e back towards 0 (opposite sign), lowest Wanda first.
    candidate = keep & (torch.sign(drop) == -direction.unsqueeze(1))
    prune = torch.argsort(torch.where(candidate, wanda, torch.full_like(wanda, float("inf"))), dim=1, stable=True)
    prune, n_prune = prune[:, :cycles], candidate.sum(dim=1)
    active = direction != 0
    swaps, cycle = 0, 0
    for cycle in range(cycles):
        r, p = regrow[:, cycle], prune[:, cycle]
        after = error - grow[rows, r] + drop[rows, p]
        active = active & (cycle < n_regrow) & (cycle < n_prune) & (error.abs() > config.threshold)
        active = active & (torch.sign(after) == direction)
        if not bool(active.any()):
            break
        hit = rows[active]
        keep[hit, r[active]] = True
        keep[hit, p[active]] = False
        error = torch.where(active, after, error)
        swaps += int(active.sum())
    return SwapResult(keep, before, error, swaps, cycle + 1)


def dsnot_nm(
    w_dense: torch.Tensor,
    w_sparse: torch.Tensor,
    keep: torch.Tensor,
    window_sum: torch.Tensor,
    window_var: torch.Tensor,
    sq_norm: torch.Tensor,
    config: DSnoTConfig,
    pattern: Pattern,
) -> SwapResult:
    """DSnoT for N:M masks: a weight regrown in a group of M replaces that group's lowest-Wanda kept weight.

    Pure. Every group keeps exactly its N kept weights; a weight regrown during the run is never pruned again.
    """
    check(pattern.structured, f"dsnot_nm needs an N:M pattern, got {pattern}")
    pattern.validate_width(keep.shape[1])
    keep = keep.clone().bool()
    grow, drop, error, wanda = _setup(w_dense, w_sparse, keep, window_sum, sq_norm)
    before = error.clone()
    direction = torch.sign(error)
    rows = torch.arange(keep.shape[0], device=keep.device)
    cycles = min(config.max_cycles, keep.shape[1])
    regrow, n_regrow = _regrow_order(grow, keep, window_var, direction, config.var_power, cycles)
    prunable = keep.clone()  # kept at the start and not pruned since: the only weights a swap may prune
    offsets = torch.arange(pattern.m, device=keep.device)
    active = direction != 0
    swaps, cycle = 0, 0
    for cycle in range(cycles):
        r = regrow[:, cycle]
        group = (r - r % pattern.m).unsqueeze(1) + offsets  # (rows, M) columns of r's group
        eligible = prunable.gather(1, group)
        scores = wanda.gather(1, group).masked_fill(~eligible, float("inf"))
        p = group[rows, scores.argmin(dim=1)]
        after = error - grow[rows, r] + drop[rows, p]
        active = active & (cycle < n_regrow) & eligible.any(dim=1) & (error.abs() > config.threshold)
        active = active & (torch.sign(after) == direction)
        if not bool(active.any()):
            break
        hit = rows[active]
        keep[hit, r[active]] = True
        keep[hit, p[active]] = False
        prunable[hit, p[active]] = False
        error = torch.where(active, after, error)
        swaps += int(active.sum())
    return SwapResult(keep, before, error, swaps, cycle + 1)


@torch.no_grad()
def dsnot_layer(
    layer: nn.Module,
    dense_layer: nn.Module,
    stats: ChannelStats,
    config: DSnoTConfig,
    pattern: Pattern,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Run DSnoT on ``layer`` in place (new mask; regrown weights from ``dense_layer``); return (mask, report)."""
    weight = weight_matrix(layer)
    dense = weight_matrix(dense_layer).to(weight.device)
    keep = (weight != 0) if keep is None else keep.to(weight.device).bool()
    window_sum, window_var, sq_norm = stats.finish()
    solve = dsnot_nm if pattern.structured else dsnot_unstructured
    extra = (pattern,) if pattern.structured else ()
    result = solve(dense, weight, keep, window_sum, window_var, sq_norm, config, *extra)
    new = torch.where(keep, weight, dense.to(weight.dtype))  # kept weights keep their value, regrown take the teacher's
    weight.copy_(new.masked_fill(~result.keep, 0))
    report = {
        "swaps": result.swaps,
        "cycles": result.cycles,
        "abs_error_before": float(result.error_before.abs().sum()),
        "abs_error_after": float(result.error_after.abs().sum()),
    }
    return result.keep, report


class DSnoTStep(BlockStep):
    """The walker step: statistics from the dense block (``ctx.teacher_block``) on the sparse inputs, then DSnoT
    on each chosen layer."""

    def __init__(self, config: DSnoTConfig, pattern: Pattern) -> None:
        self.config = config
        self.pattern = pattern

    def __call__(self, ctx: BlockContext) -> None:
        if ctx.teacher_block is None:
            raise RuntimeError("DSnoT needs the dense block; put a teacher step with keep_block before it")
        dense_layers = select_layers(prunable_layers(ctx.teacher_block), self.config.layers)
        layers = prunable_layers(ctx.block)
        stats = {name: ChannelStats(weight_matrix(layer).shape[1], ctx.device) for name, layer in dense_layers.items()}
        began = time.perf_counter()
        with layer_inputs(dense_layers, lambda name, x: stats[name].add(x)):
            ctx.run_all(block=ctx.teacher_block)
        report = {"block": ctx.index, "layers": {}}
        for name, dense_layer in dense_layers.items():
            keep, layer_report = dsnot_layer(layers[name], dense_layer, stats[name], self.config, self.pattern,
                                             ctx.masks.get(name))  # fmt: skip
            ctx.masks[name] = keep
            report["layers"][name] = layer_report
        report["time_s"] = time.perf_counter() - began
        ctx.report["dsnot"] = report
        swaps = sum(r["swaps"] for r in report["layers"].values())
        before = sum(r["abs_error_before"] for r in report["layers"].values())
        after = sum(r["abs_error_after"] for r in report["layers"].values())
        ctx.summary = f"{swaps} swaps, |error| {before:.4g} -> {after:.4g}"


class DSnoT(BlockwiseMethod):
    """DSnoT: training-free prune-and-grow of the masks, block by block, statistics from the dense block."""

    name = "dsnot"
    trains = False
    presets = PRESETS
    needs_teacher_block = True

    def supports(self, pattern: Pattern) -> str | None:
        return None  # unstructured and N:M (swaps stay inside each group)

    def check_model(self, model: nn.Module, config: DSnoTConfig) -> str | None:
        if not any(select_layers(prunable_layers(b), config.layers) for b in self.blocks_of(model)):
            return f"dsnot layers {config.layers!r} selects no layer of this {model.config.model_type} model"
        return None

    def block_steps(self, config: DSnoTConfig, pattern: Pattern) -> list[BlockStep]:
        return [DSnoTStep(config, pattern)]

    def summarize(self, config: DSnoTConfig, reports: list[dict], model: nn.Module) -> dict:
        blocks = [r["dsnot"] for r in reports if "dsnot" in r]
        layers = [layer for block in blocks for layer in block["layers"].values()]
        return {
            "config": config.to_dict(),
            "blocks": blocks,
            "swaps": sum(layer["swaps"] for layer in layers),
            "abs_error_before": sum(layer["abs_error_before"] for layer in layers),
            "abs_error_after": sum(layer["abs_error_after"] for layer in layers),
            "trainable_params": 0,
        }
