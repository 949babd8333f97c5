"""DSnoT (Zhang et al., arXiv 2310.08915): training-free prune-and-grow of a sparse model's masks.

As the official code runs it (``main.py``'s defaults; ``lib/prune.py``, ``prune_DSnoT``; ``lib/layerwrapper.py``),
per layer and output row:

* statistics per input channel j from the calibration inputs: ``sum_j`` (the sum of x_j over a window, averaged
  over windows: the reference's ``sum_metric_row``), ``var_j`` (the variance of x_j within a window, averaged over
  windows) and ``||x_j||^2`` (Wanda's norm);
* the row's reconstruction error is ``e = sum over pruned j of W_j * sum_j``: the expected difference between the
  dense and the sparse output;
* two lists, made once, each read from both ends: the regrowing list, every weight by ``W_j sum_j / var_j^p`` (signed,
  the kept ones at 0), and the pruning list, the kept weights by Wanda score ``|W_j| ||x_j||`` with those of
  ``W_j sum_j < 0`` first (lowest score first) and those of ``W_j sum_j > 0`` last (lowest score last);
* each cycle, while ``|e| > threshold``: for ``e > 0`` regrow the next weight from the back of the regrowing list
  (the largest positive ratio) and prune the next from the front of the pruning list, for ``e < 0`` the other two
  ends; ``e`` moves by both. A row goes on when ``e`` changes sign, from the other ends, until ``|e| <= threshold``
  or ``max_cycles`` cycles: the reference's ``--without_same_sign`` is declared ``type=bool, default=True``, so it
  is on unless given an empty string;
* N:M: the regrown weight comes from the same list; the weight pruned is the lowest-Wanda weight of its group of M
  among those kept at the start and not pruned since (so a regrown weight is never pruned again), and a row stops at
  its first swap that would change the sign of ``e``: the reference's N:M loop always checks the sign;
* no weight value changes: a regrown weight takes the dense teacher's value, a kept one keeps its own.

``DSnoTConfig.same_sign`` None (the default) runs each loop as the reference does; True stops a row at the first swap
that would change the sign of ``e`` in both (the reference's unstructured loop with ``without_same_sign`` off, and
sparsefit's DSnoT before issue 9); False lets N:M rows go on through sign changes too.

Deliberate differences from the reference:

* a row stops at its first swap that would not be one: regrowing a weight that is kept, pruning one that is pruned,
  reading past either end of a list, or (N:M) a group with no weight left to prune. The reference does not check:
  when a row reads past the weights of the right sign in the regrowing list (a narrow layer, many cycles one way),
  its two pruning pointers cross, or (N:M) a group runs out, it prunes without regrowing or the other way round and
  the layer's sparsity changes. Up to there both lists are read as the reference reads them, kept weights of zero
  contribution included (``_regrowing_ends``, ``_pruning_ends``, the ``real`` test in each loop);
* when the kept weights differ from the teacher's (SparseGPT with its weight update, or after EBFT), a weight's
  contribution ``c_j = v_j sum_j`` uses the value it has when kept (its own if kept, the teacher's if pruned) and
  ``e = sum_j (W_dense - W_sparse)_j sum_j`` counts the kept weights' difference too; both equal the reference's
  when the kept weights are the teacher's (``_contributions``). Wanda scores are of the kept values;
* N:M prunes the lowest Wanda score of the group whatever pruned the layer; the reference uses its initial pruner's
  score (the same when the masks came from Wanda);
* a channel of zero variance is ranked as if its variance were ``VAR_FLOOR``; the reference divides by 0.

Statistics come from the dense block (the teacher's) run on the sparse model's own block inputs, the pass in
which the reference collects them together with Wanda's. The threshold is in the reference's unit (sums over a
window), so it is looser at shorter windows than the reference's 2048 tokens. Attention layers only by default,
as the reference (``skip_layer mlp``). Works through the adapters for every architecture.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsefit.distributed import active, all_reduce_sum
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
    """The official defaults: 50 cycles, threshold 0.1, variance power 1, attention layers only, its sign rules."""

    max_cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0
    layers: str = "attn"  # attn (the reference's default), mlp, or all
    # Stop a row at its first swap that would change the sign of its error. None: as the reference, off for
    # unstructured masks (its --without_same_sign is always on) and on for N:M (its N:M loop always checks).
    same_sign: bool | None = None

    def validate(self, name: str = "dsnot", n_windows: int | None = None) -> None:
        check(
            isinstance(self.max_cycles, int) and self.max_cycles >= 1,
            f"dsnot max cycles {self.max_cycles!r} must be an integer >= 1",
        )
        check(self.threshold >= 0, f"dsnot threshold {self.threshold} must be >= 0")
        check(self.var_power >= 0, f"dsnot variance power {self.var_power} must be >= 0")
        check(self.layers in LAYER_SETS, f"dsnot layers {self.layers!r} is not one of {', '.join(LAYER_SETS)}")
        check(
            self.same_sign is None or isinstance(self.same_sign, bool),
            f"dsnot same_sign {self.same_sign!r} must be true, false or unset",
        )

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

    def reduce(self) -> None:
        """Sum over the ranks (under torchrun each holds some of the windows)."""
        if active():
            windows = torch.tensor([float(self.windows)], dtype=torch.float64, device=self.sq_sum.device)
            all_reduce_sum(self.sq_sum, self.window_sum, self.window_var, windows)
            self.windows = int(windows.item())

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean window sum, mean window variance, sum of squares), float32 vectors."""
        if self.windows == 0:
            raise RuntimeError("dsnot needs calibration inputs; none reached this layer")
        n = self.windows
        return (self.window_sum / n).float(), (self.window_var / n).float(), self.sq_sum.float()


