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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from sparsefit.distributed import WindowShard, sum_values
from sparsefit.errors import UsageError, check
from sparsefit.models.adapters import is_prunable, prunable_layers, weight_matrix
from sparsefit.recover.base import BlockwiseMethod
from sparsefit.recover.report import ebft_markdown, ebft_plot_png
from sparsefit.recover.training import FitConfig, flat_params, train_loop
from sparsefit.walk.masks import block_masks, mask_gradients
from sparsefit.walk.targets import dense_share, mix_targets
from sparsefit.walk.walker import BlockContext, BlockStep, call_block

AUTOCAST = ("auto", "none", "bf16")
LOSSES = ("mse", "token-relative")
# What the rate is relative to. "absolute": AdamW's lr as given (EBFT's). AdamW moves every weight by about lr per
# step whatever its size, so the same lr is a 5x larger relative change on Gemma-3-270M (linear weights' RMS 0.04)
# than on SmolLM2 (0.19): "block-rms" scales each block's rate by the RMS of its kept linear weights, "tensor-rms"
# each weight matrix's rate by its own RMS (norms and biases by the block's), so lr is a step relative to the weights.
LR_SCALES = ("absolute", "block-rms", "tensor-rms")


WINDOWS = ("sub-block", "block")  # or a number of consecutive blocks, e.g. 2 or 4


