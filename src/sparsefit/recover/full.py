"""Full fine-tuning with the cross-entropy alone: every parameter trains, the masks stay.

The baseline SquareHead's paper measures against (plain CE fine-tuning of the sparse model, which it shows
failing at high sparsity), and the dense teacher's task tuning in SquareHead's recipe. Pruned weights get zero
gradients and are zeroed again after every step (:func:`~sparsefit.recover.training.fit_masked`), so a sparse model
ends with exactly its pruning's zeros; on a dense model that keeps only its own rare exact zeros. On task data the
loss covers the completion tokens; on calibration windows, every token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparsefit.recover.base import ModelMethod, RecoveryContext
from sparsefit.recover.training import TrainConfig, causal_lm_loss, fit_masked, loop_config, plan_steps
from sparsefit.walk.masks import model_masks, pruned_share


@dataclass
class FullConfig(TrainConfig):
    train_embeddings: bool = True  # False keeps the embeddings (and a tied output head) as they are

    def validate(self, name: str = "full", n_windows: int | None = None) -> None:
        loop_config(self).validate(name, n_windows)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, FullConfig] = {
    # The Hugging Face Trainer's usual fine-tuning setting: lr 5e-5 with a linear decay (3 % warm-up), AdamW
    # without weight decay, clipping at 1.0, one epoch in batches of 32 (micro-batches of 8).
    "gpu": FullConfig(lr=5e-5, batch_size=32, micro_batch=8, epochs=1, warmup=0.03),
    # Batches of 8 on a CPU, so a small task makes a few hundred steps.
    "cpu": FullConfig(lr=5e-5, batch_size=8, epochs=1, warmup=0.03),
}


class Full(ModelMethod):
    name = "full"
    trains = True
    presets = PRESETS

    def fit(self, ctx: RecoveryContext, config: FullConfig) -> dict:
        n_windows, seqlen = ctx.calib_ids.shape
        model = ctx.model
        masks = model_masks(model)
        steps = plan_steps(ctx.budget_tokens, n_windows, seqlen, config.batch_size, config.epochs)
        with ctx.progress(self.name, steps) as update:
            log, trainable = fit_masked(
                model, lambda ids: causal_lm_loss(model, ids), ctx.calib_ids, loop_config(config), masks,
                steps=steps, device=ctx.device, train_embeddings=config.train_embeddings, progress=update,
                checkpoint=ctx.fit_checkpoint,
            )  # fmt: skip
        return {
            "config": config.to_dict(),
            "sparsity": pruned_share(masks),
            "fit": log,
            "trainable_params": trainable,
        }
