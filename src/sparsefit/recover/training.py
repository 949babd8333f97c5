"""The one training loop: EBFT's block fits and the whole-model methods (SquareHead, LoRA, S²FT) all run here.

AdamW, a linear schedule (with an optional linear warm-up), gradient clipping, seeded shuffling of the windows
(every epoch a fresh permutation from one generator), an optional held-out loss after each epoch that keeps the
best state seen, the initial one included (so a fit never ends worse than it began on its held-out windows), with
optional early stopping, and a progress callback per step. What a method trains and what loss it
minimises are its own; the loop only sees ``loss_of(window_indices)``.

A token budget counts token passes through every block: one optimizer step over ``batch x seqlen`` tokens spends
``batch x seqlen`` of it, the same unit EBFT spends per block, so ``--budget`` makes the methods comparable.
"""

from __future__ import annotations

import math
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from sparsefit.data.task import TaskBatch, TaskSet
from sparsefit.distributed import WindowShard, all_reduce_sum, sum_values
from sparsefit.errors import FileError, UsageError, check
from sparsefit.progress import Update
from sparsefit.walk.checkpoint import FitCheckpoint
from sparsefit.walk.masks import Masks, apply_masks, mask_gradients, model_layers, pruned_count


@dataclass
class FitConfig:
    """The loop's hyper-parameters; every method that trains extends this with its own fields and defaults."""

    lr: float = 1e-4
    epochs: int = 4  # passes over the training windows (a token budget, when given, sets the steps instead)
    batch_size: int = 2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0  # gradient-norm clipping over the trained (masked) gradients; 0: none
    warmup: float = 0.0  # share of the steps with a linear warm-up; then decay to zero by the schedule
    schedule: str = "linear"  # the decay after warm-up: linear (EBFT's) or cosine
    warmup_steps: int = 0  # or a number of warm-up steps (the larger of the two counts)
    micro_batch: int = 0  # windows per forward/backward, gradients accumulated over the batch (0: the whole batch)
    heldout: int = 0  # calibration windows kept out of training, for the held-out loss after each epoch
    early_stop: int = 0  # stop after this many epochs without held-out improvement and keep the best (0: never)
    keep_best: bool = True  # with held-out windows: end on the best held-out state, the initial one included
    seed: int = 0

    def validate(self, name: str, n_windows: int | None = None) -> None:
        for item in fields(self):  # a nan or inf passes every comparison below unnoticed (nan > 0 is False...)
            value = getattr(self, item.name)
            check(not isinstance(value, float) or math.isfinite(value),
                  f"{name} {item.name} {value} must be a finite number")  # fmt: skip
        check(self.lr is not None and self.lr > 0, f"{name} lr {self.lr} must be > 0")
        check(isinstance(self.epochs, int) and self.epochs >= 1, f"{name} epochs {self.epochs} must be >= 1")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"{name} batch {self.batch_size} must be >= 1")
        check(self.weight_decay >= 0, f"{name} weight decay {self.weight_decay} must be >= 0")
        betas_ok = 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1
        check(betas_ok, f"{name} betas ({self.beta1}, {self.beta2}) must be in [0, 1)")
        check(self.clip >= 0, f"{name} clip {self.clip} must be >= 0 (0: no clipping)")
        check(0 <= self.warmup < 1, f"{name} warmup {self.warmup} must be a share of the steps in [0, 1)")
        check(self.schedule in SCHEDULES, f"{name} schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
              f"{name} warmup steps {self.warmup_steps!r} must be an integer >= 0")  # fmt: skip
        check(isinstance(self.micro_batch, int) and self.micro_batch >= 0,
              f"{name} micro batch {self.micro_batch!r} must be an integer >= 0 (0: the whole batch)")  # fmt: skip
        heldout_ok = isinstance(self.heldout, int) and self.heldout >= 0
        check(heldout_ok, f"{name} held-out windows {self.heldout} must be >= 0")
        check(self.early_stop >= 0, f"{name} early stop patience {self.early_stop} must be >= 0")
        check(self.early_stop == 0 or self.heldout > 0, f"{name} early stop needs held-out windows; set heldout > 0")
        if n_windows is not None:
            train = n_windows - self.heldout
            check(train >= 1, f"{name} held-out windows {self.heldout} leave no training window out of {n_windows}")
            check(
                self.batch_size <= train,
                f"{name} batch {self.batch_size} is larger than the {train} training windows; "
                "lower the batch or add calibration samples",
            )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_REFUSED = object()  # what _converted returns for a value that does not fit the type
