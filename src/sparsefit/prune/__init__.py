"""Pruning: scores (magnitude, Wanda, SparseGPT), exact mask selection (per row, per layer, N:M), pattern checks.

Pure numeric code; the block walker feeds each layer's inputs to a pruner and calls ``prune``. A new method is one
file with a :class:`~sparsefit.prune.masks.Pruner` subclass and one entry in :data:`PRUNERS`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from sparsefit.errors import UsageError
from sparsefit.prune.magnitude import MagnitudePruner, magnitude_scores
from sparsefit.prune.masks import Pruner, check_pattern, nm_mask, select_mask, unstructured_mask
from sparsefit.prune.pattern import UNSTRUCTURED, Pattern, check_sparsity, parse_pattern
from sparsefit.prune.report import sparsity_report
from sparsefit.prune.sparsegpt import SparseGPTPruner, sparsegpt_solve
from sparsefit.prune.wanda import WandaPruner, wanda_scores

PRUNERS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
}


def make_pruner(name: str, module: nn.Module, **options: Any) -> Pruner:
    """A pruner for one layer (nn.Linear or GPT-2 Conv1D); ``options`` go to its constructor.

    SparseGPT takes ``blocksize``, ``percdamp`` and ``update_weights``; the others take none.
    """
    if name not in PRUNERS:
        raise UsageError(f"pruning method {name!r} is not known; choose one of {', '.join(PRUNERS)}")
    cls = PRUNERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "module")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(
            f"pruning method {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(module, **options)


__all__ = [
    "PRUNERS",
    "UNSTRUCTURED",
    "MagnitudePruner",
    "Pattern",
    "Pruner",
    "SparseGPTPruner",
    "WandaPruner",
    "check_pattern",
    "check_sparsity",
    "magnitude_scores",
    "make_pruner",
    "nm_mask",
    "parse_pattern",
    "select_mask",
    "sparsegpt_solve",
    "sparsity_report",
    "unstructured_mask",
    "wanda_scores",
]