@dataclass
class EBFTConfig(FitConfig):
    """Hyper-parameters; the defaults are the official code's (README lr, not the code's 0.01)."""

    lr: float = 2e-4
    weight_decay: float = 0.1  # on the linear weights only: norms and biases take none (see _trainable)
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    epochs: int = 10
    batch_size: int = 8
    train_norms: bool = True
    train_biases: bool = True
    target: str = "sparse-path"
    # The reconstruction window: "block" (EBFT), "sub-block" (the attention part, then the MLP part, each
    # against the dense block's output at that point), or N consecutive blocks trained together against
    # the dense output of the last (Roux et al. 2025).
    window: str = "block"
    retries: int = 2  # a fit that ends no better than it began is redone at a quarter of the rate, this often
    # "mse" (EBFT's); "token-relative": each token's squared error over its target's squared norm, so that the
    # few tokens with massive activations (the attention sink at position 0 holds 90-100 % of the output
    # energy of SmolLM2's blocks 11-27, and Gemma's BOS 15-50 %) do not make the fit about them alone.
    loss: str = "mse"
    autocast: str = "auto"  # auto: bf16 autocast on CUDA, float32 elsewhere; or "none", "bf16"
    lr_scale: str = "absolute"  # one of LR_SCALES: the rate as given, or relative to the weights' RMS
    # The rate is for fits of at least this many steps; a fit of fewer (a small calibration set) takes
    # lr * sqrt(steps / full_rate_steps). 0: the rate as given whatever the steps (EBFT's).
    full_rate_steps: int = 0

    def validate(self, name: str = "ebft", n_windows: int | None = None) -> None:
        super().validate(name, n_windows)
        try:
            dense_share(self.target)
        except UsageError as error:
            raise UsageError(f"{name} {error}") from None
        check(self.autocast in AUTOCAST, f"{name} autocast {self.autocast!r}: use {', '.join(AUTOCAST)}")
        check(self.loss in LOSSES, f"{name} loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        check(self.lr_scale in LR_SCALES, f"{name} lr_scale {self.lr_scale!r} is not one of {', '.join(LR_SCALES)}")
        check(isinstance(self.retries, int) and self.retries >= 0, f"{name} retries {self.retries!r} must be >= 0")
        full_ok = isinstance(self.full_rate_steps, int) and self.full_rate_steps >= 0
        check(full_ok, f"{name} full_rate_steps {self.full_rate_steps!r} must be an integer >= 0 (0: the rate as is)")
        self.window_blocks()

    def window_blocks(self) -> int:
        """Blocks per reconstruction window: 0 for a sub-block window, 1 for EBFT's, N for N blocks."""
        text = str(self.window)
        if text == "sub-block":
            return 0
        if text == "block":
            return 1
        if text.isdigit() and int(text) >= 1:
            return int(text)
        raise UsageError(f"ebft window {self.window!r} is not one of sub-block, block or a number of blocks (2, 4)")


PRESETS: dict[str, EBFTConfig] = {
    # The official code's setting (256 x 1024 calibration windows, 10 epochs, batch 8).
    "paper": EBFTConfig(),
    # From the frontier of bench/quality.py (SmolLM2, Wanda 70 % and 2:4, wiki 64 x 128, interleaved, one thread;
    # docs/ebft.md) and bench/robust.py (Gemma-3-270M and SmolLM2). The official setting barely moves AdamW in 8 steps
    # per block at this budget (DESIGN.md), hence many more steps, a batch of 2 and a much larger rate. The rate is
    # relative to each weight matrix's RMS (lr_scale tensor-rms; 1.6e-2 is SmolLM2's former 3e-3 at its RMS of 0.19):
    # an absolute 3e-3 is a 5x larger relative step on Gemma-3-270M (RMS 0.04) and took its wiki perplexity from 81 to
    # 192 at 16 x 256. A linear warm-up over the first 10 % of the steps: without it every Gemma block's training loss
    # rose in the first epoch, and the guard's held-out loss got worse (3.24 -> 3.31) where with it it improves
    # (3.22 -> 3.19). The mixed target beat both pure ones on SmolLM2 (wiki 65 % against 59 % sparse-path and 63 %
    # dense-path at 70 %): a deliberate difference from EBFT's sparse-path target. `make run`: quick, batch 1, 3 epochs.
    # Each takes its full rate from the fewest steps per block at which that rate was measured to hold, and less
    # below (rate_for_steps): quick from 124 (64 x 128; at 16 x 256, 28 steps, it did not, and runs at 0.48 of it),
    # cpu from 56 (16 x 256, where it held on both models at 50 %, 70 % and 2:4).
    "quick": EBFTConfig(lr=1.6e-2, lr_scale="tensor-rms", warmup=0.1, epochs=4, batch_size=2, heldout=2, target="mix",
                        full_rate_steps=124),
    # cpu: twice the steps. More steps than this (windows of 2 blocks, a SquareHead polish) gained on wiki and lost on
    # books on SmolLM2: they fit the calibration text.
    "cpu": EBFTConfig(lr=1.6e-2, lr_scale="tensor-rms", warmup=0.1, epochs=8, batch_size=2, heldout=2, target="mix",
                      full_rate_steps=56),
    # gpu: the paper's setting with 8 of its 256 windows held out, which buys the never-worse guard on held-out
    # windows and early stopping after 2 epochs without improvement. Not measured on a GPU in this project.
    "gpu": EBFTConfig(heldout=8, early_stop=2),
}


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() or isinstance(module, nn.LayerNorm)


def _trainable(module: nn.Module, masks: dict[str, torch.Tensor], config: EBFTConfig,
               include: Callable[[str], bool] = lambda name: True):  # fmt: skip
    """Freeze everything, then unfreeze the masked linear weights (biases, norms) whose names ``include`` takes.

    Two AdamW groups: the linear weights take the weight decay; norms and biases take none. The official
    code decays every trained tensor, which pulls a Llama norm's scale towards 0 (a Gemma norm, stored as
    an offset ``x * (1 + w)``, towards 1): a deliberate difference, measured in bench/quality.py.
    """
    layers = {name: layer for name, layer in prunable_layers(module).items() if include(name)}
    for param in module.parameters():
        param.requires_grad_(False)
    weights, others = [], []
    for layer in layers.values():
        weights.append(layer.weight)
        if config.train_biases and getattr(layer, "bias", None) is not None:
            others.append(layer.bias)
    if config.train_norms:
        linear = {id(p) for layer in prunable_layers(module).values() for p in layer.parameters()}
        for name, sub in module.named_modules():
            if _is_norm(sub) and include(name):
                others.extend(p for p in sub.parameters(recurse=False) if id(p) not in linear)
    for param in (*weights, *others):
        param.requires_grad_(True)
    hooks = mask_gradients(layers, {name: masks[name] for name in layers})
    if config.lr_scale == "absolute":
        groups = [{"params": weights}, *([{"params": others, "weight_decay": 0.0}] if others else [])]
        return groups, hooks, layers
    scales = {name: _kept_rms([layer], [masks[name]]) for name, layer in layers.items()}
    block = _kept_rms(list(layers.values()), [masks[name] for name in layers])
    if config.lr_scale == "block-rms":
        groups = [{"params": weights, "lr_scale": block}]
    else:
        groups = [{"params": [layer.weight], "lr_scale": scales[name]} for name, layer in layers.items()]
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "lr_scale": block})
    return groups, hooks, layers


