"""Atomic writes, the one way every output of sparsefit reaches the disk.

A file is written to a temporary name in its own folder and renamed; a folder is built under a temporary name
beside its target and renamed. A crash at any moment leaves either the old output or the new one, never a
half-written file that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sparsefit.errors import UsageError


@contextmanager
def cache_lock(lock: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` while a cache entry is filled: processes that start together
    (torchrun's ranks, benchmark jobs) fill it once, the others wait and then find it filled."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock (one process at a time is then the user's to ensure)
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_mode(base: int) -> int:
    """``base`` less the process umask (read without changing it for good)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite``."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(path)!r} exists and is not empty; pass --overwrite to replace it")
    return path


def write_file_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file via a temporary file in the same folder and ``os.replace``."""
    return write_with(path, lambda tmp: tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data))


def write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` to write a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-tmp-")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, file_mode(0o666))  # mkstemp makes it owner-only; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_tensors_atomically(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> Path:
    """A safetensors file written atomically (tensors made contiguous, moved to the CPU)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def write_atomically(
    dir_path: str | os.PathLike, writer: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Call ``writer(tmp)`` on a temporary folder next to ``dir_path``, then move it into place.

    A crash or error leaves the target untouched (no half-written checkpoint that looks complete).
    An existing non-empty target is refused unless ``overwrite``.
    """
    path = check_output(dir_path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same parent folder, so os.replace is a rename on one file system.
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-tmp-"))
    old: Path | None = None
    try:
        writer(tmp)
        os.chmod(tmp, file_mode(0o777))  # mkdtemp makes it owner-only; an output folder is for everyone to read
        if path.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first, delete it after.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # put the previous output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
