"""Export a run folder: Hugging Face checkpoint with exact zeros, packed masks, compressed storage, 2:4 kernels."""

from sparsefit.export.compressed import export_compressed, load_compressed, save_compressed
from sparsefit.export.hf import export_hf, model_card
from sparsefit.export.masks import load_masks, save_masks
from sparsefit.export.run_folder import read_run
from sparsefit.export.semi_structured import is_semi_structured, to_semi_structured

__all__ = [
    "export_compressed",
    "export_hf",
    "is_semi_structured",
    "load_compressed",
    "load_masks",
    "model_card",
    "read_run",
    "save_compressed",
    "save_masks",
    "to_semi_structured",
]
