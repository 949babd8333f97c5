"""What a recovery method is: its options and presets, what it supports, how it runs, what it writes.

A method is one file with a :class:`RecoveryMethod` subclass and one entry in ``sparsefit.recover.METHODS``.

* **Block-wise** methods (:class:`BlockwiseMethod`: EBFT, DSnoT) give the block driver
  (:func:`sparsefit.walk.run_blocks`) the steps to run on each block; the driver owns capture, targets,
  checkpoints and ``--resume``. The same steps run right after pruning each block (``prune --recover``,
  the interleaved order) or on an already sparse model against a dense teacher (two-step).
* **Whole-model** methods (:class:`ModelMethod`: SquareHead, LoRA, S²FT) train the whole model in the one
  training loop (:mod:`sparsefit.recover.training`).

Every option is checked by :meth:`RecoveryMethod.configure` before any model is loaded: an unknown or bad
option is one UsageError line naming what is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from sparsefit.errors import UsageError
from sparsefit.models.adapters import get_adapter
from sparsefit.progress import Bar, silent
from sparsefit.prune.pattern import Pattern
from sparsefit.recover.training import make_config
from sparsefit.walk.activations import Activations
from sparsefit.walk.blocks import InMemoryBlocks
from sparsefit.walk.checkpoint import BlockCheckpoint, FitCheckpoint
from sparsefit.walk.driver import run_blocks
from sparsefit.walk.targets import TeacherStep, check_teacher
from sparsefit.walk.walker import BlockStep

AUTO = "auto"  # the default preset: "cpu" on a CPU; "gpu" on a GPU, else "paper" (see preset_for)


@dataclass
class RecoveryContext:
    model: nn.Module  # the pruned model, changed in place (a meta skeleton when ``source`` streams its blocks)
    teacher: nn.Module | InMemoryBlocks  # the dense model it was pruned from, or a source of its blocks
    tokenizer: object
    calib_ids: torch.Tensor  # (N, L) calibration windows, the same for every method
    pattern: Pattern
    device: torch.device
    seed: int = 0
    budget_tokens: int | None = None  # token passes a training method may spend (None: its own default)
    batch_size: int = 8  # windows per forward pass when the driver propagates activations
    options: dict = field(default_factory=dict)  # method-specific settings, checked by ``configure``
    progress: Bar = silent
    checkpoint: BlockCheckpoint | None = None  # block-wise methods: save every block, resume from the last
    resume: bool = False
    fit_checkpoint: FitCheckpoint | None = None  # whole-model methods: save the fit now and then, resume from it
    # Quality of an intermediate model (``model -> dict``), for what the saved model cannot show: LoRA's
    # adapter before merging. ``sparsefit compare`` passes its perplexity evaluation; None skips it.
    evaluate: Callable[[nn.Module], dict] | None = None
    # Block-wise methods: where the sparse model's blocks live (None: in ``model``) and the activation sets.
    source: InMemoryBlocks | None = None
    activations: Activations | None = None


class RecoveryMethod:
    """Base class. Subclasses set ``name``, ``trains``, ``presets`` and implement ``run`` (through a subclass)."""

    name: str = ""
    trains: bool = True
    blockwise: bool = False
    presets: dict[str, Any] = {}
    writes: tuple[str, ...] = ()  # files the method adds to a run folder, besides recovery.json

    def preset_for(self, device: torch.device | None) -> str:
        """The default preset: ``cpu`` on a CPU; on a GPU ``gpu`` where the method has one, else ``paper``."""
        if "cpu" in self.presets and (device is None or device.type == "cpu"):
            return "cpu"
        for name in ("gpu", "paper"):
            if name in self.presets:
                return name
        return next(iter(self.presets))

    def accepted(self) -> list[str]:
        """Every option name ``configure`` accepts."""
        return ["preset", *(f.name for f in fields(next(iter(self.presets.values()))))]

    def configure(
        self, options: dict, n_windows: int | None = None, device: torch.device | None = None, seed: int | None = None
    ):
        """The method's config from ``options`` (a preset name and overrides); UsageError on a bad option.

        ``seed`` is the run's seed, used when the method has one and the options do not set it.
        """
        options = self.normalize(dict(options))
        if options.get("preset") == AUTO:
            options["preset"] = None  # make_config's default: the preset for this device
        if seed is not None and "seed" in self.accepted():
            options.setdefault("seed", seed)
        config = make_config(self.name, self.presets, options, default=self.preset_for(device))
        config.validate(self.name, n_windows)
        return config

    def normalize(self, options: dict) -> dict:
        """Options as given on a command line or in a recipe, turned into the config's types."""
        return options

    def supports(self, pattern: Pattern) -> str | None:
        """None when the method can run with ``pattern``, else the reason it cannot."""
        return None

    def check_model(self, model: nn.Module, config) -> str | None:
        """None when the method can run on ``model`` (its architecture, its layers), else the reason."""
        return None

    def check(self, model: nn.Module, config) -> None:
        reason = self.check_model(model, config)
        if reason:
            raise UsageError(reason)

    def with_budget(self, config, budget_tokens: int | None, n_windows: int, seqlen: int):
        """The config that spends ``budget_tokens`` token passes per block (None: as configured)."""
        return config

    def run(self, ctx: RecoveryContext, config=None) -> dict:
        """Recover ``ctx.model`` in place; return a report with at least ``config`` and ``trainable_params``."""
        raise NotImplementedError

    def artifacts(self, report: dict) -> dict[str, bytes]:
        """The files this method writes into a run folder, by name (``recovery.json`` is always written)."""
        return {}

    def markdown(self, report: dict) -> str | None:
        """A Markdown section on what the method did, for reports (None: nothing beyond the numbers)."""
        return None

    @staticmethod
    def blocks_of(model: nn.Module) -> nn.ModuleList:
        return get_adapter(model).get_blocks(model)

    def _config(self, ctx: RecoveryContext, config):
        if config is None:
            config = self.configure(ctx.options, ctx.calib_ids.shape[0], ctx.device, seed=ctx.seed)
        return config


