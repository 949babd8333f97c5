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

import json
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsefit.errors import UsageError, check
from sparsefit.models.adapters import is_prunable, weight_matrix
from sparsefit.prune.report import sparsity_report
from sparsefit.recover.base import ModelMethod, RecoveryContext, read_adapter_file
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


LORA_FORMAT = "sparsefit-lora-1"  # the adapter file's metadata "format"
LORA_FILE = "lora_adapter.safetensors"


class LoRAAdapter:
    """A trained LoRA update apart from its base: each adapted layer's factors ``A`` (r, in) and ``B`` (out, r) and
    its scaling. ``fuse`` writes ``W + (B @ A) * scaling`` (peft's merge, the same operations in the same order)
    with the base's zeros kept, ``unfuse`` restores the base's exact values; switching adapters reloads nothing."""

    def __init__(self, layers: dict[str, nn.Module], factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                 keep_masks: bool = True) -> None:  # fmt: skip
        self.layers, self.factors, self.keep_masks = layers, factors, keep_masks
        self.originals = {name: weight_matrix(layer).detach().clone() for name, layer in layers.items()}
        self.fused = False

    @torch.no_grad()
    def fuse(self) -> None:
        if self.fused:
            return
        for name, layer in self.layers.items():
            a, b, scaling = self.factors[name]
            original = self.originals[name]
            merged = original + (b.to(original) @ a.to(original)) * scaling
            if self.keep_masks:  # masked_fill, as apply_masks re-masks a merged LoRA
                merged = merged.masked_fill(original == 0, 0)
            weight_matrix(layer).copy_(merged)
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        if not self.fused:
            return
        for name, layer in self.layers.items():
            weight_matrix(layer).copy_(self.originals[name])
        self.fused = False

    def remove(self) -> None:
        """Nothing is attached to the model while unfused (kept for the same interface as S²FT's adapter)."""

    def to_bytes(self) -> bytes:
        return adapter_bytes(self.factors, self.keep_masks)

    @classmethod
    def load(cls, model: nn.Module, path) -> LoRAAdapter:
        where = str(path)
        meta, tensors = read_adapter_file(path, "lora", LORA_FORMAT)
        layers, factors = {}, {}
        for name, scaling in json.loads(meta["scaling"]).items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise UsageError(f"lora adapter {where!r} names layer {name!r}, which this model lacks") from None
            a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
            if (b.shape[0], a.shape[1]) != tuple(weight_matrix(layer).shape):
                raise UsageError(f"lora adapter {where!r} does not fit layer {name!r} of this model")
            layers[name], factors[name] = layer, (a, b, float(scaling))
        return cls(layers, factors, json.loads(meta.get("keep_masks", "true")))


def adapter_bytes(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], keep_masks: bool) -> bytes:
    """The adapter file (safetensors) of ``factors``: each layer's A and B, the scalings in the metadata."""
    from safetensors.torch import save

    tensors = {}
    for name, (a, b, _) in factors.items():
        tensors[f"{name}.lora_A"] = a.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = b.detach().cpu().contiguous()
    scalings = {name: scaling for name, (_, _, scaling) in factors.items()}
    return save(tensors, metadata={"format": LORA_FORMAT, "scaling": json.dumps(scalings),
                                   "keep_masks": json.dumps(keep_masks)})  # fmt: skip


def lora_factors(peft_model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each adapted layer's (A, B, scaling) by the base model's layer name, read off a peft model."""
    factors = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            base_name = name.removeprefix("base_model.model.")
            factors[base_name] = (module.lora_A["default"].weight.detach().clone(),
                                  module.lora_B["default"].weight.detach().clone(), float(module.scaling["default"]))
    return factors


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
    writes = (LORA_FILE,)

    def artifacts(self, report: dict) -> dict[str, bytes]:
        return {LORA_FILE: report["adapter_file"]} if "adapter_file" in report else {}

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
            # peft draws A's initial values from the global generator: seeded, so a run does not depend on what
            # ran before it in the process (the global state is restored afterwards).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
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
                    steps=steps, device=ctx.device, progress=update, checkpoint=ctx.fit_checkpoint,
                )  # fmt: skip
            peft_model.eval()
            if ctx.evaluate is not None:
                # The adapter as trained (dense low-rank update beside the sparse weights), before merging.
                report["unmerged"] = ctx.evaluate(peft_model)
            factors = lora_factors(peft_model)
            peft_model.merge_and_unload()
            merged = True
        finally:
            if not merged:
                peft_model.unload()  # drop the adapters: the model is left as it came
            for param, flag in flags:
                param.requires_grad_(flag)
            model.to("cpu")
        # The adapter apart from the model: written beside the merged model, or alone (--adapter-only).
        report["adapter_file"] = adapter_bytes(factors, keep_masks=not ctx.pattern.slim)
        if ctx.pattern.slim:  # a structured model has no mask: the merged update is kept whole
            report["saved"] = "merged (structured: no mask to re-apply)"
            return report
        report["sparsity_merged_unmasked"] = sparsity_report(model)["overall"]
        apply_masks(model, masks)
        report["sparsity_saved"] = sparsity_report(model)["overall"]
        report["saved"] = "merged, then re-masked"
        return report
