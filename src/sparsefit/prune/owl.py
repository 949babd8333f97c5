"""OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity", arXiv 2310.05175): a sparsity per decoder block.

A block whose Wanda scores hold more outliers (entries above ``M`` times the block's mean score) keeps more of its
weights. The reference (github.com/luuyin/OWL, ``lib/prune_all.py``, ``prune_wanda_outlier``) does this in two walks:

1. a pre-pass over the *dense* model, propagating the dense blocks' own outputs (nothing is pruned yet), that pools
   the Wanda metric ``|W| * sqrt(scaler_row)`` of every linear layer of a block and takes its outlier ratio
   ``LOD = 100 * #(metric > M * mean(metric)) / numel`` (``check_outlier_mean``);
2. ``all_layer_ratio = (LOD - min) / (max - min) * 2λ``, then ``all_layer_ratio - mean + (1 - S)``: a density
   per block, spread over 2λ, whose mean is the target density; each block is pruned to ``1 - density``.

Here step 1 is :class:`OutlierStep` run through the one block driver, and step 2 is :func:`owl_sparsities`; the
pruning walk then hands each block its own sparsity (``PruneStep``). Deliberate differences from the reference:

* the paper states each sparsity lies in [S - λ, S + λ]; the reference's code (which we follow) spreads them over
  a 2λ-wide range shifted so that their mean is S, so a skewed set of ratios can put a block up to 2λ from S;
* where the reference silently clamps a block sparsity <= 0 to 0.01 (and never checks >= 1), which breaks the
  mean, we refuse with a one-line error naming the block (:func:`check_block_sparsities`);
* when every block has the same outlier ratio the reference divides by zero (NaN sparsities); we return the
  uniform sparsity;
* each layer's squared input norms are averaged per token before scoring (the reference averages per calibration
  window; the two differ by one constant for all layers of a block, which the ratio ignores), and the pooled mean
  is taken in float64 over the layers one at a time instead of a float32 mean of their concatenation (so no copy of
  the block's scores is ever held);
* N:M patterns are refused: the reference's ``wanda_owl_structure`` gives every block its own N (λ counted in
  weights per group, rounded), and a model with a different N:M per block fits none of sparsefit's single-pattern
  checks, reports, exports and recovery methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.adapters import prunable_layers, weight_matrix
from sparsefit.progress import Bar, silent
from sparsefit.prune.wanda import WandaPruner, wanda_scores
from sparsefit.walk.driver import run_blocks
from sparsefit.walk.hooks import layer_inputs
from sparsefit.walk.walker import BlockContext, BlockStep

# The reference README's commands use M = 5 and λ = 0.08 (LLaMA-7B, 70 %); its main.py defaults are
# --Hyper_m 3 and --Lamda 0.08. The paper's headline setting is M = 5, so that is our default.
DEFAULT_M = 5.0
TYPICAL_LAMBDA = 0.08


def outlier_ratio(metric: torch.Tensor, m: float) -> float:
    """The layerwise outlier distribution (LOD) of ``metric``: 100 × the share of entries above ``m`` × its mean.

    The reference's ``check_outlier_mean`` on one tensor (a percentage, strict ``>``).
    """
    threshold = metric.float().mean() * m
    return float((metric > threshold).sum().item()) / metric.numel() * 100


def pooled_outlier_ratio(metrics: Callable[[], Iterable[torch.Tensor]], m: float) -> float:
    """:func:`outlier_ratio` of the concatenation of the tensors ``metrics()`` yields, without concatenating them.

    ``metrics`` is called twice (once for the mean, once for the count) and should make each tensor on the fly,
    so only one layer's scores exist at a time.
    """
    total, count = 0.0, 0
    for metric in metrics():
        total += float(metric.double().sum())
        count += metric.numel()
    if count == 0:
        raise ValueError("no scores to take an outlier ratio of")
    threshold = total / count * m
    above = sum(int((metric > threshold).sum()) for metric in metrics())
    return above / count * 100


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios ``ratios`` (LOD), the target ``sparsity`` S and λ.

    The reference's lines, in its names: ``all_layer_ratio = (D - D.min()) / (D.max() - D.min()) * λ * 2``, then
    ``all_layer_ratio - mean(all_layer_ratio) + (1 - S)`` (densities), and ``1 - density`` per block. The result
    spans exactly 2λ and averages to S. λ = 0, or ratios that are all equal, give S for every block.
    """
    all_layer_ratio = np.asarray(ratios, dtype=np.float64)
    if all_layer_ratio.size == 0:
        return []
    spread = all_layer_ratio.max() - all_layer_ratio.min()
    if lam == 0 or spread == 0:  # the reference divides by zero here; uniform is the only sensible answer
        return [float(sparsity)] * all_layer_ratio.size
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (1 / spread * lam * 2)
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity)
    return [float(1 - density) for density in all_layer_ratio]


