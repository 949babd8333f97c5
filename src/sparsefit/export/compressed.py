"""Compressed sparse checkpoint: bitmask + nonzero values per pruned weight, everything else dense.

Folder layout: ``config.json`` (+ ``generation_config.json``), tokenizer files, ``sparsity.json``,
``README.md`` (model card), ``compression.json`` (sizes) and ``model.sparse.safetensors`` holding

- ``<param>.bitmask``: uint8, the "bits are nonzero" mask of the 2-D weight ``<param>`` *as stored*
  (GPT-2 Conv1D keeps its (in, out) layout) packed along the last dim, little bit order
  (see :mod:`sparsefit.export.masks`);
- ``<param>.values``: 1-D, the weight's nonzero entries in row-major order, in its own dtype;
- every other tensor dense under its own name.

Metadata: ``format = "sparsefit-compressed"``, ``version``, ``bitorder``, ``dtype``, ``compressed``
(JSON ``{param: shape}``) and ``aliases`` (JSON ``{tied param: stored param}``).

The mask is "bits nonzero", not "value != 0", so a stored ``-0.0`` survives and the restore is
bit-exact. A weight is stored sparse only when that is smaller than dense (mask 1 bit/entry).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsefit.atomic import check_output, write_atomically
from sparsefit.errors import UsageError, check, first_line
from sparsefit.export.hf import model_card
from sparsefit.export.masks import BITORDER, packed_shape, unpack_bits
from sparsefit.export.run_folder import load_run_model, read_run
from sparsefit.models.loading import read_safetensors_header
from sparsefit.walk.masks import model_layers

WEIGHTS_FILE = "model.sparse.safetensors"
FORMAT = "sparsefit-compressed"
VERSION = "1"
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bit patterns as a numpy integer array (numpy has no bfloat16; ints carry any dtype)."""
    return tensor.contiguous().view(_INT_OF_SIZE[tensor.element_size()]).numpy()


def _split(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bitmask, nonzero values in row-major order) of a 2-D tensor.

    "Nonzero" compares bit patterns, not values: -0.0 == 0 but is not all-zero bits, so it is kept.
    numpy does the masking: several times faster than torch's boolean indexing on this CPU.
    """
    bits = _bits(tensor)
    mask = bits != 0
    values = torch.from_numpy(bits[mask]).view(tensor.dtype)
    return torch.from_numpy(np.packbits(mask, axis=-1, bitorder=BITORDER)), values


def _join(bitmask: torch.Tensor, values: torch.Tensor, shape: list[int], bad: str, name: str) -> torch.Tensor:
    mask = unpack_bits(bitmask, shape).numpy()
    count = int(np.count_nonzero(mask))
    if values.dim() != 1 or values.numel() != count:
        raise UsageError(f"{bad} ({name!r} has {values.numel()} values for {count} set mask bits)")
    full = np.zeros(shape, dtype=_bits(values).dtype)  # all-zero bits: exactly what was left out
    full[mask] = _bits(values)
    return torch.from_numpy(full).view(values.dtype)


def _sparse_candidates(model: nn.Module) -> set[str]:
    """Parameter names of the prunable block weights (or every 2-D weight for an unknown architecture)."""
    try:
        layers = model_layers(model)
    except UsageError:  # get_adapter: an architecture sparsefit does not know
        return {name for name, p in model.named_parameters() if p.dim() == 2}
    return {f"{name}.weight" for name in layers}


def compress_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the compressed safetensors file for ``model``."""
    candidates = _sparse_candidates(model)
    tensors: dict[str, torch.Tensor] = {}
    compressed: dict[str, list[int]] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    dtypes: Counter[str] = Counter()
    for name, tensor in model.state_dict().items():
        # The storage key before .cpu(): a GPU tensor's copy would get a fresh pointer and hide the tie.
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride())
        tensor = tensor.detach().cpu()
        if key in seen:  # tied weights (lm_head = embeddings) are stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        if tensor.is_floating_point():
            dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
        if name in candidates and tensor.dim() == 2 and tensor.is_floating_point():
            bitmask, values = _split(tensor)
            if bitmask.numel() + values.numel() * values.element_size() < tensor.numel() * tensor.element_size():
                tensors[f"{name}.bitmask"] = bitmask
                tensors[f"{name}.values"] = values
                compressed[name] = list(tensor.shape)
                continue
        tensors[name] = tensor.contiguous()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "bitorder": BITORDER,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else "float32",
        "compressed": json.dumps(compressed),
        "aliases": json.dumps(aliases),
    }
    return tensors, metadata


