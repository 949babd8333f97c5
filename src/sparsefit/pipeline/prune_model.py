"""Prune a whole model block by block: calibration windows -> capture -> walk (prune, then recover)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsefit.errors import UsageError, check
from sparsefit.models.adapters import get_adapter
from sparsefit.pipeline.capture import capture_inputs
from sparsefit.pipeline.prune_step import PruneStep
from sparsefit.pipeline.walker import BlockContext, BlockStep, walk_blocks
from sparsefit.prune import PRUNERS, parse_pattern


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    return device


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    calib: str = "wiki"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    sparsegpt_update: bool = True  # False: SparseGPT masks only (what the EBFT release does)

    def validate(self) -> None:
        check(self.method in PRUNERS, f"unknown method {self.method!r}; choose one of {', '.join(PRUNERS)}")
        check(
            0.0 <= self.sparsity < 1.0,
            f"sparsity {self.sparsity} is outside [0, 1); give a fraction such as 0.5",
        )
        parse_pattern(self.pattern)
        check(self.nsamples > 0, f"nsamples {self.nsamples} must be a positive number of windows")
        check(self.seqlen > 0, f"seqlen {self.seqlen} must be a positive number of tokens")
        check(self.batch_size > 0, f"batch size {self.batch_size} must be positive")
        resolve_device(self.device)

    def pruner_options(self) -> dict:
        return {"update_weights": self.sparsegpt_update} if self.method == "sparsegpt" else {}

    def to_dict(self) -> dict:
        return asdict(self)


def check_pattern_fits(model: nn.Module, pattern_text: str) -> None:
    """Fail before any work when M does not divide some layer's input width."""
    pattern = parse_pattern(pattern_text)
    from sparsefit.models.adapters import prunable_layers, weight_matrix

    for block in get_adapter(model).get_blocks(model):
        for layer in prunable_layers(block).values():
            pattern.validate_width(weight_matrix(layer).shape[1])


def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    config: PruneConfig,
    *,
    steps_before: Sequence[BlockStep] = (),
    recover_steps: Sequence[BlockStep] = (),
    keep_dense_outputs: bool | None = None,
    on_block_done: Callable[[BlockContext, torch.Tensor], None] | None = None,
    progress: Callable[[int, str], None] | None = None,
    start: int = 0,
    inputs: torch.Tensor | None = None,
) -> dict:
    """Prune ``model`` in place with ``config`` on calibration windows ``calib_ids`` (N, L).

    ``steps_before`` run on each block before it is pruned (e.g. dense-path targets);
    ``recover_steps`` right after (interleaved recovery, the EBFT order). The prune step keeps the
    dense outputs as targets when ``keep_dense_outputs`` (default: when there are recover steps).
    ``start``/``inputs`` resume a walk at a later block with that block's inputs.
    Returns timings and per-block reports.
    """
    config.validate()
    check_pattern_fits(model, config.pattern)
    device = resolve_device(config.device)
    adapter = get_adapter(model)
    pattern = parse_pattern(config.pattern)
    began = time.perf_counter()
    captured, block_kwargs = capture_inputs(model, adapter, calib_ids, device=device, batch_size=config.batch_size)
    if inputs is None:
        inputs = captured
    del captured
    capture_s = time.perf_counter() - began
    step = PruneStep(
        config.method,
        config.sparsity,
        pattern,
        options=config.pruner_options(),
        keep_dense_outputs=bool(recover_steps) if keep_dense_outputs is None else keep_dense_outputs,
    )
    reports: list[dict] = []

    def done(ctx: BlockContext, outputs: torch.Tensor) -> None:
        reports.append({"block": ctx.index, **ctx.report})
        if on_block_done:
            on_block_done(ctx, outputs)

    walk_blocks(
        model,
        adapter,
        inputs,
        block_kwargs,
        [*steps_before, step, *recover_steps],
        device=device,
        batch_size=config.batch_size,
        start=start,
        on_block_done=done,
        progress=progress,
    )
    model.to("cpu")
    return {"capture_s": capture_s, "total_s": time.perf_counter() - began, "blocks": reports}
