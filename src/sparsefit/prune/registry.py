"""The registry of pruning methods: one entry per :class:`~sparsefit.prune.masks.Pruner` subclass."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from sparsefit.errors import UsageError
from sparsefit.prune.magnitude import MagnitudePruner
from sparsefit.prune.masks import Pruner
from sparsefit.prune.sparsegpt import SparseGPTPruner
from sparsefit.prune.wanda import WandaPruner

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
