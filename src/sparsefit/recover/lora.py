"""LoRA recovery baseline (Wanda's ``lora_ft``) through ``peft``: low-rank adapters trained with the causal LM loss.

Defaults as the reference: r 8, alpha 16, dropout 0.05 on ``q_proj``/``v_proj``, lr 1e-4, on calibration text.
Merging a LoRA update makes the adapted matrices dense, so at the end the method merges and **re-applies the
masks**: the model it leaves (and that gets saved) has exactly the pruning's zeros. The adapter's own (unmerged)
quality is measured before merging when the context has an ``evaluate`` callable (``model -> dict``;
``sparsefit compare`` passes its perplexity evaluation), and the report holds it under ``unmerged`` beside the
sparsity that merging without re-masking would have left. Deliberate differences from the reference: it trains
on C4 with fp16 autocast; sparsefit on the calibration windows in the model's dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

from torch import nn

from sparsefit.errors import UsageError, check
from sparsefit.models.adapters import is_prunable
from sparsefit.prune.report import sparsity_report
from sparsefit.recover.base import ModelMethod, RecoveryContext
from sparsefit.recover.training import (
    TrainConfig,
    causal_lm_loss,
    fit_model,
    loop_config,
    plan_steps,
)
from sparsefit.walk.masks import apply_masks, model_masks


@dataclass
class LoRAConfig(TrainConfig):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module names (suffixes), as peft's target_modules

    def validate(self, name: str = "lora", n_windows: int | None = None) -> None:
        check(isinstance(self.r, int) and self.r >= 1, f"lora r {self.r!r} must be an integer >= 1")
        check(self.alpha > 0, f"lora alpha {self.alpha} must be > 0")
        check(0 <= self.dropout < 1, f"lora dropout {self.dropout} must be in [0, 1)")
        names_ok = len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets)
        check(names_ok, f"lora targets {self.targets!r} must be a non-empty list of module names such as q_proj,v_proj")
        loop_config(self).validate(name, n_windows)

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


PRESETS: dict[str, LoRAConfig] = {
    # Wanda's lora_ft (finetune_lm.py): r 8, alpha 16, dropout 0.05, q/v, lr 1e-4, one epoch, a batch of 128
    # windows (it accumulates 128 steps of one; here micro-batches of 8), 5 warm-up steps, then the HF Trainer's
    # defaults: linear decay, AdamW betas (0.9, 0.999) without weight decay, gradient clipping at 1.0.
    "paper": LoRAConfig(lr=1e-4, batch_size=128, micro_batch=8, warmup_steps=5, epochs=1),
    # A CPU budget of a few thousand tokens: many small steps and a far larger rate. Measured on SmolLM2, Wanda
    # 70 %, wiki calibration 16 x 128, 32 steps of 2 windows (wiki ppl at 512 on 4 k tokens; dense 17.5, pruned
    # 792; merged and re-masked): lr 1e-4 -> 660, 1e-3 -> 241, 3e-3 -> 171, 1e-2 -> 163 (already overfitting the
    # windows: train loss 3.4); 3e-3 keeps a margin for other models.
    "cpu": LoRAConfig(lr=3e-3, batch_size=2, epochs=4),
}


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Qualified names of the linear layers whose last name part is one of ``targets``."""
    return [name for name, module in model.named_modules() if is_prunable(module) and name.split(".")[-1] in targets]


def split_names(options: dict, key: str, method: str, example: str) -> dict:
    """``"q_proj,v_proj"`` (a command line) or a list (a recipe) -> a tuple of names. Anything else (``-o
    targets=1`` reads as a number) is one UsageError line naming ``method``'s option, the value and, as
    ``example``, names it accepts."""
    value = options.get(key)
    if isinstance(value, str):
        options[key] = tuple(t.strip() for t in value.split(",") if t.strip())
    elif isinstance(value, (list, tuple)):
        options[key] = tuple(value)
    elif value is not None:
        raise UsageError(f"{method} option {key} {value!r} must be layer names such as {example} (names separated "
                         f"by commas, or a list)")  # fmt: skip
    return options


class LoRA(ModelMethod):
    name = "lora"
    trains = True
    presets = PRESETS

    def normalize(self, options: dict) -> dict:
        return split_names(options, "targets", self.name, "q_proj,v_proj")

    def check_model(self, model: nn.Module, config: LoRAConfig) -> str | None:
        """None when the configured targets exist in ``model``, else why not."""
        if not target_layers(model, config.targets):
            return (f"lora targets {', '.join(config.targets)} match no linear layer of this "
                    f"{model.config.model_type} model; set targets to its attention projections")  # fmt: skip
        return None

    def fit(self, ctx: RecoveryContext, config: LoRAConfig) -> dict:
        from peft import LoraConfig, get_peft_model

        n_windows, seqlen = ctx.calib_ids.shape
        model = ctx.model
        masks = model_masks(model)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        steps = plan_steps(ctx.budget_tokens, n_windows, seqlen, config.batch_size, config.epochs)
        peft_config = LoraConfig(
            r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(config.targets),
            bias="none", task_type="CAUSAL_LM",
        )  # fmt: skip
        # peft injects the adapters into ``model`` itself; merge_and_unload/unload hand the same object back.
        with warnings.catch_warnings():
            # peft calls a transformers API deprecated in transformers 5 (is_gradient_checkpointing): not ours to fix.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
            peft_model = get_peft_model(model, peft_config)
        merged = False
        report: dict = {"config": config.to_dict()}
        try:
            peft_model.to(ctx.device)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            report["trainable_params"] = sum(p.numel() for p in params)
            with ctx.progress(self.name, steps) as update:
                report["fit"] = fit_model(
                    peft_model, params, lambda ids: causal_lm_loss(peft_model, ids), ctx.calib_ids, config,
                    steps=steps, device=ctx.device, progress=update,
                )  # fmt: skip
            peft_model.eval()
            if ctx.evaluate is not None:
                # The adapter as trained (dense low-rank update beside the sparse weights), before merging.
                report["unmerged"] = ctx.evaluate(peft_model)
            peft_model.merge_and_unload()
            merged = True
        finally:
            if not merged:
                peft_model.unload()  # drop the adapters: the model is left as it came
            for param, flag in flags:
                param.requires_grad_(flag)
            model.to("cpu")
        if ctx.pattern.slim:  # a structured model has no mask: the merged update is kept whole
            report["saved"] = "merged (structured: no mask to re-apply)"
            return report
        report["sparsity_merged_unmasked"] = sparsity_report(model)["overall"]
        apply_masks(model, masks)
        report["sparsity_saved"] = sparsity_report(model)["overall"]
        report["saved"] = "merged, then re-masked"
        return report
