"""EBFT: block-wise reconstruction fine-tuning of a pruned block by backprop, masks fixed.

As the official code runs it (``lib/prune_ft.py`` + ``lib/finetune.py``): for each block, the
inputs are the sparse model's own activations and the target is the dense block on those same
inputs (computed before the block is pruned); the loss is ``MSE(block(X), target)`` (mean); every
linear weight under its mask and the block's norm weights are trained with AdamW, gradient
clipping and a linear schedule without warm-up.

Masks stay fixed exactly: a gradient hook multiplies each weight's gradient by its boolean mask
(one byte per weight, not a float copy of the weights). Pruned weights start at zero and get zero
gradient, and AdamW's update and decoupled weight decay of a zero with zero moments are zero, so
they stay exactly zero; the mask is applied once more at the end, as the reference does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from sparsefit.errors import check
from sparsefit.models.adapters import prunable_layers, weight_matrix
from sparsefit.recover.base import BlockwiseMethod
from sparsefit.recover.report import ebft_markdown, ebft_plot_png
from sparsefit.recover.training import FitConfig, train_loop
from sparsefit.walk.masks import block_masks, mask_gradients
from sparsefit.walk.targets import TARGETS
from sparsefit.walk.walker import BlockContext, BlockStep

AUTOCAST = ("auto", "none", "bf16")


@dataclass
class EBFTConfig(FitConfig):
    """Hyper-parameters; the defaults are the official code's (README lr, not the code's 0.01)."""

    lr: float = 2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    epochs: int = 10
    batch_size: int = 8
    train_norms: bool = True
    target: str = "sparse-path"
    autocast: str = "auto"  # auto: bf16 autocast on CUDA, float32 elsewhere; or "none", "bf16"

    def validate(self, name: str = "ebft", n_windows: int | None = None) -> None:
        super().validate(name, n_windows)
        check(self.target in TARGETS, f"{name} target {self.target!r} is not one of {', '.join(TARGETS)}")
        check(self.autocast in AUTOCAST, f"{name} autocast {self.autocast!r}: use {', '.join(AUTOCAST)}")


PRESETS: dict[str, EBFTConfig] = {
    # The official code's setting (256 x 1024 calibration windows, 10 epochs, batch 8).
    "paper": EBFTConfig(),
    # Two CPU cores: far fewer tokens, so many more steps per token and a larger learning rate; the
    # official setting barely moves AdamW in 8 steps per block (DESIGN.md, measured). See README.
    "cpu": EBFTConfig(lr=1e-3, epochs=4, batch_size=2, heldout=2),
}


def _trainable(block: nn.Module, masks: dict[str, torch.Tensor], train_norms: bool):
    """Freeze everything, then unfreeze the masked linear weights (and biases) and, optionally, norms."""
    layers = prunable_layers(block)
    params: list[nn.Parameter] = []
    for param in block.parameters():
        param.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
        params.append(layer.weight)
        if getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(True)
            params.append(layer.bias)
    hooks = mask_gradients(layers, masks)
    if train_norms:
        linear_params = {id(p) for layer in layers.values() for p in layer.parameters()}
        for module in block.modules():
            if "norm" in type(module).__name__.lower() or isinstance(module, nn.LayerNorm):
                for param in module.parameters(recurse=False):
                    if id(param) not in linear_params:
                        param.requires_grad_(True)
                        params.append(param)
    return params, hooks, layers


@torch.no_grad()
def _mse(forward: Callable, inputs: torch.Tensor, targets: torch.Tensor, batch: int, device, dtype, ctx) -> float:
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch):
        x = inputs[start : start + batch].to(device, dtype)
        y = targets[start : start + batch].to(device, torch.float32)
        with ctx():
            out = forward(x)
        total += torch.nn.functional.mse_loss(out.float(), y, reduction="sum").item()
        count += y.numel()
    return total / max(count, 1)


@dataclass
class BlockFit:
    """What one block's fine-tuning did: losses per epoch, time, throughput."""

    initial_loss: float
    final_loss: float
    initial_heldout: float | None
    final_heldout: float | None
    train_curve: list[float] = field(default_factory=list)
    heldout_curve: list[float] = field(default_factory=list)
    epochs_run: int = 0
    best_epoch: int | None = None
    stopped_early: bool = False
    steps: int = 0
    time_s: float = 0.0
    tokens_per_s: float = 0.0
    flops: float = 0.0
    relative_change: float = 0.0  # ||W_after - W_before|| / ||W_before|| over the block's linear weights

    def to_dict(self) -> dict:
        return asdict(self)