def check_block_sparsities(sparsities: Sequence[float], lam: float) -> None:
    """One-line UsageError when some block's sparsity left [0, 1): λ is too large for these ratios."""
    for index, value in enumerate(sparsities):
        if not 0.0 <= value < 1.0:
            raise UsageError(
                f"OWL λ={lam:g} gives block {index} a sparsity of {value:.4f}, outside [0, 1); "
                f"use a smaller --owl-lambda"
            )


@dataclass
class OutlierStep(BlockStep):
    """The pre-pass step: Wanda statistics of every linear layer of a block, pooled into one outlier ratio.

    Prunes nothing; the walker propagates the dense block's outputs, as the reference's pre-pass does. Only the
    per-layer squared input norms (one vector each) live until the block's ratio is taken; no scores are kept.
    """

    m: float = DEFAULT_M
    ratios: dict[int, float] = field(default_factory=dict)

    def __call__(self, ctx: BlockContext) -> None:
        layers = prunable_layers(ctx.block)
        stats = {name: WandaPruner(layer) for name, layer in layers.items()}
        with layer_inputs(layers, lambda name, inp: stats[name].add_batch(inp)):
            ctx.run_all()
        for pruner in stats.values():  # under torchrun: every rank's windows
            pruner.reduce()

        def metrics() -> Iterable[torch.Tensor]:
            for name, layer in layers.items():
                pruner = stats[name]
                yield wanda_scores(weight_matrix(layer), pruner.sq_norms / max(pruner.tokens, 1))

        ratio = pooled_outlier_ratio(metrics, self.m)
        for pruner in stats.values():
            pruner.free()
        self.ratios[ctx.index] = ratio
        ctx.report["outlier_ratio"] = ratio
        ctx.summary = f"outlier ratio {ratio:.3f}%"
        ctx.note(ctx.summary)


def collect_outlier_ratios(
    model: nn.Module,
    calib_ids: torch.Tensor,
    m: float = DEFAULT_M,
    *,
    device: torch.device,
    batch_size: int = 8,
    progress: Bar = silent,
    source=None,
    activations=None,
) -> list[float]:
    """The outlier ratio (LOD, %) of every decoder block of the dense ``model``, in block order; weights unchanged."""
    step = OutlierStep(m=m)
    # No checkpoint: on the streamed path this walk reads the blocks and stores nothing.
    run_blocks(model, calib_ids, [step], device=device, batch_size=batch_size, progress=progress,
               label=f"owl outlier ratios (M={m:g})", source=source, activations=activations)  # fmt: skip
    return [step.ratios[index] for index in sorted(step.ratios)]


__all__ = [
    "DEFAULT_M",
    "TYPICAL_LAMBDA",
    "OutlierStep",
    "check_block_sparsities",
    "collect_outlier_ratios",
    "outlier_ratio",
    "owl_sparsities",
    "pooled_outlier_ratio",
]
