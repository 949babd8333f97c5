"""Atomic writes, the one way every output of sparsefit reaches the disk.

A file is written to a temporary name in its own folder and renamed; a folder is built under a temporary name
beside its target and renamed. A crash at any moment leaves either the old output or the new one, never a
half-written file that looks complete. Before any work, :func:`check_output` refuses an output that would replace
one of the job's inputs or an earlier result, or that cannot be written; a write that the file system fails (no
space left) ends in one :class:`WriteError` line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sparsefit.errors import FileError, UsageError, WriteError, first_line


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


def home() -> Path:
    """The cache root: ``$SPARSEFIT_HOME`` or ``~/.cache/sparsefit`` (built-in models, corpora, kernels)."""
    return Path(os.environ.get("SPARSEFIT_HOME") or Path.home() / ".cache" / "sparsefit")


def check_output(
    out: str | os.PathLike, overwrite: bool, inputs: Iterable[tuple[str, object]] = ()
) -> Path:
    """Refuse, before any work, an output folder that is one of the job's ``inputs`` or holds one (``--overwrite``
    would delete it), a file, a non-empty folder unless ``overwrite``, or a place that cannot be written.

    ``inputs``: ``(role, value)`` pairs such as ``("model", "models/tiny")``; values that name nothing on this
    machine (a built-in model, a hub id, a corpus name) cannot be replaced and are skipped. A user's output never
    lies in sparsefit's cache (a built-in model's converted copy, a corpus's tokens live there).
    """
    path = Path(out).expanduser()
    check_inputs_kept(path, [("cache of built-in models and corpora", home()), *inputs])
    cache = home().expanduser().resolve()
    if cache in path.resolve().parents:
        raise UsageError(f"output folder {str(out)!r} lies inside sparsefit's cache {str(cache)!r}, which holds the "
                         f"built-in models and corpora; give a folder outside it")
    return _check_folder(path, overwrite)


def _check_folder(path: Path, overwrite: bool) -> Path:
    """A folder that can be written: not a file, empty unless ``overwrite``, on a writable file system."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(path)!r} exists and is not empty; pass --overwrite to replace it")
    check_writable(path)
    return path


def check_inputs_kept(out: Path, inputs: Iterable[tuple[str, object]]) -> None:
    """UsageError when writing ``out`` would replace an input: ``out`` is it, or a folder above it."""
    target = Path(out).expanduser().resolve()
    for role, value in inputs:
        if value is None or value == "":
            continue
        path = Path(str(value)).expanduser()
        if not path.exists():
            continue
        path = path.resolve()  # symbolic links and ".." name the folder they lead to
        if path == target:
            raise UsageError(f"output folder {str(out)!r} is the {role} itself: the command reads it, and writing "
                             f"the output would delete it; give another output folder")  # fmt: skip
        if target in path.parents:
            raise UsageError(f"output folder {str(out)!r} holds the {role} {str(value)!r}: the command reads it, "
                             f"and writing the output would delete it; give another output folder")  # fmt: skip


def check_writable(out: Path) -> None:
    """UsageError unless the output's folder (its first existing one) takes new files: a read-only file system
    is found before the model loads, not when the result is written."""
    where = next((p for p in Path(out).parents if p.exists()), Path("."))
    if not where.is_dir():
        raise UsageError(f"output {str(out)!r} cannot be made: {str(where)!r} is a file, not a folder")
    # os.access, not a test file: it sees a read-only file system (EROFS) without writing anything.
    if not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"output {str(out)!r} cannot be written: {str(where)!r} is not writable (read-only file "
                         f"system or no permission); give an output folder on a writable disk")  # fmt: skip


def check_run_name(name: object) -> str:
    """A run's name as one plain folder name: it is joined to the runs folder, so a path (``../x``, ``/x``, ``a/b``)
    would write outside it."""
    text = name if isinstance(name, str) else None
    plain = (
        text is not None and text.strip() == text and text not in ("", ".", "..") and "\0" not in text
        and not any(sep in text for sep in {"/", "\\", os.sep, os.altsep} if sep)
    )  # fmt: skip
    if not plain:
        raise UsageError(f"run name {name!r} must be one plain folder name (no '/', '..' or absolute path), "
                         f"e.g. name: wanda-50")  # fmt: skip
    return text


def fault_reason(exc: BaseException) -> str | None:
    """What the file system said, when ``exc`` is a file-system fault (an OSError, or safetensors' I/O error,
    which carries the OS error code in its text: ``IoError(Os { code: 28, ...`` in older releases, ``I/O error: No
    space left on device (os error 28)`` in 0.8); None for anything else."""
    if isinstance(exc, OSError):
        code, reason = exc.errno, exc.strerror or first_line(exc)
    elif type(exc).__name__ == "SafetensorError" and ("IoError" in str(exc) or "I/O error" in str(exc)):
        match = re.search(r"code: (\d+)|\(os error (\d+)\)", str(exc))
        code = int(match.group(1) or match.group(2)) if match else None
        reason = os.strerror(code) if code is not None else first_line(exc)
    else:
        return None
    if code == errno.ENOSPC:
        return f"{reason}; free some space and run again"
    return reason


@contextmanager
def file_faults(path: str | os.PathLike) -> Iterator[None]:
    """A file-system fault inside (no space left, a read-only file system) becomes one :class:`WriteError` line
    that names ``path``; every other error passes unchanged."""
    try:
        yield
    except Exception as exc:
        reason = None if isinstance(exc, FileError) else fault_reason(exc)
        if reason is None:
            raise
        raise WriteError(f"writing {str(path)!r} failed: {reason}") from None


def write_file_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file via a temporary file in the same folder and ``os.replace``."""
    return write_with(path, lambda tmp: tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data))


def write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` to write a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    with file_faults(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-tmp-")
        os.close(fd)
        try:
            writer(Path(tmp))
            os.chmod(tmp, file_mode(0o666))  # mkstemp makes it owner-only; give it the usual permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # a half-written file is of no use
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
    path = _check_folder(Path(dir_path).expanduser(), overwrite)  # the cache's own folders are written here too
    with file_faults(path):
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
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written output is of no use
            if old is not None and (old / path.name).exists() and not path.exists():
                os.replace(old / path.name, path)  # put the previous output back
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return path
