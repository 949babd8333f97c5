"""Model loading and architecture adapters."""

from sparsefit.models.adapters import (
    ADAPTERS,
    Adapter,
    get_adapter,
    prunable_layers,
    weight_matrix,
)
from sparsefit.models.loading import BUILTIN_MODELS, LoadedModel, load, parse_dtype

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BUILTIN_MODELS",
    "LoadedModel",
    "get_adapter",
    "load",
    "parse_dtype",
    "prunable_layers",
    "weight_matrix",
]