class BlockwiseMethod(RecoveryMethod):
    """A method that works one block at a time through the block driver."""

    blockwise = True
    def needs_teacher_block(self, config) -> bool:
        """True when its steps read ``ctx.teacher_block`` (the dense block) with this config."""
        return False

    def target(self, config) -> str | None:
        """The reconstruction target its steps need in ``ctx.dense_outputs`` (None: none)."""
        return None

    def block_steps(self, config, pattern: Pattern) -> list[BlockStep]:
        raise NotImplementedError

    def summarize(self, config, reports: list[dict], blocks: Iterable[nn.Module]) -> dict:
        """The method's report from the walk's block ``reports`` and the finished ``blocks`` (one pass over them:
        on the streamed path each is read back from disk in turn)."""
        raise NotImplementedError

    def run(self, ctx: RecoveryContext, config=None) -> dict:
        """Two-step: walk the sparse model, each block against the teacher's block at the same depth."""
        config = self._config(ctx, config)
        n_windows, seqlen = ctx.calib_ids.shape
        config = self.with_budget(config, ctx.budget_tokens, n_windows, seqlen)
        teacher = ctx.teacher.model if isinstance(ctx.teacher, InMemoryBlocks) else ctx.teacher
        check_teacher(ctx.model, teacher, same_shapes=not ctx.pattern.slim)
        self.check(ctx.model, config)
        steps = [TeacherStep(ctx.teacher, target=self.target(config), keep_block=self.needs_teacher_block(config)),
                 *self.block_steps(config, ctx.pattern)]  # fmt: skip
        result = run_blocks(ctx.model, ctx.calib_ids, steps, device=ctx.device, batch_size=ctx.batch_size,
                            checkpoint=ctx.checkpoint, resume=ctx.resume, progress=ctx.progress,
                            label=self.name, source=ctx.source, activations=ctx.activations)  # fmt: skip
        blocks = (block for _, block in ctx.source.finished()) if ctx.source is not None else self.blocks_of(ctx.model)
        return self.summarize(config, result["blocks"], blocks)


class ModelMethod(RecoveryMethod):
    """A method that trains the whole model in the one training loop."""

    def fit(self, ctx: RecoveryContext, config) -> dict:
        raise NotImplementedError

    def run(self, ctx: RecoveryContext, config=None) -> dict:
        config = self._config(ctx, config)
        self.check(ctx.model, config)
        return self.fit(ctx, config)


def report_json(name: str, report: dict) -> bytes:
    """``recovery.json``: the method's name and report (callables and tensors stringified; files, the report's
    bytes values, left to :meth:`RecoveryMethod.artifacts`)."""
    kept = {key: value for key, value in report.items() if not isinstance(value, (bytes, bytearray))}
    return json.dumps({"method": name, **kept}, indent=2, default=str).encode()


def read_adapter_file(path, kind: str, file_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of the ``kind`` adapter file at ``path`` (LoRA's or S²FT's), one UsageError line when it
    cannot be read or is not of ``file_format``."""
    from safetensors import safe_open

    where = str(path)
    try:
        with safe_open(where, framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{kind} adapter {where!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != file_format:
        raise UsageError(f"{where!r} is not an adapter file of {kind} (format {meta.get('format')!r})")
    return meta, tensors
