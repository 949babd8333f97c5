"""Pruning: scores (magnitude, Wanda, SparseGPT), exact mask selection (per row, per layer, N:M), pattern checks.

Pure numeric code; the block walker feeds each layer's inputs to a pruner and calls ``prune``. A new method is one
file with a :class:`~sparsefit.prune.masks.Pruner` subclass and one entry in :data:`PRUNERS`.
"""

from __future__ import annotations

from sparsefit.prune.magnitude import MagnitudePruner, magnitude_scores
from sparsefit.prune.masks import Pruner, check_pattern, nm_mask, select_mask, unstructured_mask
from sparsefit.prune.pattern import UNSTRUCTURED, Pattern, check_sparsity, parse_pattern
from sparsefit.prune.registry import PRUNERS, make_pruner
from sparsefit.prune.report import sparsity_report, sparsity_summary
from sparsefit.prune.run import PruneConfig, check_pattern_fits, prune_model
from sparsefit.prune.sparsegpt import SparseGPTPruner, sparsegpt_solve
from sparsefit.prune.wanda import WandaPruner, wanda_scores

__all__ = [
    "PRUNERS",
    "PruneConfig",
    "UNSTRUCTURED",
    "MagnitudePruner",
    "Pattern",
    "Pruner",
    "SparseGPTPruner",
    "WandaPruner",
    "check_pattern",
    "check_pattern_fits",
    "check_sparsity",
    "magnitude_scores",
    "make_pruner",
    "nm_mask",
    "parse_pattern",
    "prune_model",
    "select_mask",
    "sparsegpt_solve",
    "sparsity_report",
    "sparsity_summary",
    "unstructured_mask",
    "wanda_scores",
]