@torch.no_grad()
def _kept_rms(layers: list[nn.Module], masks: list[torch.Tensor]) -> float:
    """RMS of the kept entries of the layers' weights (pruned ones are exact zeros): what a relative rate scales."""
    total = sum(float(layer.weight.float().square().sum()) for layer in layers)
    count = sum(int(keep.sum()) for keep in masks)
    return math.sqrt(total / count) if count and total else 1.0


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                        reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """EBFT's MSE, or the token-relative error: per token ``||out - target||^2 / ||target||^2`` (then averaged).

    ``reduction="sum"`` sums over elements (MSE) or tokens (token-relative), for averaging over batches.
    """
    if kind == "mse":
        return torch.nn.functional.mse_loss(out.float(), target, reduction=reduction)
    error = (out.float() - target).square().sum(-1) / target.square().sum(-1).clamp_min(1e-12)
    return error.sum() if reduction == "sum" else error.mean()


@torch.no_grad()
def _mean_loss(forward: Callable, inputs: torch.Tensor, targets: torch.Tensor, batch: int, device, dtype, ctx,
               kind: str = "mse", reduce: bool = False) -> float:  # fmt: skip
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch):
        x = inputs[start : start + batch].to(device, dtype)
        y = targets[start : start + batch].to(device, torch.float32)
        with ctx():
            out = forward(x)
        total += reconstruction_loss(out, y, kind, reduction="sum").item()
        count += y.numel() if kind == "mse" else y[..., 0].numel()
    if reduce:  # under torchrun: every rank's windows (a rank may hold none of them)
        total, count = sum_values(total, count)
    return total / max(count, 1)


@dataclass
class BlockFit:
    """What one window's fine-tuning did: losses per epoch, time, throughput, and whether it had to back off."""

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
    lr: float = 0.0  # the rate of the fit that was kept
    attempts: int = 1  # fits run: 1, or more when a fit ended no better than it began and was redone slower
    reverted: bool = False  # every attempt ended worse: the weights are the pruned ones it started from

    def to_dict(self) -> dict:
        return asdict(self)