def _contributions(w_dense, w_sparse, keep, window_sum, sq_norm):
    """(c, e, wanda): ``c_j = v_j sum_j`` with ``v_j`` the value weight j has when kept (its own if kept, the
    teacher's if pruned), so regrowing j lowers e by c_j and pruning it raises e by c_j; the error per row; Wanda
    scores of the values."""
    w_dense, w_sparse = w_dense.float(), w_sparse.float()
    mean = window_sum.to(w_dense.device, torch.float32).reshape(1, -1)
    value = torch.where(keep, w_sparse, w_dense)
    error = ((w_dense - w_sparse * keep) * mean).sum(dim=1)
    wanda = value.abs() * sq_norm.to(w_dense.device, torch.float32).sqrt().reshape(1, -1)
    return value * mean, error, wanda


def _regrowing_ends(contrib, keep, var, var_power, depth):
    """The reference's regrowing list, every column by ``c_j / var_j^p`` with the kept ones at 0 (stable sort), read
    from the front (most negative first: for e <= 0) and from the back (most positive first: for e > 0).

    (rows, 2, depth) columns: ``[:, 0]`` the front's first ``depth``, ``[:, 1]`` the back's.
    """
    scale = var.to(contrib.device, torch.float32).clamp_min(VAR_FLOOR).pow(var_power).reshape(1, -1)
    order = torch.argsort((contrib / scale).masked_fill(keep, 0), dim=1, stable=True)
    return torch.stack([order[:, :depth], order.flip(1)[:, :depth]], dim=1)


def _pruning_ends(contrib, keep, wanda, depth):
    """The reference's pruning list, read from the front (for e >= 0) and from the back (for e < 0); and its length.

    The list holds the kept weights of the row, by Wanda score, lowest first (stable), reordered: those with
    ``c_j < 0`` first in that order, those with ``c_j > 0`` last in reverse order, so each end starts at its sign's
    lowest score. Kept weights with ``c_j == 0`` lie in between, as copies of the row's lowest-score kept weight: what
    the reference's reordering (``return_reorder_indice``) makes of them. Returns (rows, 2, depth) columns (``[:, 0]``
    the front's first ``depth``, ``[:, 1]`` the back's) and the number of kept weights per row.
    """
    rows, cols = keep.shape
    by_score = torch.argsort(wanda.masked_fill(~keep, float("inf")), dim=1, stable=True)
    n_kept = keep.sum(dim=1, keepdim=True)
    slot = torch.arange(cols, device=keep.device).expand(rows, cols)
    listed = slot < n_kept
    c = contrib.gather(1, by_score)
    negative, positive = listed & (c < 0), listed & (c > 0)
    n_neg, n_pos = negative.sum(dim=1, keepdim=True), positive.sum(dim=1, keepdim=True)
    neg_slots = torch.argsort(torch.where(negative, slot, cols), dim=1, stable=True)  # negatives' slots, in order
    pos_slots = torch.argsort(torch.where(positive, slot, cols), dim=1, stable=True)

    def entry(i):  # list entry i (rows, depth) -> column; garbage where i is outside [0, n_kept)
        from_end = n_kept - 1 - i
        source = torch.where(
            i < n_neg,
            neg_slots.gather(1, i.clamp(0, cols - 1)),
            torch.where(from_end < n_pos, pos_slots.gather(1, from_end.clamp(0, cols - 1)), torch.zeros_like(i)),
        )
        return by_score.gather(1, source)

    step = torch.arange(depth, device=keep.device).expand(rows, depth)
    return torch.stack([entry(step), entry(n_kept - 1 - step)], dim=1), n_kept.squeeze(1)


def _read(ends, pointers, end, rows):
    """Per row, the entry of list end ``end`` at that end's pointer; and the pointer."""
    at = pointers[rows, end]
    return ends[rows, end, at.clamp_max(ends.shape[2] - 1)], at


@dataclass
class SwapResult:
    keep: torch.Tensor  # the new bool keep mask (out, in)
    error_before: torch.Tensor  # per-row reconstruction error e, before
    error_after: torch.Tensor  # and after
    swaps: int
    cycles: int


