"""Safetensors folders read and written a tensor at a time: the block I/O of the streamed path.

A source folder is ``model.safetensors`` or shards named by ``model.safetensors.index.json``; a tensor is read
straight into its own memory by a positioned read at the offset its shard's header gives, so reading one block
costs that block's memory. (A memory map kept open would do the same work, but every page it ever touched counts
in the process's resident memory until it is closed: a walk over a 14 GB model would show 14 GB.) Output shards are
written by :func:`write_shard` from a list of tensors whose shapes and dtypes are known up front: the header
first, then each tensor's bytes as it is fetched, so writing a 5 GB shard holds one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsefit.errors import UsageError
from sparsefit.models.loading import read_safetensors_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors' dtype codes (the file format's, https://github.com/huggingface/safetensors)
_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    shard: str  # file name inside the folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # of its bytes from the file's start


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """One tensor of a safetensors file, read into a fresh tensor (no map left open)."""
    tensor = torch.empty(info.shape, dtype=info.dtype)
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb") as handle:
        handle.seek(info.offset)
        if handle.readinto(raw) != raw.nbytes:
            raise UsageError(f"{str(path)!r} ends inside tensor data; re-create or re-download it")
    return tensor


def file_tensors(path: Path, shard: str = "") -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file by name (from its header), in file order."""
    header = read_header(path)
    with open(path, "rb") as handle:
        start = 8 + int.from_bytes(handle.read(8), "little")
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    infos = {}
    for name in names:
        entry = header[name]
        if entry["dtype"] not in _DTYPES:
            raise UsageError(f"tensor {name!r} in {str(path)!r} has dtype {entry['dtype']}, which is not supported")
        infos[name] = TensorInfo(shard or path.name, _DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                 start + entry["data_offsets"][0])  # fmt: skip
    return infos


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (a stored block), read without a memory map."""
    return {name: read_tensor(path, info) for name, info in file_tensors(path).items()}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file; a truncated or corrupted file is one UsageError line."""
    return read_safetensors_header(path)


class ShardedCheckpoint:
    """The tensors of a safetensors folder by name: where each lives, its dtype and shape; reads memory-mapped.

    Every shard the index names must exist and hold exactly the tensors the index gives it: checked here,
    from the headers only, before any expensive work.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{str(index)!r} is not a safetensors index (no weight_map); re-create it") from None
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise UsageError(f"{str(self.folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.indexed = weight_map is not None
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self.tensors: dict[str, TensorInfo] = {}
        self.shards: dict[str, list[str]] = {}  # shard -> its tensor names, in file order
        for shard in shards:
            path = self.folder / shard
            if not path.is_file():
                raise UsageError(f"shard {shard!r} named by {INDEX_FILE} is missing from {str(self.folder)!r}")
            infos = file_tensors(path, shard)
            names = list(infos)
            if weight_map is not None:
                expected = {k for k, v in weight_map.items() if v == shard}
                if expected != set(names):
                    missing = sorted(expected - set(names))
                    extra = sorted(set(names) - expected)
                    what = f"lacks {missing[0]!r}" if missing else f"holds {extra[0]!r} that the index puts elsewhere"
                    raise UsageError(f"shard {shard!r} does not match {INDEX_FILE}: it {what}; re-create the folder")
            self.tensors.update(infos)
            self.shards[shard] = names

    def nbytes(self, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of ``names`` (default: every tensor), stored as ``dtype`` when given."""
        total = 0
        for name in self.tensors if names is None else names:
            info = self.tensors[name]
            numel = 1
            for dim in info.shape:
                numel *= dim
            total += numel * (dtype or info.dtype).itemsize
        return total

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from its shard (cast to ``dtype`` when given and it is a float tensor)."""
        info = self.tensors[name]
        tensor = read_tensor(self.folder / info.shard, info)
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)

    def read_prefix(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed by the rest of its name."""
        return {name[len(prefix) :]: self.read(name, dtype) for name in self.tensors if name.startswith(prefix)}


def write_shard(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]) -> int:
    """Write a safetensors file from ``(name, dtype, shape, fetch)`` entries, one tensor in memory at a time.

    The header is written first from the declared shapes and dtypes; ``fetch()`` must return exactly that
    tensor. Returns the bytes of tensor data written. ``{"format": "pt"}`` metadata, as transformers expects.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _fetch in entries:
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads its header to 8 bytes so the data is aligned
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name, dtype, shape, fetch in entries:
            tensor = fetch()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: declared {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return offset


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    path.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")