def rate_for_steps(steps: int, full_rate_steps: int) -> float:
    """The share of the rate a fit of ``steps`` steps takes: 1 from ``full_rate_steps`` on, sqrt(steps / it) below.

    AdamW's first steps move every weight by about the rate whatever its gradient (its second moment is estimated
    from a few gradients); a short fit has no steps left to settle after them. On Gemma-3-270M at 16 x 256, `quick`
    (28 steps per block) at SmolLM2's rate made 16 of 18 blocks' training loss rise in the first epoch and the
    model worse (wiki 80.7 -> 80.2, the guard's loss 3.24 -> 3.52); at half the rate it closed 40 % of the gap and
    the guard's loss fell (3.22 -> 3.11), where the fits of 124 and more steps hold at the full rate (bench/robust.py).
    """
    if not full_rate_steps or steps >= full_rate_steps:
        return 1.0
    return math.sqrt(max(1, steps) / full_rate_steps)


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
    include: Callable[[str], bool] = lambda name: True,
    shard: WindowShard | None = None,
) -> BlockFit:
    """Fit ``forward(inputs) ≈ targets`` by AdamW on the masked weights of ``block``, in the one training loop.

    ``block`` is the module that trains (one decoder block, or a ModuleList of a window's blocks; ``masks``
    by layer name inside it); ``include`` restricts training to the layers and norms it accepts (a sub-block).
    Inputs/targets stay on the CPU; the last ``config.heldout`` windows are held out. Under torchrun, ``shard``
    says which of all the windows the rank's ``inputs`` are (data parallel: :func:`train_loop`).

    Never worse than it began (with ``config.keep_best``, the default): the loop keeps the best held-out state, the
    initial one included; a fit that did not improve on its start (held-out loss, or the training loss when nothing
    is held out) is redone from the start at a quarter of the rate, up to ``config.retries`` times, and else left as
    it began. Without ``keep_best`` the fit ends where training ends (the model guard still checks the model).
    """
    shard = shard if shard is not None else WindowShard(inputs.shape[0])
    config.validate(n_windows=shard.total)
    n_train = shard.total - config.heldout
    local_train = shard.count(0, n_train)  # a rank's windows are in global order: its training windows come first
    train_x, train_y = inputs[:local_train], targets[:local_train]
    held_x, held_y = inputs[local_train:], targets[local_train:]
    param_dtype = next(block.parameters()).dtype
    use_bf16 = config.autocast == "bf16" or (config.autocast == "auto" and device.type == "cuda")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if use_bf16
        else (lambda: torch.autocast(device.type, enabled=False))
    )

    def evaluate(x, y, n_global):
        block.eval()
        return (_mean_loss(forward, x, y, config.batch_size, device, param_dtype, autocast, config.loss,
                           reduce=not shard.single) if n_global else None)  # fmt: skip

    def on_train():
        return evaluate(train_x, train_y, n_train)

    def on_heldout():
        return evaluate(held_x, held_y, config.heldout)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        x = train_x[index].to(device, param_dtype)
        y = train_y[index].to(device, torch.float32)
        with autocast():
            out = forward(x)
        return reconstruction_loss(out, y, config.loss)

    fit = BlockFit(initial_loss=on_train(), final_loss=0.0, initial_heldout=on_heldout(), final_heldout=None)
    groups, hooks, layers = _trainable(block, masks, config, include)
    trained = flat_params(groups)
    # The one copy of the start (a retry, keep_best and the held-out tracking all read it): each copy of a block
    # is a block's size in memory (issue 22: a streamed recovery's peak).
    initial = [p.detach().clone() for p in trained]
    steps = math.ceil(n_train / config.batch_size) * config.epochs
    lr, time_s, attempt = config.lr * rate_for_steps(steps, config.full_rate_steps), 0.0, 0
    try:
        while True:
            attempt += 1
            log = train_loop(
                block, groups, loss_of, n_train, replace(config, lr=lr), steps=steps, seed=seed,
                heldout_loss=on_heldout if config.heldout else None, initial_heldout=fit.initial_heldout,
                initial_state=initial, progress=progress, shard=shard,
            )  # fmt: skip
            time_s += log.time_s
            with torch.no_grad():
                for name, layer in layers.items():
                    weight_matrix(layer).mul_(masks[name].to(layer.weight.device))
            final_loss = on_train()
            improved = log.best_epoch != 0 if log.best_epoch is not None else final_loss < fit.initial_loss
            if improved or attempt > config.retries or not config.keep_best:
                break
            lr /= 4
            with torch.no_grad():
                for param, value in zip(trained, initial, strict=True):
                    param.copy_(value)
        if not improved and config.keep_best:  # every attempt ended worse than the start: keep the start
            with torch.no_grad():
                for param, value in zip(trained, initial, strict=True):
                    param.copy_(value)
            final_loss = on_train()
    finally:
        for hook in hooks:
            hook.remove()
        for param in block.parameters():
            param.requires_grad_(False)
    trained_tokens = log.windows * inputs.shape[1]
    fit.train_curve, fit.heldout_curve = log.curve, log.heldout_curve
    fit.epochs_run, fit.steps, fit.time_s = log.epochs_run, log.steps, time_s
    fit.best_epoch, fit.stopped_early = log.best_epoch, log.stopped_early
    fit.lr, fit.attempts, fit.reverted = lr, attempt, not improved and config.keep_best
    fit.tokens_per_s = trained_tokens / log.time_s if log.time_s else 0.0
    # Matmul FLOPs of the linear layers (dense kernels run over the zeros too): 2 forward + 4 backward
    # per weight and token. Attention scores are left out, so this is a lower bound.
    dense_weights = sum(weight_matrix(layer).numel() for layer in layers.values())
    fit.flops = 6.0 * dense_weights * trained_tokens * attempt
    fit.final_loss = final_loss
    fit.final_heldout = on_heldout()
    with torch.no_grad():  # how far the linear weights moved, relative to where they started (a Frobenius norm:
        # the stored orientation of a weight does not change it)
        started = {id(p): value for p, value in zip(trained, initial, strict=True)}
        pairs = [(layer.weight, started[id(layer.weight)]) for layer in layers.values()]
        moved = sum(float((w.float() - w0.float()).square().sum()) for w, w0 in pairs)
        size = sum(float(w0.float().square().sum()) for _, w0 in pairs)
    fit.relative_change = math.sqrt(moved / size) if size else 0.0
    return fit


