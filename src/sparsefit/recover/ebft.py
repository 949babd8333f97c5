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

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from sparsefit.errors import UsageError, check
from sparsefit.models.adapters import prunable_layers, weight_matrix

TARGETS = ("sparse-path", "dense-path")


@dataclass
class EBFTConfig:
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
    heldout: int = 0  # calibration windows kept out of training, for the held-out loss
    early_stop: int = 0  # stop a block after this many epochs without held-out improvement (0: never)
    seed: int = 0
    autocast: str = "auto"  # auto: bf16 autocast on CUDA, float32 elsewhere; or "none", "bf16"

    def validate(self, n_windows: int | None = None) -> None:
        check(self.lr > 0, f"EBFT lr {self.lr} must be > 0")
        check(self.weight_decay >= 0, f"EBFT weight decay {self.weight_decay} must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"EBFT betas ({self.beta1}, {self.beta2}) must be in [0, 1)")
        check(self.clip > 0, f"EBFT clip {self.clip} must be > 0")
        check(self.epochs >= 1, f"EBFT epochs {self.epochs} must be >= 1")
        check(self.batch_size >= 1, f"EBFT batch {self.batch_size} must be >= 1")
        check(self.target in TARGETS, f"EBFT target {self.target!r} is not one of {', '.join(TARGETS)}")
        check(self.heldout >= 0, f"EBFT held-out windows {self.heldout} must be >= 0")
        check(self.early_stop >= 0, f"EBFT early stop patience {self.early_stop} must be >= 0")
        check(self.autocast in ("auto", "none", "bf16"), f"autocast {self.autocast!r}: use auto, none or bf16")
        check(
            self.early_stop == 0 or self.heldout > 0,
            "EBFT early stop needs held-out windows; set heldout > 0",
        )
        if n_windows is not None:
            train = n_windows - self.heldout
            check(
                train >= 1,
                f"EBFT held-out windows {self.heldout} leave no training window out of {n_windows}",
            )
            check(
                self.batch_size <= train,
                f"EBFT batch {self.batch_size} is larger than the {train} training windows; "
                "lower the batch or add calibration samples",
            )

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, EBFTConfig] = {
    # The official code's setting (256 x 1024 calibration windows, 10 epochs, batch 8).
    "paper": EBFTConfig(),
    # Two CPU cores: far fewer tokens, so many more steps per token and a larger learning rate; the
    # official setting barely moves AdamW in 8 steps per block (DESIGN.md, measured). See README.
    "cpu": EBFTConfig(lr=1e-3, epochs=4, batch_size=2, heldout=2),
}


def preset(name: str, **overrides) -> EBFTConfig:
    if name not in PRESETS:
        raise UsageError(f"EBFT preset {name!r} is not known; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def block_masks(block: nn.Module) -> dict[str, torch.Tensor]:
    """Keep masks read off a sparse block: a weight is kept when it is not exactly zero."""
    return {name: weight_matrix(layer) != 0 for name, layer in prunable_layers(block).items()}


def _trainable(block: nn.Module, masks: dict[str, torch.Tensor], train_norms: bool):
    """Freeze everything, then unfreeze the masked linear weights (and biases) and, optionally, norms."""
    layers = prunable_layers(block)
    params: list[nn.Parameter] = []
    hooks = []
    for param in block.parameters():
        param.requires_grad_(False)
    for name, layer in layers.items():
        keep = masks[name].to(layer.weight.device)
        # Conv1D stores (in, out): orient the mask like the stored weight.
        stored_keep = keep if layer.weight.shape == keep.shape else keep.t()
        layer.weight.requires_grad_(True)
        hooks.append(layer.weight.register_hook(lambda grad, m=stored_keep: grad * m))
        params.append(layer.weight)
        if getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(True)
            params.append(layer.bias)
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
    steps: int = 0
    time_s: float = 0.0
    tokens_per_s: float = 0.0
    flops: float = 0.0

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
) -> BlockFit:
    """Fit ``forward(inputs) ≈ targets`` by AdamW on the block's masked weights. Inputs/targets stay on the CPU."""
    config.validate(inputs.shape[0])
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
    # Determinism for resume: everything random in this block derives from (seed, block) only.
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    params, hooks, layers = _trainable(block, masks, config.train_norms)
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))

    def evaluate(x, y):
        block.eval()
        return _mse(forward, x, y, config.batch_size, device, param_dtype, autocast) if x.shape[0] else None

    fit = BlockFit(initial_loss=evaluate(train_x, train_y), final_loss=0.0, initial_heldout=evaluate(held_x, held_y),
                   final_heldout=None)  # fmt: skip
    best_heldout, stale, best_state = fit.initial_heldout, 0, None
    trained_tokens = 0
    began = time.perf_counter()
    try:
        for _epoch in range(config.epochs):
            block.train()
            order = torch.randperm(n_train, generator=generator)
            epoch_loss = 0.0
            for start in range(0, n_train, config.batch_size):
                index = order[start : start + config.batch_size]
                x = train_x[index].to(device, param_dtype)
                y = train_y[index].to(device, torch.float32)
                with autocast():
                    out = forward(x)
                loss = torch.nn.functional.mse_loss(out.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.clip)
                optimizer.step()
                scheduler.step()
                epoch_loss += loss.item() * index.numel()
                fit.steps += 1
                trained_tokens += index.numel() * inputs.shape[1]
            fit.train_curve.append(epoch_loss / n_train)
            fit.epochs_run += 1
            if held_x.shape[0]:
                held = evaluate(held_x, held_y)
                fit.heldout_curve.append(held)
                if config.early_stop:
                    if held < best_heldout:
                        best_heldout, stale = held, 0
                        best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
                    else:
                        stale += 1
                        if stale >= config.early_stop:
                            break
    finally:
        for hook in hooks:
            hook.remove()
        for param in block.parameters():
            param.requires_grad_(False)
        optimizer.zero_grad(set_to_none=True)
    if best_state is not None and fit.heldout_curve and fit.heldout_curve[-1] > best_heldout:
        block.load_state_dict(best_state)  # early stop: keep the best held-out epoch
    with torch.no_grad():
        for name, layer in layers.items():
            weight_matrix(layer).mul_(masks[name].to(layer.weight.device))
    fit.time_s = time.perf_counter() - began
    fit.tokens_per_s = trained_tokens / fit.time_s if fit.time_s else 0.0
    # Matmul FLOPs of the linear layers (dense kernels run over the zeros too): 2 forward + 4 backward
    # per weight and token. Attention scores are left out, so this is a lower bound.
    dense_weights = sum(weight_matrix(layer).numel() for layer in layers.values())
    fit.flops = 6.0 * dense_weights * trained_tokens
    fit.final_loss = evaluate(train_x, train_y)
    fit.final_heldout = evaluate(held_x, held_y)
    return fit


@dataclass
class EBFTStep:
    """The walker step: fine-tune the just-pruned block towards ``ctx.dense_outputs``."""

    config: EBFTConfig
    on_fit: Callable[[int, BlockFit], None] | None = None

    def __call__(self, ctx) -> None:
        if ctx.dense_outputs is None:
            raise RuntimeError("EBFT needs the dense targets; put a target step before it")
        masks = ctx.masks or block_masks(ctx.block)
        fit = fine_tune_block(
            ctx.block,
            ctx.forward,
            ctx.inputs,
            ctx.dense_outputs,
            masks,
            self.config,
            device=ctx.device,
            seed=self.config.seed * 100_003 + ctx.index,
        )
        ctx.report["ebft"] = fit.to_dict()
        if self.on_fit:
            self.on_fit(ctx.index, fit)
