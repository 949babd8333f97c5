"""EBFT as a registered recovery method (two-step mode: on an existing sparse model with its masks)."""

from __future__ import annotations

import math
from dataclasses import replace

from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix
from sparsefit.pipeline.recover_model import recover_model
from sparsefit.recover.base import RecoveryContext, RecoveryMethod
from sparsefit.recover.ebft import EBFTStep, preset


class EBFT(RecoveryMethod):
    name = "ebft"
    trains = True

    def run(self, ctx: RecoveryContext) -> dict:
        options = dict(ctx.options)
        config = preset(options.pop("preset", "cpu"), seed=ctx.seed, **options)
        n, seqlen = ctx.calib_ids.shape
        if ctx.budget_tokens is not None:
            # A token budget counts forward passes over training tokens, per block: epochs follow from it.
            config = replace(config, epochs=max(1, math.ceil(ctx.budget_tokens / ((n - config.heldout) * seqlen))))
        config.validate(n)
        fits = []
        step = EBFTStep(config, on_fit=lambda index, fit: fits.append({"block": index, **fit.to_dict()}))
        recover_model(
            ctx.model, ctx.teacher, ctx.calib_ids, [step], target=config.target, device=ctx.device,
            batch_size=ctx.batch_size,
        )  # fmt: skip
        blocks = get_adapter(ctx.model).get_blocks(ctx.model)
        # What EBFT trains: every kept (nonzero) linear weight, plus the norm weights when they train.
        trainable = sum(
            int((weight_matrix(layer) != 0).sum()) for block in blocks for layer in prunable_layers(block).values()
        )
        if config.train_norms:
            trainable += sum(
                p.numel() for block in blocks for m in block.modules() if "norm" in type(m).__name__.lower()
                for p in m.parameters(recurse=False)
            )  # fmt: skip
        return {"config": config.to_dict(), "blocks": fits, "trainable_params": trainable}
