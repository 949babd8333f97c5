"""Run folders: read ``run.json``/``sparsity.json`` with clear errors, and write output folders atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from sparsefit.errors import UsageError


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{str(path)!r} is not valid JSON ({_first_line(exc)}); re-create the run folder") from None
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} holds a {type(data).__name__}, not a JSON object; re-create the run folder")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_run_folder(run_dir: str | os.PathLike) -> Path:
    """The run folder as a Path, or a UsageError saying what is missing."""
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise UsageError(f"run folder {str(path)!r} does not exist; give a folder written by sparsefit prune or run")
    if not path.is_dir():
        raise UsageError(f"{str(path)!r} is not a folder; give a sparsefit run folder")
    for name in ("run.json", "sparsity.json", "config.json"):
        if not (path / name).is_file():
            raise UsageError(f"{str(path)!r} is not a sparsefit run folder (no {name})")
    return path


def read_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run_json, sparsity_json)`` of a sparsefit run folder; UsageError when it is not one."""
    path = check_run_folder(run_dir)
    return _read_json(path / "run.json"), _read_json(path / "sparsity.json")


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The run folder's model (in its saved dtype, on the CPU, eval mode) and tokenizer (None if absent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sparsefit.models.loading import _check_safetensors

    path = check_run_folder(run_dir)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for shard in path.glob("*.safetensors"):
        _check_safetensors(shard)
    try:
        # dtype="auto": an export must keep the dtype the run was saved in, not upcast it.
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"could not load the model of run folder {str(path)!r}: {_first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None  # a run folder without tokenizer files still exports; the card says so
    model.eval()
    return model, tokenizer


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite``."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"output {str(path)!r} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"output folder {str(path)!r} exists and is not empty; pass --overwrite to replace it")
    return path


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
        os.chmod(tmp, _mode(0o777))  # mkdtemp makes it owner-only; an output folder is for everyone to read
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


def write_file_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, _mode(0o666))  # mkstemp makes it owner-only; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _mode(base: int) -> int:
    """``base`` less the process umask (read without changing it for good)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same folder (an export must never replace its own source)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
