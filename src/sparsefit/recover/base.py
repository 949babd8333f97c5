"""What every recovery method receives and returns, and the registry they are listed in.

A method is one file with a :class:`RecoveryMethod` subclass and one entry in
``sparsefit.recover.METHODS``. It gets a pruned model (its masks are its exact zeros), the dense
teacher, the tokenized calibration windows and a token budget, changes the model in place, and
returns a report. Block-wise methods walk through :func:`sparsefit.pipeline.recover_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparsefit.prune import Pattern


@dataclass
class RecoveryContext:
    model: nn.Module  # the pruned model, changed in place
    teacher: nn.Module  # the dense model it was pruned from
    tokenizer: object
    calib_ids: torch.Tensor  # (N, L) calibration windows, the same for every method
    pattern: Pattern
    device: torch.device
    seed: int = 0
    budget_tokens: int | None = None  # token passes a training method may spend (None: its own default)
    batch_size: int = 8
    options: dict = field(default_factory=dict)  # method-specific settings


class RecoveryMethod:
    """Base class: ``name``, whether it trains, which patterns it supports, and ``run``."""

    name: str = ""
    trains: bool = True

    def supports(self, pattern: Pattern) -> str | None:
        """None when the method can run with ``pattern``, else the reason it cannot."""
        return None

    def run(self, ctx: RecoveryContext) -> dict:
        """Recover ``ctx.model`` in place; return a report with at least ``trainable_params``."""
        raise NotImplementedError