def fine_tune_block(
    block: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: dict[str, torch.Tensor],
    config: EBFTConfig,
    *,
    device: torch.device,
    seed: int,
    progress=None,
) -> BlockFit:
    """Fit ``forward(inputs) ≈ targets`` by AdamW on the block's masked weights, in the one training loop.

    Inputs/targets stay on the CPU; the last ``config.heldout`` windows are held out.
    """
    config.validate(n_windows=inputs.shape[0])
    n_train = inputs.shape[0] - config.heldout
    train_x, train_y = inputs[:n_train], targets[:n_train]
    held_x, held_y = inputs[n_train:], targets[n_train:]
    param_dtype = next(block.parameters()).dtype
    use_bf16 = config.autocast == "bf16" or (config.autocast == "auto" and device.type == "cuda")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if use_bf16
        else (lambda: torch.autocast(device.type, enabled=False))
    )

    def evaluate(x, y):
        block.eval()
        return _mse(forward, x, y, config.batch_size, device, param_dtype, autocast) if x.shape[0] else None

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        x = train_x[index].to(device, param_dtype)
        y = train_y[index].to(device, torch.float32)
        with autocast():
            out = forward(x)
        return torch.nn.functional.mse_loss(out.float(), y)

    fit = BlockFit(initial_loss=evaluate(train_x, train_y), final_loss=0.0, initial_heldout=evaluate(held_x, held_y),
                   final_heldout=None)  # fmt: skip
    params, hooks, layers = _trainable(block, masks, config.train_norms)
    start = {name: weight_matrix(layer).detach().clone() for name, layer in layers.items()}
    steps = math.ceil(n_train / config.batch_size) * config.epochs
    try:
        log = train_loop(
            block, params, loss_of, n_train, config, steps=steps, seed=seed,
            heldout_loss=(lambda: evaluate(held_x, held_y)) if held_x.shape[0] else None,
            initial_heldout=fit.initial_heldout, progress=progress,
        )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
        for param in block.parameters():
            param.requires_grad_(False)
    with torch.no_grad():
        for name, layer in layers.items():
            weight_matrix(layer).mul_(masks[name].to(layer.weight.device))
    trained_tokens = log.windows * inputs.shape[1]
    fit.train_curve, fit.heldout_curve = log.curve, log.heldout_curve
    fit.epochs_run, fit.steps, fit.time_s = log.epochs_run, log.steps, log.time_s
    fit.best_epoch, fit.stopped_early = log.best_epoch, log.stopped_early
    fit.tokens_per_s = trained_tokens / fit.time_s if fit.time_s else 0.0
    # Matmul FLOPs of the linear layers (dense kernels run over the zeros too): 2 forward + 4 backward
    # per weight and token. Attention scores are left out, so this is a lower bound.
    dense_weights = sum(weight_matrix(layer).numel() for layer in layers.values())
    fit.flops = 6.0 * dense_weights * trained_tokens
    fit.final_loss = evaluate(train_x, train_y)
    fit.final_heldout = evaluate(held_x, held_y)
    with torch.no_grad():  # how far the linear weights moved, relative to where they started
        moved = sum(float((weight_matrix(layers[n]).float() - w.float()).square().sum()) for n, w in start.items())
        size = sum(float(w.float().square().sum()) for w in start.values())
    fit.relative_change = math.sqrt(moved / size) if size else 0.0
    return fit


class EBFTStep(BlockStep):
    """The walker step: fine-tune the just-pruned block towards ``ctx.dense_outputs``."""

    def __init__(self, config: EBFTConfig) -> None:
        self.config = config

    def __call__(self, ctx: BlockContext) -> None:
        if ctx.dense_outputs is None:
            raise RuntimeError("EBFT needs the dense targets; put a target step before it")
        masks = ctx.masks or block_masks(ctx.block)
        n_train = ctx.inputs.shape[0] - self.config.heldout
        steps = self.config.epochs * math.ceil(n_train / self.config.batch_size)

        def progress(done=None, advance=1, note=None):
            ctx.note(f"block {ctx.index}: step {done}/{steps}, {note}")

        fit = fine_tune_block(
            ctx.block, ctx.forward, ctx.inputs, ctx.dense_outputs, masks, self.config, device=ctx.device,
            seed=self.config.seed * 100_003 + ctx.index, progress=progress,
        )  # fmt: skip
        ctx.report["ebft"] = fit.to_dict()
        ctx.summary = f"mse {fit.initial_loss:.4g} -> {fit.final_loss:.4g}"


class EBFT(BlockwiseMethod):
    """EBFT: block-wise reconstruction fine-tuning against the dense block's outputs, masks fixed."""

    name = "ebft"
    trains = True
    presets = PRESETS
    writes = ("ebft.json", "ebft.png", "report.md")

    def target(self, config: EBFTConfig) -> str:
        return config.target

    def with_budget(self, config: EBFTConfig, budget_tokens: int | None, n_windows: int, seqlen: int) -> EBFTConfig:
        if budget_tokens is None:
            return config
        # A token budget counts forward passes over training tokens, per block: epochs follow from it.
        epochs = max(1, math.ceil(budget_tokens / ((n_windows - config.heldout) * seqlen)))
        return replace(config, epochs=epochs)

    def block_steps(self, config: EBFTConfig, pattern) -> list[BlockStep]:
        return [EBFTStep(config)]

    def summarize(self, config: EBFTConfig, reports: list[dict], model: nn.Module) -> dict:
        blocks = [{"block": r["block"], **r["ebft"]} for r in reports if "ebft" in r]
        model_blocks = self.blocks_of(model)
        # What EBFT trains: every kept (nonzero) linear weight, plus the norm weights when they train.
        trainable = sum(
            int((weight_matrix(layer) != 0).sum())
            for block in model_blocks
            for layer in prunable_layers(block).values()
        )
        if config.train_norms:
            trainable += sum(
                p.numel() for block in model_blocks for m in block.modules() if "norm" in type(m).__name__.lower()
                for p in m.parameters(recurse=False)
            )  # fmt: skip
        return {"config": config.to_dict(), "blocks": blocks, "trainable_params": trainable}

    def artifacts(self, report: dict) -> dict[str, bytes]:
        """ebft.json, the loss-curve PNG and the per-block table."""
        blocks, config = report.get("blocks", []), report.get("config", {})
        return {
            "ebft.json": json.dumps({"config": config, "blocks": blocks}, indent=2).encode(),
            "ebft.png": ebft_plot_png(blocks),
            "report.md": self.markdown(report).encode(),
        }

    def markdown(self, report: dict) -> str:
        return ebft_markdown(report.get("blocks", []), report.get("config", {}))