_TRUE, _FALSE = ("1", "true", "t", "yes", "y", "on"), ("0", "false", "f", "no", "n", "off")  # click's BOOL words
_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def field_types(cls: type) -> dict[str, Any]:
    """Each field of the dataclass ``cls`` with its type, resolved (the annotations are strings here)."""
    hints = typing.get_type_hints(cls)
    return {item.name: hints[item.name] for item in fields(cls)}


def convert_value(value: Any, kind: Any, key: str) -> Any:
    """``value`` (from ``-o KEY=VALUE``, a recipe or an option) as the type ``kind`` of the field it sets, the way
    the command line converts its own options: ``"4"`` is 4 for an int, ``"1e-3"`` is 0.001 for a float, ``"a,b"``
    is ``("a", "b")`` for a tuple of names, 2 is ``"2"`` for a string. Anything else is one UsageError line naming
    ``key``, the value and the type expected; so is every nan or inf."""
    converted = _converted(value, kind)
    if converted is _REFUSED:
        raise UsageError(f"{key} {value!r} must be {_describe(kind)}")
    return converted


def convert_values(values: dict, types: dict[str, Any], where: str) -> dict:
    """Every value of ``values`` converted by :func:`convert_value` to its key's type in ``types`` (keys without
    one pass unchanged); ``where`` heads each key in an error (``"recipe prune"``)."""
    return {key: convert_value(value, types[key], f"{where} {key}") if key in types else value
            for key, value in values.items()}  # fmt: skip


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(kind) if member is not type(None))
    if typing.get_origin(kind) in (list, tuple):
        return "a list of names (or one name, or names separated by commas)"
    return _KINDS.get(kind, getattr(kind, "__name__", str(kind)))


