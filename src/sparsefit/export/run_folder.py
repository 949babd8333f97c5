"""Run folders: read ``run.json``/``sparsity.json`` and the model with clear errors (writes go through atomic)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from sparsefit.errors import FileError, UsageError, first_line


def _read_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON record; a damaged one (not JSON, not an object) is one FileError line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FileError(f"{str(path)!r} is not valid JSON ({first_line(exc)}); re-create the run folder") from None
    if not isinstance(data, dict):
        raise FileError(f"{str(path)!r} holds a {type(data).__name__}, not a JSON object; re-create the run folder")
    return data


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


def read_pattern(folder: str | os.PathLike) -> str:
    """The sparsity pattern ``folder/sparsity.json`` records: ``unstructured`` when the folder has none (a plain
    checkpoint), a FileError line when the file is damaged."""
    path = Path(folder).expanduser() / "sparsity.json"
    if not path.exists():
        return "unstructured"
    pattern = _read_json(path).get("pattern", "unstructured")
    if not isinstance(pattern, str):
        raise FileError(f"{str(path)!r} records pattern {pattern!r}, not a pattern name; re-create the run folder")
    return pattern


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The run folder's model (in its saved dtype, on the CPU, eval mode) and tokenizer (None if absent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sparsefit.models.loading import read_safetensors_header

    path = check_run_folder(run_dir)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for shard in path.glob("*.safetensors"):
        read_safetensors_header(shard)
    try:
        # dtype="auto": an export must keep the dtype the run was saved in, not upcast it.
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"could not load the model of run folder {str(path)!r}: {first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None  # a run folder without tokenizer files still exports; the card says so
    model.eval()
    return model, tokenizer
