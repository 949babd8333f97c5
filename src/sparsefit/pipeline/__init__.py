"""The sequential block walker and the whole-model pruning run built on it."""

from sparsefit.pipeline.capture import capture_inputs
from sparsefit.pipeline.prune_model import PruneConfig, prune_model, resolve_device
from sparsefit.pipeline.walker import BlockContext, BlockStep, walk_blocks

__all__ = ["BlockContext", "BlockStep", "PruneConfig", "capture_inputs", "prune_model", "resolve_device", "walk_blocks"]
