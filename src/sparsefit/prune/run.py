"""Prune a whole model block by block: the pruning settings and the walk through the one block driver."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsefit.errors import check
from sparsefit.models.adapters import weight_matrix
from sparsefit.progress import Bar, silent
from sparsefit.prune.pattern import parse_pattern
from sparsefit.prune.registry import PRUNERS
from sparsefit.prune.step import PruneStep
from sparsefit.walk.checkpoint import BlockCheckpoint
from sparsefit.walk.device import resolve_device
from sparsefit.walk.driver import run_blocks
from sparsefit.walk.masks import model_layers
from sparsefit.walk.walker import Step


@dataclass
class PruneConfig:
    """What to prune and on which calibration windows; the defaults are the CLI's (``sparsefit prune --help``)."""

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

    def label(self) -> str:
        return f"{self.method} {self.sparsity if self.pattern == 'unstructured' else self.pattern}"

    def to_dict(self) -> dict:
        return asdict(self)


def check_pattern_fits(model: nn.Module, pattern_text: str) -> None:
    """Fail before any work when M does not divide some layer's input width."""
    pattern = parse_pattern(pattern_text)
    for layer in model_layers(model).values():
        pattern.validate_width(weight_matrix(layer).shape[1])


def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    config: PruneConfig,
    *,
    steps_before: Sequence[Step] = (),
    recover_steps: Sequence[Step] = (),
    keep_dense_outputs: bool | None = None,
    checkpoint: BlockCheckpoint | None = None,
    resume: bool = False,
    progress: Bar = silent,
) -> dict:
    """Prune ``model`` in place with ``config`` on calibration windows ``calib_ids`` (N, L).

    ``steps_before`` run on each block before it is pruned (the teacher step: dense-path targets, a copy
    of the dense block); ``recover_steps`` right after (interleaved recovery, the EBFT order). The prune
    step keeps the dense outputs as targets when ``keep_dense_outputs`` (default: when there are recover
    steps). Returns the driver's result: per-block reports and timings.
    """
    config.validate()
    check_pattern_fits(model, config.pattern)
    step = PruneStep(
        config.method,
        config.sparsity,
        parse_pattern(config.pattern),
        options=config.pruner_options(),
        keep_dense_outputs=bool(recover_steps) if keep_dense_outputs is None else keep_dense_outputs,
    )
    return run_blocks(
        model, calib_ids, [*steps_before, step, *recover_steps], device=resolve_device(config.device),
        batch_size=config.batch_size, checkpoint=checkpoint, resume=resume, progress=progress, label=config.label(),
    )  # fmt: skip


__all__ = ["PruneConfig", "check_pattern_fits", "prune_model"]
