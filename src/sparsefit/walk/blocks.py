"""Where the driver's blocks come from and where they go: in the model's memory, or streamed from shards.

:class:`InMemoryBlocks`: every block lives in the model (GGUF-dequantised and hub models, ``compare``).
:class:`StreamedBlocks`: the model is a skeleton on the meta device; block ``i`` is read from the source's
safetensors shards (memory-mapped) when the walker reaches it, written to ``block_<i>.safetensors`` in the
run's partial folder when it is finished, and its weights go back to the meta device, so the walk holds one
block (plus the teacher's copy, plus a reconstruction window's earlier blocks) at a time. :meth:`write_model`
then writes the output shards with the source's layout, one tensor at a time.

Both give bit-identical results on the CPU: the same tensors, the same order of operations.
"""

from __future__ import annotations

import copy
import ctypes
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from sparsefit.atomic import save_tensors_atomically
from sparsefit.errors import FileError, UsageError
from sparsefit.models.adapters import Adapter, get_adapter
from sparsefit.models.loading import meta_model
from sparsefit.walk.shards import (
    INDEX_FILE,
    ShardedCheckpoint,
    TensorInfo,
    file_tensors,
    load_tensors,
    read_tensor,
    write_index,
    write_shard,
)

T = TypeVar("T")


class InMemoryBlocks:
    """The blocks of a model held in memory: loading, storing and releasing are no-ops."""

    streamed = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.blocks: nn.ModuleList = self.adapter.get_blocks(model)

    def __len__(self) -> int:
        return len(self.blocks)

    def begin(self, work: Path | None) -> None:
        """Called by the driver before the walk with the folder that holds finished blocks."""

    def load(self, index: int) -> nn.Module:
        return self.blocks[index]

    def reload(self, index: int) -> nn.Module:
        return self.blocks[index]

    def store(self, index: int) -> None:
        return None

    def release(self, index: int) -> None:
        return None

    def original(self, index: int) -> nn.Module:
        """A copy of block ``index`` as it is now (the dense block, when called before it is pruned)."""
        return copy.deepcopy(self.blocks[index])

    @contextmanager
    def modules(self, *paths: str) -> Iterator[None]:
        """Non-block modules (embeddings, final norm, head) present while the context is open: always here."""
        yield

    def finished(self) -> Iterator[tuple[int, nn.Module]]:
        """Every block as it is at the end of the walk, one at a time."""
        yield from enumerate(self.blocks)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc; elsewhere nothing to do).

    A block's training allocates and frees tensors of many sizes (gradients, AdamW's moments); glibc keeps the
    freed ones in its heap, fragmented, so without this a streamed walk's resident memory grows by about half a
    block per block (measured: 1.5 GB after 120 blocks of 13 MB), though no tensor outlives its block.
    """
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _glibc():
    """glibc, set up once with a fixed mmap threshold of 32 MiB (its largest), and the heap trimmed after each block.

    Left to itself glibc raises its mmap threshold after each large free, so a walk's resident memory depended on
    which threads allocated (measured: 570 MiB on one run, 4.4 GiB on another, for the same 2 GiB model); a fixed
    threshold turns that adjustment off. It was 1 MiB, which made every activation-sized tensor (a window's MLP
    output, its attention scores) a fresh mapping whose pages the kernel zeroes again on each window: SmolLM2's
    streamed Wanda took 10.9 M page faults and 35 s of system time against 1.2 M and 5 s in memory. At 32 MiB such
    tensors reuse heap memory (3.2 M faults, 12 s), and :func:`_trim_heap` still returns it after each block."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (present in glibc only)
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