def dsnot_unstructured(
    w_dense: torch.Tensor,
    w_sparse: torch.Tensor,
    keep: torch.Tensor,
    window_sum: torch.Tensor,
    window_var: torch.Tensor,
    sq_norm: torch.Tensor,
    config: DSnoTConfig,
) -> SwapResult:
    """DSnoT's prune-and-grow on one (out, in) layer, all rows at once; pure (the inputs are not modified).

    Rows go on through sign changes of their error unless ``config.same_sign``. Every swap regrows one weight and
    prunes one in the same row, so each row keeps its count of zeros.
    """
    keep = keep.clone().bool()
    contrib, error, wanda = _contributions(w_dense, w_sparse, keep, window_sum, sq_norm)
    before = error.clone()
    initial_sign = torch.sign(error)
    rows = torch.arange(keep.shape[0], device=keep.device)
    depth = min(config.max_cycles, keep.shape[1])
    regrowing = _regrowing_ends(contrib, keep, window_var, config.var_power, depth)
    pruning, n_kept = _pruning_ends(contrib, keep, wanda, depth)
    regrow_at = torch.zeros(keep.shape[0], 2, dtype=torch.long, device=keep.device)  # next entry, per list end
    prune_at = torch.zeros_like(regrow_at)
    live = torch.ones_like(error, dtype=torch.bool)
    swaps, cycles = 0, 0
    for _ in range(config.max_cycles):
        cycles += 1
        regrow_end, prune_end = (error > 0).long(), (error < 0).long()
        r, r_at = _read(regrowing, regrow_at, regrow_end, rows)
        p, p_at = _read(pruning, prune_at, prune_end, rows)
        after = error + contrib[rows, p] - contrib[rows, r]
        live = live & (error.abs() > config.threshold)
        if config.same_sign:
            live = live & (torch.sign(after) == initial_sign)
        real = (r_at < depth) & (p_at < torch.clamp_max(n_kept, depth)) & ~keep[rows, r] & keep[rows, p]
        live = live & real
        if not bool(live.any()):
            break
        hit = rows[live]
        keep[hit, r[live]] = True
        keep[hit, p[live]] = False
        error = torch.where(live, after, error)
        regrow_at[rows, regrow_end] += live
        prune_at[rows, prune_end] += live
        swaps += int(live.sum())
    return SwapResult(keep, before, error, swaps, cycles)


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

    Pure. Rows stop at their first sign change of the error unless ``config.same_sign is False``. Every group keeps
    exactly its N kept weights; a weight regrown during the run is never pruned again.
    """
    check(pattern.structured, f"dsnot_nm needs an N:M pattern, got {pattern}")
    pattern.validate_width(keep.shape[1])
    keep = keep.clone().bool()
    contrib, error, wanda = _contributions(w_dense, w_sparse, keep, window_sum, sq_norm)
    before = error.clone()
    initial_sign = torch.sign(error)
    same_sign = config.same_sign is not False
    rows = torch.arange(keep.shape[0], device=keep.device)
    depth = min(config.max_cycles, keep.shape[1])
    regrowing = _regrowing_ends(contrib, keep, window_var, config.var_power, depth)
    regrow_at = torch.zeros(keep.shape[0], 2, dtype=torch.long, device=keep.device)
    prunable = keep.clone()  # kept at the start and not pruned since: the only weights a swap may prune
    offsets = torch.arange(pattern.m, device=keep.device)
    live = torch.ones_like(error, dtype=torch.bool)
    swaps, cycles = 0, 0
    for _ in range(config.max_cycles):
        cycles += 1
        regrow_end = (error > 0).long()
        r, r_at = _read(regrowing, regrow_at, regrow_end, rows)
        group = (r - r % pattern.m).unsqueeze(1) + offsets  # (rows, M) columns of r's group
        eligible = prunable.gather(1, group)
        scores = wanda.gather(1, group).masked_fill(~eligible, float("inf"))
        p = group[rows, scores.argmin(dim=1)]
        after = error + contrib[rows, p] - contrib[rows, r]
        live = live & (error.abs() > config.threshold)
        if same_sign:
            live = live & (torch.sign(after) == initial_sign)
        real = (r_at < depth) & ~keep[rows, r] & eligible.any(dim=1)
        live = live & real
        if not bool(live.any()):
            break
        hit = rows[live]
        keep[hit, r[live]] = True
        keep[hit, p[live]] = False
        prunable[hit, p[live]] = False
        error = torch.where(live, after, error)
        regrow_at[rows, regrow_end] += live
        swaps += int(live.sum())
    return SwapResult(keep, before, error, swaps, cycles)


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
        for channel_stats in stats.values():
            channel_stats.reduce()
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

    def needs_teacher_block(self, config) -> bool:
        return True

    def supports(self, pattern: Pattern) -> str | None:
        if pattern.slim:
            return "dsnot swaps pruned and kept weights under a mask; a structured model has no mask (use ebft or lora)"
        return None  # unstructured and N:M (swaps stay inside each group)

    def check_model(self, model: nn.Module, config: DSnoTConfig) -> str | None:
        if not any(select_layers(prunable_layers(b), config.layers) for b in self.blocks_of(model)):
            return f"dsnot layers {config.layers!r} selects no layer of this {model.config.model_type} model"
        return None

    def block_steps(self, config: DSnoTConfig, pattern: Pattern) -> list[BlockStep]:
        return [DSnoTStep(config, pattern)]

    def summarize(self, config: DSnoTConfig, reports: list[dict], blocks: Iterable[nn.Module]) -> dict:
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