def _converted(value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        for member in typing.get_args(kind):
            if member is not type(None) and (converted := _converted(value, member)) is not _REFUSED:
                return converted
        return _REFUSED
    if origin in (list, tuple):  # a command line gives names separated by commas, a recipe a list (or one name)
        items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            return _REFUSED
        item_kind = next(iter(typing.get_args(kind)), Any)
        converted = [_converted(item, item_kind) for item in items]
        return _REFUSED if any(item is _REFUSED for item in converted) else origin(converted)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = value.strip().lower() if isinstance(value, str) else None
        return True if text in _TRUE else False if text in _FALSE else _REFUSED
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(value.strip()) if isinstance(value, str) else _REFUSED
        except ValueError:
            return _REFUSED
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return _REFUSED
        else:
            return _REFUSED
        return number if math.isfinite(number) else _REFUSED
    if kind is str:
        if isinstance(value, str):
            return value
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else _REFUSED
    if isinstance(kind, type) and kind is not type(None):
        return value if isinstance(value, kind) else _REFUSED
    return value  # Any, or a type this converter does not know: the config's own checks judge it


def make_config(method: str, presets: dict[str, Any], options: dict, default: str) -> Any:
    """The preset named by ``options["preset"]`` (else ``default``) with the other options as overrides.

    Unknown option names fail with one line listing the accepted ones, before any work. None keeps the
    preset's value (an option the user did not give). Every other value is converted to its field's type
    (:func:`convert_value`), so a bad one is one line too, not a TypeError in the method's checks.
    """
    options = dict(options)
    name = options.pop("preset", None) or default
    if not isinstance(name, str) or name not in presets:
        raise UsageError(f"{method} preset {name!r} is not known; choose one of {', '.join(presets)}")
    base = presets[name]
    accepted = [f.name for f in fields(base)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(
            f"{method} does not accept option(s) {', '.join(unknown)}; accepted: preset, {', '.join(accepted)}"
        )
    given = convert_values({k: v for k, v in options.items() if v is not None}, field_types(type(base)),
                           f"{method} option")  # fmt: skip
    try:
        return replace(base, **given)
    except TypeError as exc:
        raise UsageError(f"{method} options {options!r} are not valid ({exc})") from None


def plan_steps(budget_tokens: int | None, n_windows: int, seqlen: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps: ``ceil(budget / (batch * seqlen))`` with a budget, else ``epochs`` passes over the windows."""
    if budget_tokens is not None:
        check(budget_tokens > 0, f"token budget {budget_tokens} must be a positive number of tokens")
        return max(1, math.ceil(budget_tokens / (batch_size * seqlen)))
    return epochs * math.ceil(n_windows / batch_size)


GROUP_BY_LENGTH = 50  # examples of different lengths: batches drawn from runs of 50 batches sorted by length


def batch_order(n_windows: int, batch_size: int, steps: int, seed: int,
                lengths: Sequence[int] | None = None) -> Iterator[torch.Tensor]:  # fmt: skip
    """Window indices for ``steps`` batches: reshuffled epochs (the last batch of an epoch may be short).

    With ``lengths`` (task examples), batches are grouped by length as the Hugging Face Trainer's
    ``group_by_length`` does: each epoch's permutation is cut into runs of ``GROUP_BY_LENGTH`` batches, each run is
    sorted by length (longest first), so a batch pads little and the order stays random across runs."""
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        order = torch.randperm(n_windows, generator=generator)
        if lengths is not None:
            run = GROUP_BY_LENGTH * batch_size
            order = torch.cat([part[torch.argsort(torch.tensor([lengths[i] for i in part.tolist()]),
                                                  descending=True, stable=True)]
                               for part in order.split(run)])  # fmt: skip
        for start in range(0, n_windows, batch_size):
            if done >= steps:
                return
            yield order[start : start + batch_size]
            done += 1


SCHEDULES = ("linear", "cosine")


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str = "linear") -> float:
    """Linear warm-up over ``warmup_steps``, then decay to zero at ``total``: linear (EBFT's, without warm-up)
    or half a cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * done)) if schedule == "cosine" else max(0.0, 1 - done)


@dataclass
class FitLog:
    """What one run of the loop did."""

    steps: int = 0
    windows: int = 0  # windows passed through the model while training
    time_s: float = 0.0
    curve: list[float] = field(default_factory=list)  # mean training loss per epoch (weighted by windows)
    heldout_curve: list[float] = field(default_factory=list)  # held-out loss after each epoch
    epochs_run: int = 0
    best_epoch: int | None = None  # with keep_best / early stopping: the epoch whose state was kept (0: the initial)
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


ParamsOrGroups = Sequence[nn.Parameter] | Sequence[dict]


def flat_params(params: ParamsOrGroups) -> list[nn.Parameter]:
    """The parameters of a list of parameters or of AdamW parameter groups."""
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


def train_loop(
    module: nn.Module,
    params: ParamsOrGroups,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n_train: int,
    config: FitConfig,
    *,
    steps: int,
    seed: int,
    after_step: Callable[[], None] | None = None,
    heldout_loss: Callable[[], float] | None = None,
    initial_heldout: float | None = None,
    initial_state: list[torch.Tensor] | None = None,
    progress: Update | None = None,
    shard: WindowShard | None = None,
    lengths: Sequence[int] | None = None,
    checkpoint: FitCheckpoint | None = None,
) -> FitLog:
    """AdamW on ``params`` minimising ``loss_of(indices of a batch of training windows)`` for ``steps`` steps.

    ``params``: parameters, or AdamW groups (dicts) when some kinds take other settings (no decay on norms).
    ``module`` is switched to train mode for each epoch (the held-out evaluation may switch it to eval).
    ``heldout_loss()`` runs after every epoch. With ``config.keep_best`` (or early stopping) the trained
    parameters end at the best held-out epoch, or at their initial values when no epoch beat
    ``initial_heldout`` (``log.best_epoch`` 0). ``config.early_stop`` stops after that many epochs without
    improvement. Everything random derives from ``seed``: the shuffling generator and the global one (dropout).

    Under torchrun (``shard`` of several ranks) ``n_train`` counts every rank's training windows; the batches
    follow one process's global order, ``loss_of`` gets the local positions of the batch's windows this rank holds
    (weighted by their share of the batch, as micro-batches are), and the gradients and the loss are summed over
    the ranks before clipping, so every rank takes the same step. ``heldout_loss`` must reduce over the ranks.
    ``lengths`` (task examples of different lengths): batches grouped by length (:func:`batch_order`).
    ``initial_state``: the trained parameters' values at the start when the caller keeps a copy already (read,
    never written), so that the loop does not take a second one.
    ``checkpoint``: saves the fit's state now and then and when interrupted between steps; a resuming one gives it
    back here (the parameters as they were before the first step, so the best state 0 stays the start) and the
    loop continues from the saved step as if it had not stopped (:class:`~sparsefit.walk.checkpoint.FitCheckpoint`).
    """
    shard = shard if shard is not None else WindowShard(n_train)
    # torch.optim writes its defaults (the lr among them) into a group dict: a copy keeps the caller's groups
    # clean for the next fit (a fit redone at a lower rate).
    params = [dict(item) if isinstance(item, dict) else item for item in params]
    for item in params:  # a group's rate relative to the config's (a weight's scale, EBFT's lr_scale)
        if isinstance(item, dict) and "lr_scale" in item:
            item["lr"] = config.lr * item.pop("lr_scale")
    flat = flat_params(params)
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    warmup_steps = min(steps, max(int(config.warmup * steps), config.warmup_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup_steps, config.schedule)
    )
    per_epoch = max(1, math.ceil(n_train / config.batch_size))
    torch.manual_seed(seed)  # dropout (LoRA) draws from the global generator
    log = FitLog()
    tracking = heldout_loss is not None and (config.keep_best or config.early_stop > 0)
    # Only the trained parameters can change, so they are the state to keep (a block's, or LoRA's adapters). At
    # most two copies are held: the start (the caller's, or taken here) and the best epoch's, overwritten in place.
    best_state = None
    if tracking and initial_heldout is not None:
        best_state = initial_state if initial_state is not None else [p.detach().clone() for p in flat]
    # Whether best_state is this loop's own copy, to overwrite (the start is not needed again once an epoch beat
    # it), or the caller's start, never written (or none yet).
    own_best = best_state is not None and initial_state is None
    best, stale, best_epoch = initial_heldout, 0, 0
    running, in_epoch = 0.0, 0
    began = time.perf_counter()
    done = 0  # steps taken before this call (a resumed fit)
    saved = checkpoint.start(began) if checkpoint is not None else None
    if saved is not None:
        done, loop, tensors = saved
        best_state, own_best = _restore(optimizer, scheduler, flat, loop, tensors, best_state, own_best)
        log = FitLog(**loop["log"])
        running, in_epoch = loop["running"], loop["in_epoch"]
        best, stale, best_epoch = loop["best"], loop["stale"], loop["best_epoch"]
        began -= log.time_s
        if progress is not None:
            progress(done=done, note=f"resumed after step {done}")

    def save(step: int, rng: torch.Tensor) -> None:
        log.time_s = time.perf_counter() - began
        loop = {"log": log.to_dict(), "running": running, "in_epoch": in_epoch, "best": best, "stale": stale,
                "best_epoch": best_epoch, "schedule": scheduler.state_dict()}  # fmt: skip
        checkpoint.save(step, loop, _fit_tensors(optimizer, flat, best_state if own_best else None, rng),
                        time.perf_counter())  # fmt: skip

    # Between two steps the trained state is whole: an interruption there is saved (the step's forward and backward
    # change nothing but gradients and, through dropout, the random state, kept from the step's start).
    between_steps, rng = True, torch.get_rng_state()
    try:
        for step, index in enumerate(batch_order(n_train, config.batch_size, steps, seed, lengths)):
            if step < done:
                continue
            if step % per_epoch == 0 or step == done:
                module.train()
            mine = shard.local(index)  # the whole batch in one process
            # Gradient accumulation: the batch's mean loss, in micro-batches that fit in memory (and in ranks).
            micro = config.micro_batch if config.micro_batch and config.micro_batch < mine.numel() else mine.numel()
            optimizer.zero_grad(set_to_none=True)
            value = 0.0
            for chunk in mine.split(micro) if mine.numel() else ():
                part = loss_of(chunk)
                if chunk.numel() != index.numel():
                    part = part * (chunk.numel() / index.numel())
                part.backward()
                value += part.item()
            if not shard.single:
                value = _reduce_gradients(flat, value)
            between_steps = False
            if config.clip:
                torch.nn.utils.clip_grad_norm_(flat, config.clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            log.steps += 1
            log.windows += index.numel()
            running += value * index.numel()
            in_epoch += index.numel()
            epoch_done = (step + 1) % per_epoch == 0 or step + 1 == steps
            if progress is not None:
                progress(done=step + 1, note=f"loss {value:.4g}")
            if epoch_done:
                log.curve.append(running / in_epoch)
                running, in_epoch = 0.0, 0
                log.epochs_run += 1
            if epoch_done and heldout_loss is not None:
                held = heldout_loss()
                log.heldout_curve.append(held)
                if tracking and (best is None or held < best):
                    best, stale, best_epoch = held, 0, log.epochs_run
                    if own_best:
                        with torch.no_grad():
                            for kept, param in zip(best_state, flat, strict=True):
                                kept.copy_(param)
                    else:
                        best_state, own_best = [p.detach().clone() for p in flat], True
                elif tracking:
                    stale += 1
                    log.stopped_early = bool(config.early_stop) and stale >= config.early_stop
            between_steps, rng = True, torch.get_rng_state()
            if checkpoint is not None and checkpoint.due(step + 1, time.perf_counter()):
                save(step + 1, rng)
            if log.stopped_early:
                break
    except KeyboardInterrupt:
        if checkpoint is not None and between_steps and log.steps > checkpoint.saved_step:
            save(log.steps, rng)
        raise
    finally:
        module.eval()
        optimizer.zero_grad(set_to_none=True)
    if tracking and log.heldout_curve:
        log.best_epoch = best_epoch
        if best_epoch != log.epochs_run and best_state is not None:
            with torch.no_grad():  # end on the best held-out state (0: the initial one)
                for param, kept in zip(flat, best_state, strict=True):
                    param.copy_(kept)
    log.time_s = time.perf_counter() - began
    return log


def _fit_tensors(optimizer: torch.optim.Optimizer, flat: list[nn.Parameter], best_state: list[torch.Tensor] | None,
                 rng: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """What a :class:`FitCheckpoint` keeps of a fit: the trained tensors, AdamW's state of each, the best held-out
    state when it is not the start, the global random state (dropout) and, on a GPU, CUDA's."""
    tensors = {f"param.{i}": p.detach() for i, p in enumerate(flat)}
    for i, param in enumerate(flat):
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optimizer.{i}.{key}"] = value.detach() if torch.is_tensor(value) else torch.tensor(value)
    for i, kept in enumerate(best_state or []):
        tensors[f"best.{i}"] = kept
    tensors["rng.cpu"] = rng
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _restore(optimizer: torch.optim.Optimizer, scheduler, flat: list[nn.Parameter], loop: dict,
             tensors: dict[str, torch.Tensor], best_state: list[torch.Tensor] | None,
             own_best: bool) -> tuple[list[torch.Tensor] | None, bool]:  # fmt: skip
    """Put a saved fit back: parameters, AdamW's state, the schedule, the random state; returns the best state
    (the saved one when an epoch had beaten the start, else the start as taken) and whether it is the loop's own."""
    shapes = [tuple(tensors.get(f"param.{i}", torch.empty(0)).shape) for i in range(len(flat))]
    if shapes != [tuple(p.shape) for p in flat] or f"param.{len(flat)}" in tensors:
        raise FileError("the saved fit's tensors do not match the parameters this run trains; run again without "
                        "--resume to start over")
    with torch.no_grad():
        for i, param in enumerate(flat):
            param.copy_(tensors[f"param.{i}"])
            prefix = f"optimizer.{i}."
            state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
            for key in state.keys() - {"step"}:  # AdamW's moments beside their parameter; its step count on the CPU
                state[key] = state[key].to(param.device)
            if state:
                optimizer.state[param] = state
    scheduler.load_state_dict(loop["schedule"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if loop["best_epoch"]:  # an epoch beat the start: its saved state is the loop's own from here on
        return [tensors[f"best.{i}"].to(p.device) for i, p in enumerate(flat)], True
    return best_state, own_best


def _reduce_gradients(params: list[nn.Parameter], value: float) -> float:
    """Sum the gradients (and the step's loss) over the ranks; a rank without windows in the batch adds zeros."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    loss = torch.tensor([value], dtype=params[0].grad.dtype, device=params[0].grad.device)
    all_reduce_sum(*(param.grad for param in params), loss)
    return float(loss.item())


@torch.no_grad()
def mean_loss(module: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, batch: int,
              offset: int = 0, shard: WindowShard | None = None) -> float | None:  # fmt: skip
    """Mean of ``loss_of(indices)`` over windows ``offset .. offset + n`` in eval mode (None if n = 0).

    With a ``shard`` of several ranks, each rank takes its windows of that range (``loss_of`` gets local positions)
    and the sums are reduced over the ranks.
    """
    if n == 0:
        return None
    was_training = module.training
    module.eval()
    total = 0.0
    local = shard.local_range(offset, offset + n) if shard is not None else torch.arange(offset, offset + n)
    for index in local.split(batch) if local.numel() else ():
        total += float(loss_of(index)) * index.numel()
    module.train(was_training)
    if shard is not None and not shard.single:
        total = sum_values(total)[0]
    return total / n


@dataclass
class TrainConfig(FitConfig):
    """The whole-model methods' loop settings: :class:`FitConfig` plus the windows probed before and after."""

    probe_windows: int = 8  # calibration windows on which the loss is measured before and after training

    def validate(self, name: str, n_windows: int | None = None) -> None:
        super().validate(name, n_windows)
        check(self.probe_windows >= 0, f"{name} probe windows {self.probe_windows} must be >= 0")


def loop_config(config: FitConfig, **overrides: Any) -> TrainConfig:
    """The shared loop's part of a method's config, with ``overrides``."""
    return TrainConfig(**{**{f.name: getattr(config, f.name) for f in fields(TrainConfig)}, **overrides})


def fit_model(
    model: nn.Module,
    params: ParamsOrGroups,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    calib_ids: torch.Tensor,
    config: TrainConfig,
    *,
    steps: int,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
    probe_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Update | None = None,
    checkpoint: FitCheckpoint | None = None,
) -> dict:
    """Train a whole model: ``loss_fn(batch_ids)`` on the calibration windows (the last ``heldout`` held out).

    ``calib_ids`` may also be a :class:`~sparsefit.data.task.TaskSet` of task examples: ``loss_fn`` then gets a
    :class:`~sparsefit.data.task.TaskBatch` (tokens, attention mask, labels) and batches are grouped by length.

    ``checkpoint``: the fit saves its state there and, resuming, continues from it (:func:`train_loop`).

    ``probe_fn`` (default ``loss_fn``) measures the loss on the first ``probe_windows`` windows in eval mode
    before and after: the number a test (and a user) checks to see that training did something.

    Never worse than it began: with held-out windows the loop keeps the best held-out state (the start
    included); without, and with ``config.keep_best``, the trained parameters go back to their start (a CPU
    copy) when the probe loss rose, and the result says ``reverted``.
    """
    n_windows, seqlen = calib_ids.shape
    n_train = n_windows - config.heldout
    probe_fn = probe_fn or loss_fn
    shard = WindowShard.of(n_windows)  # under torchrun: this rank's windows (data parallel)
    local_ids = shard.take(calib_ids)

    def on_windows(fn):
        return lambda index: fn(local_ids[index].to(device))

    probe = min(config.probe_windows, n_windows)

    def probe_loss(n: int, offset: int = 0) -> float | None:
        return mean_loss(model, on_windows(probe_fn), n, config.batch_size, offset, shard=shard)

    initial = probe_loss(probe)
    params = list(params)
    start = ([p.detach().to("cpu", copy=True) for p in flat_params(params)]
             if config.keep_best and not config.heldout and probe else None)  # fmt: skip
    held = (lambda: probe_loss(config.heldout, n_train)) if config.heldout else None
    log = train_loop(
        model, params, on_windows(loss_fn), n_train, config, steps=steps, seed=config.seed, after_step=after_step,
        heldout_loss=held, initial_heldout=held() if held else None, progress=progress, shard=shard,
        lengths=calib_ids.lengths[:n_train] if isinstance(calib_ids, TaskSet) else None, checkpoint=checkpoint,
    )  # fmt: skip
    result = log.to_dict()
    result["tokens"] = log.windows * seqlen  # task examples: an upper bound (seqlen is the longest example)
    result["tokens_per_s"] = result["tokens"] / log.time_s if log.time_s else 0.0
    result["initial_loss"] = initial
    result["final_loss"] = probe_loss(probe)
    result["reverted"] = start is not None and result["final_loss"] > initial
    if result["reverted"]:
        with torch.no_grad():
            for param, value in zip(flat_params(params), start, strict=True):
                param.copy_(value)
        result["final_loss"] = probe_loss(probe)
    return result


def fit_masked(
    model: nn.Module,
    loss_fn: Callable,
    calib_ids: torch.Tensor | TaskSet,
    config: TrainConfig,
    masks: Masks,
    *,
    steps: int,
    device: torch.device,
    train_embeddings: bool = True,
    progress: Update | None = None,
    checkpoint: FitCheckpoint | None = None,
) -> tuple[dict, int]:
    """Train every parameter of ``model`` (embeddings too unless ``train_embeddings`` is False) by
    :func:`fit_model`, keeping ``masks``: pruned weights get zero gradients before clipping and are zeroed again
    after every step, so they end exactly zero. Returns the fit's report and the number of trained parameters
    (the kept linear weights plus every other trained parameter). The model ends on the CPU."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks: list = []
    model.to(device)
    try:
        for param in model.parameters():
            param.requires_grad_(True)
        if not train_embeddings:
            for module in model.get_input_embeddings(), model.get_output_embeddings():
                if module is not None:
                    module.weight.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        hooks = mask_gradients(model_layers(model), masks)  # before clipping sees them
        log = fit_model(model, params, loss_fn, calib_ids, config, steps=steps, device=device,
                        after_step=lambda: apply_masks(model, masks), progress=progress,
                        checkpoint=checkpoint)  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
        model.to("cpu")
    apply_masks(model, masks)
    linear = {id(layer.weight) for layer in model_layers(model).values()}
    kept = sum(keep.numel() for keep in masks.values()) - pruned_count(masks)
    return log, kept + sum(p.numel() for p in params if id(p) not in linear)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor | TaskBatch,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean next-token cross-entropy over real tokens (padding, where a mask says so, is ignored); for a
    :class:`TaskBatch`, over its completion tokens only."""
    if isinstance(ids, TaskBatch):
        return model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, labels=ids.labels,
                     use_cache=False).loss  # fmt: skip
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