def decompress_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> dict:
    """The full state dict (tied aliases included) from a compressed file's tensors and metadata."""
    bad = f"{where} is not a valid sparsefit compressed checkpoint"
    if metadata.get("format") != FORMAT:
        raise UsageError(f"{bad} (no format={FORMAT} in its metadata)")
    if metadata.get("bitorder") != BITORDER:
        raise UsageError(f"{bad} (bit order {metadata.get('bitorder')!r}; expected {BITORDER!r})")
    try:
        compressed = json.loads(metadata.get("compressed", "{}"))
        aliases = json.loads(metadata.get("aliases", "{}"))
    except ValueError:
        raise UsageError(f"{bad} (damaged metadata)") from None
    state: dict[str, torch.Tensor] = {}
    for name, shape in compressed.items():
        bitmask, values = tensors.pop(f"{name}.bitmask", None), tensors.pop(f"{name}.values", None)
        if bitmask is None or values is None:
            raise UsageError(f"{bad} (the bitmask or values of {name!r} are missing)")
        if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != packed_shape(shape):
            raise UsageError(f"{bad} (the bitmask of {name!r} does not fit shape {shape})")
        state[name] = _join(bitmask, values, shape, bad, name)
    state.update(tensors)
    for alias, source in aliases.items():
        if source not in state:
            raise UsageError(f"{bad} (tied tensor {alias!r} points to missing {source!r})")
        state[alias] = state[source]
    return state


def save_compressed(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a compressed checkpoint folder ``out``, atomically."""
    from safetensors.torch import save_file

    def writer(tmp: Path) -> None:
        tensors, metadata = compress_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        model.config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        dense_bytes = sum(t.numel() * t.element_size() for t in _dense_view(model))
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
        info = {
            "format": FORMAT,
            "version": VERSION,
            "weights_file": WEIGHTS_FILE,
            "file_bytes": file_bytes,
            "dense_tensor_bytes": dense_bytes,
            "ratio_vs_dense_tensors": round(file_bytes / dense_bytes, 4) if dense_bytes else None,
            "compressed_tensors": len(json.loads(metadata["compressed"])),
            "load_with": "from sparsefit.export import load_compressed; model, tokenizer = load_compressed(path)",
        }
        (tmp / "compression.json").write_text(json.dumps(info, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    return write_atomically(out, writer, overwrite=overwrite)


def _dense_view(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def export_compressed(run_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Export a sparsefit run folder as a compressed checkpoint (bitmask + values); returns ``out``."""
    run_json, sparsity_json = read_run(run_dir)
    zeros = sparsity_json.get("pattern") != "structured" and sparsity_json.get("overall", 0) > 0
    check(zeros, f"run folder {str(run_dir)!r} has no zeros to compress (sparsity {sparsity_json.get('overall', 0)}, "
                 f"pattern {sparsity_json.get('pattern', 'unstructured')}); export it with --format hf")
    check_output(out, overwrite, [("run folder", run_dir)])  # fail before the slow load
    model, tokenizer = load_run_model(run_dir)
    card = model_card(run_json, sparsity_json, export_format="compressed")
    extra = {"README.md": card, "sparsity.json": json.dumps(sparsity_json, indent=2)}
    return save_compressed(model, out, tokenizer, overwrite=overwrite, extra_files=extra)


def read_compressed_file(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a compressed weights file, its header checked first; a damaged file is one line."""
    from safetensors import safe_open

    read_safetensors_header(weights)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}
    except Exception as exc:  # safetensors' own error types for a damaged header or data
        raise UsageError(f"{str(weights)!r} is not a readable safetensors file ({first_line(exc)})") from None


def load_compressed(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a compressed checkpoint folder, weights restored bit-exactly.

    The tokenizer is None when the folder has none. The model is on the CPU in eval mode.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging as hf_logging

    folder = Path(path).expanduser()
    weights = folder / WEIGHTS_FILE
    if not folder.is_dir() or not weights.is_file() or not (folder / "config.json").is_file():
        raise UsageError(
            f"{str(folder)!r} is not a sparsefit compressed checkpoint (needs config.json and {WEIGHTS_FILE}); "
            "write one with `sparsefit export --format compressed`"
        )
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tensors, metadata = read_compressed_file(weights)
    state = decompress_state_dict(tensors, metadata, repr(str(weights)))
    try:
        config = AutoConfig.from_pretrained(folder)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{str(folder)!r}: config.json names no causal LM transformers knows ({exc})") from None
    dtype = getattr(torch, metadata.get("dtype", "float32"), torch.float32)
    try:
        # from_pretrained (not from_config + load_state_dict): it ties weights and builds buffers the usual way.
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"could not build the model of {str(folder)!r}: {first_line(exc)}") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
        raise UsageError(f"{str(weights)!r} lacks tensors the model needs (first: {missing[0]!r}); re-export it")
    model.eval()
    model.config.use_cache = False
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def file_size_ratio(compressed_dir: str | os.PathLike, dense_file: str | os.PathLike) -> float:
    """Compressed weights file bytes / dense safetensors bytes."""
    return (Path(compressed_dir) / WEIGHTS_FILE).stat().st_size / Path(dense_file).stat().st_size


__all__ = [
    "WEIGHTS_FILE",
    "compress_state_dict",
    "decompress_state_dict",
    "export_compressed",
    "file_size_ratio",
    "load_compressed",
    "save_compressed",
]
