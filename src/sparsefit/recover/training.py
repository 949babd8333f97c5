"""Shared pieces of the whole-model recovery methods (SquareHead, LoRA, S²FT): masks, token budgets, one loop.

Masks are read off the sparse model (a weight is kept when it is not exactly zero) and re-applied in place after
every optimizer step, so a method that updates whole matrices can never leave a pruned weight nonzero. A token
budget counts token passes through every block: one optimizer step over ``batch x seqlen`` tokens spends
``batch x seqlen`` of it, the same unit EBFT spends per block, so ``--budget`` makes the methods comparable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from sparsefit.errors import UsageError, check
from sparsefit.models.adapters import get_adapter, prunable_layers, weight_matrix

Masks = dict[str, torch.Tensor]  # qualified layer name ("model.layers.3.mlp.down_proj") -> bool keep (out, in)


def model_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer of the decoder blocks, by qualified name."""
    adapter = get_adapter(model)
    return {
        f"{adapter.blocks}.{index}.{name}": layer
        for index, block in enumerate(adapter.get_blocks(model))
        for name, layer in prunable_layers(block).items()
    }


def model_masks(model: nn.Module) -> Masks:
    """Keep masks read off a sparse model: a weight is kept when it is not exactly zero (one byte per weight)."""
    return {name: weight_matrix(layer) != 0 for name, layer in model_layers(model).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every pruned weight in place (``masked_fill``: kept weights stay bit-identical)."""
    for name, layer in model_layers(model).items():
        weight = weight_matrix(layer)
        weight.masked_fill_(~masks[name].to(weight.device), 0)


def same_zeros(model: nn.Module, masks: Masks) -> bool:
    """True when the model's zero positions are exactly the pruned positions of ``masks``."""
    return all(torch.equal(weight_matrix(layer).cpu() != 0, masks[name].cpu())
               for name, layer in model_layers(model).items())  # fmt: skip


def pruned_count(masks: Masks) -> int:
    return sum(int((~keep).sum()) for keep in masks.values())


@dataclass
class TrainConfig:
    """The loop's hyper-parameters, shared by the whole-model methods (each sets its own defaults)."""

    lr: float = 1e-4
    epochs: int = 4  # passes over the calibration windows when no token budget is given
    batch_size: int = 2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0
    warmup: float = 0.0  # share of the steps with a linear warm-up; then linear decay to zero
    probe_windows: int = 8  # calibration windows on which the loss is measured before and after training
    seed: int = 0

    def validate(self, name: str, n_windows: int | None = None) -> None:
        check(self.lr > 0, f"{name} lr {self.lr} must be > 0")
        check(self.epochs >= 1, f"{name} epochs {self.epochs} must be >= 1")
        check(self.batch_size >= 1, f"{name} batch {self.batch_size} must be >= 1")
        check(self.weight_decay >= 0, f"{name} weight decay {self.weight_decay} must be >= 0")
        betas_ok = 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1
        check(betas_ok, f"{name} betas ({self.beta1}, {self.beta2}) must be in [0, 1)")
        check(self.clip > 0, f"{name} clip {self.clip} must be > 0")
        check(0 <= self.warmup < 1, f"{name} warmup {self.warmup} must be a share of the steps in [0, 1)")
        check(self.probe_windows >= 0, f"{name} probe windows {self.probe_windows} must be >= 0")
        if n_windows is not None:
            check(
                self.batch_size <= n_windows,
                f"{name} batch {self.batch_size} is larger than the {n_windows} calibration windows; "
                "lower the batch or add calibration samples",
            )


def loop_config(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """The shared loop's part of a method's config (a subclass of :class:`TrainConfig`), with ``overrides``."""
    return TrainConfig(**{**{f.name: getattr(config, f.name) for f in fields(TrainConfig)}, **overrides})


def plan_steps(budget_tokens: int | None, n_windows: int, seqlen: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps: ``ceil(budget / (batch * seqlen))`` with a budget, else ``epochs`` passes over the windows."""
    if budget_tokens is not None:
        check(budget_tokens > 0, f"token budget {budget_tokens} must be a positive number of tokens")
        return max(1, math.ceil(budget_tokens / (batch_size * seqlen)))
    return epochs * math.ceil(n_windows / batch_size)


def batch_order(n_windows: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Window indices for ``steps`` batches: reshuffled epochs (the last batch of an epoch may be short)."""
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(n_windows, generator=generator)
        for start in range(0, n_windows, batch_size):
            if done >= steps:
                return
            yield order[start : start + batch_size]
            done += 1


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to zero at ``total`` (EBFT's, without warm-up)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, 1 - (step - warmup_steps) / max(1, total - warmup_steps))


@dataclass
class FitLog:
    """What one training run did."""

    steps: int = 0
    tokens: int = 0  # token passes spent (the budget's unit)
    time_s: float = 0.0
    tokens_per_s: float = 0.0
    initial_loss: float | None = None  # on the probe windows, eval mode (no dropout), before training
    final_loss: float | None = None  # the same, after
    curve: list[float] = field(default_factory=list)  # mean training loss per epoch-sized chunk of steps

    def to_dict(self) -> dict:
        return asdict(self)


def fit(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    calib_ids: torch.Tensor,
    config: TrainConfig,
    *,
    steps: int,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
    probe_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FitLog:
    """AdamW on ``params`` minimising ``loss_fn(batch_ids)`` for ``steps`` steps; ``after_step`` runs after each.

    ``probe_fn`` (default ``loss_fn``) measures the loss on the first ``probe_windows`` windows in eval mode
    before and after, the number a test (and a user) checks to see that training did something.
    """
    n_windows, seqlen = calib_ids.shape
    probe_fn = probe_fn or loss_fn
    probe = calib_ids[: min(config.probe_windows, n_windows)]
    log = FitLog()

    def measure() -> float | None:
        if probe.shape[0] == 0:
            return None
        was_training = model.training
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, probe.shape[0], config.batch_size):
                batch = probe[start : start + config.batch_size]
                total += float(probe_fn(batch.to(device))) * batch.shape[0]
        model.train(was_training)
        return total / probe.shape[0]

    log.initial_loss = measure()
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    warmup_steps = int(config.warmup * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup_steps))
    chunk = max(1, math.ceil(n_windows / config.batch_size))  # one epoch of steps per curve point
    running, in_chunk = 0.0, 0
    torch.manual_seed(config.seed)  # dropout (LoRA) draws from the global generator
    began = time.perf_counter()
    model.train()
    try:
        for index in batch_order(n_windows, config.batch_size, steps, config.seed):
            batch = calib_ids[index].to(device)
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            log.steps += 1
            log.tokens += batch.numel()
            running += float(loss.detach())
            in_chunk += 1
            if in_chunk == chunk:
                log.curve.append(running / in_chunk)
                running, in_chunk = 0.0, 0
        if in_chunk:
            log.curve.append(running / in_chunk)
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    log.time_s = time.perf_counter() - began
    log.tokens_per_s = log.tokens / log.time_s if log.time_s else 0.0
    log.final_loss = measure()
    return log


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens (padding, where a mask says so, is ignored)."""
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Freeze every parameter of ``models`` for the ``with`` body; restore each one's flag afterwards."""
    flags = [(param, param.requires_grad) for model in models for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def make_config(method: str, presets: dict[str, Any], options: dict, default: str) -> Any:
    """The preset named by ``options["preset"]`` (else ``default``) with the other options as overrides.

    Unknown option names fail with one line listing the accepted ones, before any work.
    """
    options = dict(options)
    name = options.pop("preset", default)
    if name not in presets:
        raise UsageError(f"{method} preset {name!r} is not known; choose one of {', '.join(presets)}")
    base = presets[name]
    accepted = [f.name for f in fields(base)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(
            f"{method} does not accept option(s) {', '.join(unknown)}; accepted: preset, {', '.join(accepted)}"
        )
    return replace(base, **{k: v for k, v in options.items() if v is not None})
