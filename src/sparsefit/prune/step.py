"""The pruning step of the walker: collect each layer's input statistics, keep the dense outputs, prune."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sparsefit.models.adapters import prunable_layers
from sparsefit.prune.pattern import Pattern
from sparsefit.prune.registry import make_pruner
from sparsefit.walk.hooks import layer_inputs
from sparsefit.walk.walker import BlockContext, BlockStep


@dataclass
class PruneStep(BlockStep):
    """Prune every linear layer of a block with ``method`` from one statistics pass over its inputs.

    The same pass yields the dense block's outputs on the (sparse model's) inputs: the target a
    recovery step such as EBFT reconstructs. ``sparsity`` is one value for every block, or one per block (OWL);
    a per-block value is recorded in the block's report.
    """

    method: str
    sparsity: float | Sequence[float]
    pattern: Pattern
    options: dict = field(default_factory=dict)
    keep_dense_outputs: bool = False

    def __call__(self, ctx: BlockContext) -> None:
        layers = prunable_layers(ctx.block)
        pruners = {name: make_pruner(self.method, layer, **self.options) for name, layer in layers.items()}
        collecting = any(p.needs_calibration for p in pruners.values())
        if collecting or self.keep_dense_outputs:

            def add(name, inp):
                if pruners[name].needs_calibration:
                    pruners[name].add_batch(inp)

            with layer_inputs(layers, add):
                dense = ctx.run_all()
            for pruner in pruners.values():  # under torchrun: every rank's windows, before any mask is chosen
                if pruner.needs_calibration:
                    pruner.reduce()
            if self.keep_dense_outputs:
                ctx.dense_outputs = dense
        sparsity = self.sparsity
        if isinstance(sparsity, Sequence):
            sparsity = sparsity[ctx.index]
            ctx.report["sparsity"] = sparsity
        for name, pruner in pruners.items():
            ctx.masks[name] = pruner.prune(sparsity, self.pattern)
            pruner.free()
        ctx.report["pruned_layers"] = len(pruners)
        ctx.note(f"pruned {len(pruners)} layers")