_LIBC = None


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _to_meta(module: nn.Module) -> None:
    """Free a module's parameters (weights back to the meta device); buffers (rotary tables) stay."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)


class StreamedBlocks(InMemoryBlocks):
    """Blocks read from a safetensors folder one at a time and stored in ``work`` when finished."""

    streamed = True

    def __init__(self, model: nn.Module, source: ShardedCheckpoint, dtype: torch.dtype) -> None:
        super().__init__(model)
        self.source = source
        self.dtype = dtype
        self.prefix = f"{self.adapter.blocks}."
        self.work: Path | None = None
        _glibc()  # before the walk allocates: large tensors get their own mappings (see _glibc)

    def begin(self, work: Path | None) -> None:
        """``work``: the folder of finished blocks; None for a read-only walk (OWL's pre-pass), which stores none."""
        self.work = Path(work) if work is not None else None
        if self.work is not None:
            self.work.mkdir(parents=True, exist_ok=True)

    def block_file(self, index: int) -> Path:
        assert self.work is not None
        return self.work / f"block_{index}.safetensors"

    def read_stored(self, index: int, read: Callable[[Path], T]) -> T:
        """``read(block_file(index))``. A stored block file that is missing, cut short or not safetensors (found
        when a ``--resume`` reads an earlier run's blocks) is one FileError line that says how to start over."""
        path = self.block_file(index)
        try:
            return read(path)
        except (UsageError, FileError, FileNotFoundError) as exc:
            what = "missing" if isinstance(exc, FileNotFoundError) else "cut short or not a safetensors file"
            raise FileError(f"checkpoint file {str(path)!r} is damaged ({what}); run again without --resume to "
                            f"start over") from None  # fmt: skip

    def _assign(self, module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
        module.load_state_dict(state, strict=False, assign=True)
        left = [name for name, p in module.named_parameters() if p.is_meta]
        if left:
            raise UsageError(f"{what} lacks tensor {left[0]!r} in {str(self.source.folder)!r}; is the folder complete?")
        return module

    def load(self, index: int) -> nn.Module:
        """Block ``index`` with its weights from the source shards (the walker reached it)."""
        block = self.blocks[index]
        if _is_meta(block):
            self._assign(block, self.source.read_prefix(f"{self.prefix}{index}.", self.dtype), f"block {index}")
        return block

    def reload(self, index: int) -> nn.Module:
        """Finished block ``index`` as it was stored (a window's earlier block, after a resume)."""
        block = self.blocks[index]
        if _is_meta(block):
            self._assign(block, self.read_stored(index, load_tensors), f"stored block {index}")
        return block

    def store(self, index: int) -> None:
        save_tensors_atomically(self.blocks[index].state_dict(), self.block_file(index))

    def release(self, index: int) -> None:
        if not _is_meta(self.blocks[index]):
            _to_meta(self.blocks[index])
            _trim_heap()

    def original(self, index: int) -> nn.Module:
        """A second copy of block ``index`` with the source's (dense) weights: the teacher's block."""
        block = self.blocks[index]
        # Copy the module structure only: its parameters become meta tensors, then the source's are assigned.
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in block.parameters()}
        return self._assign(copy.deepcopy(block, memo), self.source.read_prefix(f"{self.prefix}{index}.", self.dtype),
                            f"block {index}")  # fmt: skip

    def _path_state(self, path: str) -> dict[str, torch.Tensor]:
        return self.source.read_prefix(f"{path}.", self.dtype)

    @contextmanager
    def modules(self, *paths: str) -> Iterator[None]:
        """Load the non-block modules at ``paths`` from the source for the duration of the context.

        A tied output layer (no ``lm_head.weight`` in the source) shares the input embedding's weight while both
        are here; an untied one keeps its own (issue 22: it was tied whenever the embedding was loaded, so a streamed
        model's logits came from the input embedding after the first capture).
        """
        loaded = []
        for path in paths:
            module = self.model.get_submodule(path)
            if _is_meta(module):
                module.load_state_dict(self._path_state(path), strict=False, assign=True)
                loaded.append(module)
        tied = self._tie()
        try:
            yield
        finally:
            for module in loaded:
                _to_meta(module)
            if tied is not None:
                _to_meta(tied)

    def _output_name(self) -> str:
        out = self.model.get_output_embeddings()
        return next(name for name, module in self.model.named_modules() if module is out)

    def _tie(self) -> nn.Module | None:
        """Tie the output layer to the loaded input embedding when the source has no output weight; return it."""
        out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if out is None or not out.weight.is_meta or inp.weight.is_meta:
            return None
        if f"{self._output_name()}.weight" in self.source.tensors:
            return None
        out.weight = inp.weight
        return out

    def head_paths(self) -> tuple[str, ...]:
        """The modules that turn the last block's output into logits: the final norm and the output layer."""
        output = self._output_name()
        paths = [p for p in (self.adapter.final_norm,) if p]
        paths.append(output)
        if f"{output}.weight" not in self.source.tensors:
            paths += list(self.adapter.embeddings[:1])  # a tied head reads the input embedding's weight
        return tuple(paths)

    def finished(self) -> Iterator[tuple[int, nn.Module]]:
        for index in range(len(self.blocks)):
            block = self.reload(index)
            try:
                yield index, block
            finally:
                self.release(index)

    def block_bytes(self, index: int = 0) -> int:
        names = [n for n in self.source.tensors if n.startswith(f"{self.prefix}{index}.")]
        return self.source.nbytes(names, self.dtype)

    def output_bytes(self) -> int:
        return self.source.nbytes(dtype=self.dtype)

    def write_model(self, out: Path) -> None:
        """Write the output shards into ``out`` with the source's layout: finished blocks from ``work``, every
        other tensor (embeddings, final norm, head) copied from the source in the run's dtype."""
        stored: dict[int, dict[str, TensorInfo]] = {}

        def block_tensor(index: int, key: str) -> torch.Tensor | None:
            if index not in stored:
                stored[index] = self.read_stored(index, file_tensors)
            info = stored[index].get(key)
            return self.read_stored(index, lambda path: read_tensor(path, info)) if info is not None else None

        weight_map: dict[str, str] = {}
        total = 0
        for shard, names in self.source.shards.items():
            entries = []
            for name in names:
                info = self.source.tensors[name]
                dtype = self.dtype if info.dtype.is_floating_point else info.dtype

                def fetch(name=name, dtype=dtype):
                    if name.startswith(self.prefix):
                        index, _, key = name[len(self.prefix) :].partition(".")
                        tensor = block_tensor(int(index), key)
                        if tensor is not None:
                            return tensor
                    return self.source.read(name, dtype)

                entries.append((name, dtype, info.shape, fetch))
                weight_map[name] = shard
            total += write_shard(out / shard, entries)
        if self.source.indexed:
            write_index(out / INDEX_FILE, weight_map, total)


def skeleton(folder: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``folder`` with every parameter on the meta device (buffers such as rotary tables real)."""
    model = meta_model(Path(folder), dtype, trust_remote_code)
    model.eval()
    model.config.use_cache = False
    return model
