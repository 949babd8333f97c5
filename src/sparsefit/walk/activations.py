"""Activation sets (inputs, targets, the dense-path carry): in a chosen dtype, in memory up to a budget, else on disk.

One set is (windows, seqlen, hidden): 256 x 1024 x 4096 in bfloat16 is 2 GiB for a 7B model, and a walk holds
two to four of them (inputs, outputs, the dense targets, the dense path's inputs). Beyond ``budget`` bytes a
new set is a memory-mapped file in the run's partial folder, unlinked at once (the mapping keeps it alive, the
disk space comes back when the set is freed, and nothing is left behind by a crash).
"""

from __future__ import annotations

import errno
import itertools
import os
import weakref
from pathlib import Path

import torch


def _allocate(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` of disk really reserved. A file only truncated to its size is sparse: with
    the disk full, the first write through the mapping kills the process with SIGBUS; reserved blocks make a full
    disk an OSError (ENOSPC) here, which the walk reports as one line and keeps its checkpoint for --resume."""
    with open(path, "wb") as handle:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(handle.fileno(), 0, nbytes)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: write
                    raise
        chunk = bytes(1 << 20)
        for start in range(0, nbytes, len(chunk)):
            handle.write(chunk[: min(len(chunk), nbytes - start)])
        handle.flush()
        os.fsync(handle.fileno())


class Activations:
    """Where the walk's activation sets live: ``dtype`` (float32 by default), ``budget`` bytes of memory (None:
    unbounded) and, beyond it, memory-mapped files in ``folder`` (set by :meth:`begin`)."""

    def __init__(self, dtype: torch.dtype = torch.float32, budget: int | None = None) -> None:
        self.dtype = dtype
        self.budget = budget
        self.folder: Path | None = None
        self.in_memory = 0  # bytes of the sets now held in memory
        self.spilled = 0  # sets written to disk so far (a count, for reports and tests)
        self._names = itertools.count()

    def begin(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder) / "activations"

    def _release(self, nbytes: int) -> None:
        self.in_memory -= nbytes

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new set of ``shape`` (default dtype: the store's), in memory or, beyond the budget, on disk."""
        dtype = dtype or self.dtype
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        if self.budget is None or self.folder is None or self.in_memory + nbytes <= self.budget:
            tensor = torch.empty(shape, dtype=dtype)
            self.in_memory += nbytes
            weakref.finalize(tensor, self._release, nbytes)
            return tensor
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"set-{os.getpid()}-{next(self._names)}.bin"
        try:
            _allocate(path, max(nbytes, 1))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        try:
            tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        finally:
            path.unlink()  # the mapping keeps the data; the file's space is freed with the tensor
        self.spilled += 1
        return tensor

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.empty(tensor.shape, tensor.dtype)

    def clone(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = self.empty_like(tensor)
        copy.copy_(tensor)
        return copy

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (read back from a checkpoint, saved in the store's dtype) as a set of this store."""
        out = self.empty(tensor.shape, tensor.dtype)
        out.copy_(tensor)
        return out
