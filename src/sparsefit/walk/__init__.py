"""The low layer: walk the decoder blocks, capture their inputs, hooks, targets, checkpoints, devices, masks.

It imports nothing above it (``models``, ``errors``, ``atomic`` and ``progress`` only): no method, no job.
"""

from sparsefit.walk.capture import capture_inputs
from sparsefit.walk.checkpoint import BlockCheckpoint
from sparsefit.walk.device import resolve_device, to_device
from sparsefit.walk.driver import run_blocks
from sparsefit.walk.targets import TARGETS, TeacherStep, check_teacher
from sparsefit.walk.walker import BlockContext, BlockStep, walk_blocks

__all__ = [
    "TARGETS",
    "BlockCheckpoint",
    "BlockContext",
    "BlockStep",
    "TeacherStep",
    "capture_inputs",
    "check_teacher",
    "resolve_device",
    "run_blocks",
    "to_device",
    "walk_blocks",
]