class _SubBlockEnd(Exception):
    """Raised by a pre-hook to end a block's forward where its MLP part begins, carrying the residual stream."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def _mlp_part(block: nn.Module, sample: torch.Tensor, kwargs: dict) -> list[str]:
    """The block's children that make its MLP part, in call order; the first is the norm that reads the residual
    stream after attention (Llama's ``post_attention_layernorm``, Gemma 3's ``pre_feedforward_layernorm``).

    Found from the order in which the block calls its children, so no architecture needs a table: the MLP is
    the first child after attention that holds linear layers, and its part begins at the last norm called
    before it (Gemma 3's post-attention norm, called on the attention output, stays with attention).
    """
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n))
               for name, m in block.named_modules() if name and "." not in name]  # fmt: skip
    try:
        with torch.no_grad():
            call_block(block, sample, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    attention = next((i for i, n in enumerate(order) if "attn" in n or "attention" in n), None)
    if attention is not None:
        mlp = next((i for i in range(attention + 1, len(order))
                    if not _is_norm(block.get_submodule(order[i])) and prunable_layers(block.get_submodule(order[i]))
                    or is_prunable(block.get_submodule(order[i]))), None)  # fmt: skip
        norms = [i for i in range(attention + 1, mlp or 0) if _is_norm(block.get_submodule(order[i]))]
        if mlp is not None and norms:
            return order[norms[-1] :]
    raise UsageError(f"ebft window sub-block: cannot find where the MLP part of {type(block).__name__} begins")


def _forward_to(block: nn.Module, module_name: str, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block's forward up to ``module_name``'s input (the residual stream after the attention part)."""
    module = block.get_submodule(module_name)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        def stop(_module, args):
            raise _SubBlockEnd(args[0])

        handle = module.register_forward_pre_hook(stop)
        try:
            call_block(block, hidden, kwargs)
        except _SubBlockEnd as end:
            return end.hidden
        finally:
            handle.remove()
        raise RuntimeError(f"{module_name} was not called by the block's forward")

    return forward


class EBFTStep(BlockStep):
    """The walker step: fine-tune the just-pruned block (or window of blocks) towards the dense outputs.

    A window of N blocks keeps the sparse inputs at its first block and the dense outputs of its blocks
    until its last block is pruned, then trains all N together; the blocks before the last are
    propagated again (their outputs changed) and reported to the driver as changed, so checkpoints hold
    them. The window's state is carried, so ``--resume`` inside a window continues it.
    """

    def __init__(self, config: EBFTConfig, all_weights: bool = False) -> None:
        self.config = config
        self.all_weights = all_weights  # a structured (sliced) block: no mask, every remaining weight trains
        self.span = config.window_blocks()
        # A window of N blocks trains its N-1 earlier blocks again: the driver keeps them loaded.
        self.keep_blocks = max(self.span - 1, 0)
        self.window_inputs: torch.Tensor | None = None
        self.window_dense: torch.Tensor | None = None  # sparse-path: the dense blocks run on window_inputs

    def carry(self) -> dict[str, torch.Tensor]:
        state = {}
        if self.window_inputs is not None:
            state["ebft_window_inputs"] = self.window_inputs
        if self.window_dense is not None:
            state["ebft_window_dense"] = self.window_dense
        return state

    def restore(self, carry: dict[str, torch.Tensor], first_inputs: torch.Tensor) -> None:
        self.window_inputs = carry.get("ebft_window_inputs")
        self.window_dense = carry.get("ebft_window_dense")

    def _fit(self, ctx: BlockContext, module, forward, inputs, targets, masks, include=lambda n: True, label=""):
        n_train = ctx.shard.total - self.config.heldout
        steps = self.config.epochs * math.ceil(n_train / self.config.batch_size)

        def progress(done=None, advance=1, note=None):
            ctx.note(f"block {ctx.index}{label}: step {done}/{steps}, {note}")

        return fine_tune_block(
            module, forward, inputs, targets, masks, self.config, device=ctx.device,
            seed=self.config.seed * 100_003 + ctx.index, progress=progress, include=include, shard=ctx.shard,
        )  # fmt: skip

    def __call__(self, ctx: BlockContext) -> None:
        if self.span <= 1 and ctx.dense_outputs is None:
            raise RuntimeError("EBFT needs the dense targets; put a target step before it")
        masks = ctx.masks or (_all_ones(ctx.block) if self.all_weights else block_masks(ctx.block))
        if self.span == 0:
            self._sub_blocks(ctx, masks)
        elif self.span == 1:
            fit = self._fit(ctx, ctx.block, ctx.forward, ctx.inputs, ctx.dense_outputs, masks)
            self._record(ctx, fit)
        else:
            self._window(ctx, masks)

    def _record(self, ctx: BlockContext, fit: BlockFit, **extra) -> None:
        ctx.report["ebft"] = {**fit.to_dict(), **extra}
        kept = " (kept as pruned)" if fit.reverted else ""
        ctx.summary = f"{self.config.loss} {fit.initial_loss:.4g} -> {fit.final_loss:.4g}{kept}"

    def _sub_blocks(self, ctx: BlockContext, masks) -> None:
        """The attention part against the dense block's residual stream after attention, then the MLP part."""
        if ctx.teacher_block is None:
            raise RuntimeError("EBFT's sub-block window needs the dense block; the method asks for it")
        kwargs = ctx.kwargs
        sample = ctx.inputs[:1].to(ctx.device, next(ctx.block.parameters()).dtype)
        mlp_part = _mlp_part(ctx.block, sample, kwargs)
        boundary = mlp_part[0]

        def in_mlp(name: str) -> bool:
            return name.split(".")[0] in mlp_part

        # The attention part's target: the dense block's middle on the sparse path, the dense path, or a mix.
        share, dense_half = dense_share(self.config.target), _ForwardTo(ctx.teacher_block, boundary, kwargs)
        dense_mid = ctx.run_all(ctx.inputs, dense_half) if share < 1 else None
        if share > 0:
            path_mid = ctx.run_all(ctx.dense_path_inputs, dense_half)
            dense_mid = path_mid if dense_mid is None else mix_targets(dense_mid, path_mid, share, out=dense_mid)
        attention = self._fit(ctx, ctx.block, _forward_to(ctx.block, boundary, kwargs), ctx.inputs, dense_mid, masks,
                              include=lambda n: not in_mlp(n), label=" attention")  # fmt: skip
        mlp = self._fit(ctx, ctx.block, ctx.forward, ctx.inputs, ctx.dense_outputs, masks, include=in_mlp,
                        label=" mlp")  # fmt: skip
        self._record(ctx, mlp, attention=attention.to_dict())

    def _window(self, ctx: BlockContext, masks) -> None:
        """Gather a window of blocks; train them together when its last block is pruned."""
        first = ctx.index - ctx.index % self.span
        last = min(first + self.span, len(ctx.blocks)) - 1
        share = dense_share(self.config.target)
        if ctx.index == first:
            self.window_inputs = ctx.inputs
            self.window_dense = ctx.inputs if share < 1 else None
        if share < 1:  # the window's sparse path: the dense blocks chained from the window's first inputs
            if ctx.teacher_block is None:
                raise RuntimeError("EBFT's multi-block window needs the dense block; the method asks for it")
            self.window_dense = ctx.run_all(self.window_dense, ctx.teacher_block)
        if ctx.index < last:
            ctx.summary = f"pruned; trains with blocks {first}-{last}"
            return
        if share > 0 and ctx.dense_path_outputs is None:
            raise RuntimeError("EBFT's window needs the dense path; the method asks for it")
        if share == 0:
            targets = self.window_dense
        elif share == 1:
            targets = ctx.dense_path_outputs
        else:
            targets = mix_targets(self.window_dense, ctx.dense_path_outputs, share, out=self.window_dense)
        span = range(first, last + 1)
        window = nn.ModuleList([ctx.blocks[j] for j in span])
        kwargs = [ctx.kwargs_of(j) for j in span]
        window_masks = {}
        for k, j in enumerate(span):
            other = _all_ones(ctx.blocks[j]) if self.all_weights else block_masks(ctx.blocks[j])
            for name, keep in (masks if j == ctx.index else other).items():
                window_masks[f"{k}.{name}"] = keep
        window.to(ctx.device)

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            for block, block_kwargs in zip(window, kwargs, strict=True):
                hidden = call_block(block, hidden, block_kwargs)
            return hidden

        fit = self._fit(ctx, window, forward, self.window_inputs, targets, window_masks)
        # The last block's inputs changed with the blocks before it: propagate them again.
        hidden = self.window_inputs
        for j, block_kwargs in zip(span[:-1], kwargs[:-1], strict=True):
            hidden = ctx.run_all(hidden, ctx.blocks[j], block_kwargs)
            ctx.changed_blocks.append(j)
        ctx.inputs = hidden
        for j in span[:-1]:
            ctx.blocks[j].to("cpu")
        self.window_inputs = self.window_dense = None
        self._record(ctx, fit, window=[first, last])


def _all_ones(block: nn.Module) -> dict[str, torch.Tensor]:
    """Keep masks that keep every weight (a sliced block's exact zeros, if any, may train too)."""
    layers = prunable_layers(block)
    return {name: torch.ones_like(weight_matrix(layer), dtype=torch.bool) for name, layer in layers.items()}


class _ForwardTo(nn.Module):
    """A block cut where its MLP part begins, as a module for :meth:`BlockContext.run_all`."""

    def __init__(self, block: nn.Module, boundary: str, kwargs: dict) -> None:
        super().__init__()
        self.block = block
        self.run = _forward_to(block, boundary, kwargs)

    def forward(self, hidden: torch.Tensor, **_kwargs) -> torch.Tensor:
        return self.run(hidden)


class EBFT(BlockwiseMethod):
    """EBFT: block-wise reconstruction fine-tuning against the dense block's outputs, masks fixed."""

    name = "ebft"
    trains = True
    presets = PRESETS
    writes = ("ebft.json", "ebft.png", "report.md")

    def target(self, config: EBFTConfig) -> str | None:
        # A window of blocks builds its sparse path itself (the dense blocks chained from the window's first
        # inputs): the walk provides the dense path only, and only when the target has a share of it.
        if config.window_blocks() > 1:
            return "dense-path" if dense_share(config.target) > 0 else None
        return config.target

    def needs_teacher_block(self, config: EBFTConfig) -> bool:
        # A sub-block window reads the dense block's middle; a window of blocks chains the dense blocks.
        span = config.window_blocks()
        return span == 0 or (span > 1 and config.target != "dense-path")

    def with_budget(self, config: EBFTConfig, budget_tokens: int | None, n_windows: int, seqlen: int) -> EBFTConfig:
        if budget_tokens is None:
            return config
        # A token budget counts forward passes over training tokens, per block: epochs follow from it.
        epochs = max(1, math.ceil(budget_tokens / ((n_windows - config.heldout) * seqlen)))
        return replace(config, epochs=epochs)

    def block_steps(self, config: EBFTConfig, pattern) -> list[BlockStep]:
        return [EBFTStep(config, all_weights=pattern.slim)]

    def summarize(self, config: EBFTConfig, reports: list[dict], blocks: Iterable[nn.Module]) -> dict:
        fits = [{"block": r["block"], **r["ebft"]} for r in reports if "ebft" in r]
        # What EBFT trains: every kept (nonzero) linear weight, plus the norm weights when they train.
        trainable = 0
        for block in blocks:
            trainable += sum(int((weight_matrix(layer) != 0).sum()) for layer in prunable_layers(block).values())
            if config.train_norms:
                trainable += sum(p.numel() for m in block.modules() if "norm" in type(m).__name__.lower()
                                 for p in m.parameters(recurse=False))  # fmt: skip
        return {"config": config.to_dict(), "blocks": fits, "trainable_params": trainable}

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
