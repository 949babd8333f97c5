"""Checkpoints, so a long run resumes where it stopped: per block for a walk (:class:`BlockCheckpoint`), per step
for a whole-model fit (:class:`FitCheckpoint`).

After each finished block: its weights go to ``block_<i>.safetensors``, the next block's inputs
(and any other carried activations) to ``carry_<i+1>.safetensors``, then ``progress.json`` names the
next block, then the previous carry is removed. Every file is written to a temp name and renamed, and
``progress.json`` is renamed last, so a run killed at any moment resumes from the last block that was
fully saved, with the carry that belongs to it.

Under torchrun rank 0 writes the blocks and ``progress.json``; every rank writes its own share of the
activations (``carry_<i>.rank<r>.safetensors``), and a resume needs the same number of processes.

A file-system fault during a run (:func:`resumable`: no space left) keeps the folder when it names a finished
block (or a fit's saved step), so ``--resume`` continues from there, and removes it when it holds nothing a resume
could use.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from sparsefit import distributed
from sparsefit.atomic import fault_reason, save_tensors_atomically, write_file_atomically
from sparsefit.errors import FileError, UsageError, WriteError, first_line

T = TypeVar("T")


def partial_folder(out: str | os.PathLike) -> Path:
    """Where the checkpoint of the run writing ``out`` lives: ``.<name>.partial`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextmanager
def resumable(out: str | os.PathLike) -> Iterator[None]:
    """A file-system fault inside (a :class:`WriteError` such as no space left, or an OSError) ends in one
    WriteError line. The checkpoint of ``out`` is kept when it names a finished block, and the line says that
    ``--resume`` continues from it; a checkpoint with none is of no use and is removed. Other errors (a damaged
    checkpoint among them) pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, WriteError):
            message = str(exc)
        else:
            reason = fault_reason(exc)
            if reason is None:
                raise
            where = getattr(exc, "filename", None)
            message = f"the run stopped: {reason}" + (f" ({where})" if where else "")
        folder = partial_folder(out)
        try:
            progress = json.loads((folder / "progress.json").read_text())
            finished, unit = (progress["step"], "step") if "step" in progress else (progress["next_block"], "block")
        except (OSError, ValueError, KeyError, TypeError):
            finished, unit = 0, "block"
        if finished:
            kept = (f"{finished} finished block(s) are kept" if unit == "block"
                    else f"the fit's state after step {finished} is kept")  # fmt: skip
            message += f" ({kept} in {str(folder)!r}: add --resume to continue)"
        elif distributed.is_main():
            shutil.rmtree(folder, ignore_errors=True)
        raise WriteError(message) from None


def _read_kept(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)`` of a checkpoint file; a damaged or missing one is one FileError line."""
    try:
        return read(path)
    except Exception as exc:  # safetensors raises its own type for a truncated file
        raise FileError(f"checkpoint file {str(path)!r} is damaged ({first_line(exc, 200)}); run again without "
                        f"--resume to start over") from None  # fmt: skip


class BlockCheckpoint:
    """The resumable state of one run, in ``folder``; ``fingerprint`` must match to resume."""

    def __init__(self, folder: Path, fingerprint: dict) -> None:
        self.folder = Path(folder)
        # Normalised as it is stored; each rank's activations are its share, so a resume needs as many processes.
        self.fingerprint = json.loads(json.dumps({**fingerprint, "processes": distributed.world_size()}))

    @classmethod
    def for_output(cls, out: Path, fingerprint: dict) -> BlockCheckpoint:
        return cls(partial_folder(out), fingerprint)

    def start(self, resume: bool) -> tuple[int, list[dict], dict[str, torch.Tensor]]:
        """Begin a run: ``(next_block, reports, carried tensors)``; fresh unless ``resume`` finds a state."""
        progress_file = self.folder / "progress.json"
        if resume and progress_file.exists():
            progress = _read_kept(progress_file, lambda path: json.loads(path.read_text()))
            if not isinstance(progress, dict) or not {"fingerprint", "next_block", "reports"} <= set(progress):
                raise FileError(f"checkpoint file {str(progress_file)!r} is damaged (not a progress record); run "
                                f"again without --resume to start over")  # fmt: skip
            _same_settings(self.folder, progress["fingerprint"], self.fingerprint)
            next_block = progress["next_block"]
            carry = _read_kept(self._carry_file(next_block), lambda path: load_file(str(path)))
            return next_block, progress["reports"], carry

        def fresh() -> None:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)

        distributed.on_main(fresh, "starting the checkpoint")
        return 0, [], {}

    def _carry_file(self, next_block: int) -> Path:
        rank = f".rank{distributed.rank()}" if distributed.active() else ""
        return self.folder / f"carry_{next_block}{rank}.safetensors"

    def restore_blocks(self, blocks: nn.ModuleList, next_block: int) -> None:
        """Load the saved weights of every finished block into ``blocks``."""
        for index in range(next_block):
            state = _read_kept(self.folder / f"block_{index}.safetensors", lambda path: load_file(str(path)))
            blocks[index].load_state_dict(state, strict=True)

    def save_block(self, index: int, block: nn.Module) -> None:
        """Block ``index``'s weights (again, when a later step changed a finished block)."""
        save_tensors_atomically(block.state_dict(), self.folder / f"block_{index}.safetensors")

    def save(
        self, index: int, block: nn.Module | None, carry: dict[str, torch.Tensor], reports: list[dict], total: int
    ) -> None:
        """``block`` None: the block's weights are already in the folder (the streamed path's block store)."""
        if block is not None:
            distributed.on_main(lambda: self.save_block(index, block), "checkpointing")
        save_tensors_atomically(carry, self._carry_file(index + 1))
        progress = {"next_block": index + 1, "blocks_total": total, "reports": reports, "fingerprint": self.fingerprint}
        distributed.barrier("checkpointing")  # every rank's carry is written before progress.json names it
        text = json.dumps(progress, indent=2)
        distributed.on_main(lambda: write_file_atomically(self.folder / "progress.json", text), "checkpointing")
        self._carry_file(index).unlink(missing_ok=True)

    def clear(self) -> None:
        distributed.on_main(lambda: shutil.rmtree(self.folder, ignore_errors=True), "clearing the checkpoint")


class FitCheckpoint:
    """The resumable state of one whole-model fit (SquareHead, LoRA, S²FT, full fine-tuning), in ``folder``.

    :func:`sparsefit.recover.training.train_loop` saves, after a step, every trained tensor, AdamW's moments and
    step counts, the best held-out state, the random state and its own counters (``fit_<step>.safetensors``, then
    ``progress.json`` naming it, then the older file removed: a run killed at any moment resumes from the last
    state fully saved). It saves every ``every_s`` seconds of training (or every ``every_steps`` steps), and when
    the run is interrupted between two steps. A resumed fit skips the batches it has done and continues
    bit-identically: the model it starts from is loaded again from the unchanged input, and what the fit computes
    before its first step (the probe and held-out losses, LoRA's initial factors, S²FT's choice) is recomputed.

    Under torchrun every rank holds the same trained state: rank 0 writes it, every rank reads it back.
    """

    def __init__(self, folder: Path, fingerprint: dict, *, resume: bool = False, every_s: float = 300.0,
                 every_steps: int = 0) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps({**fingerprint, "processes": distributed.world_size()}))
        self.resume = resume
        self.every_s, self.every_steps = every_s, every_steps
        self.saved_step = 0
        self._last_save = 0.0

    @classmethod
    def for_output(cls, out: Path, fingerprint: dict, **kwargs) -> FitCheckpoint:
        return cls(partial_folder(out), fingerprint, **kwargs)

    def saved(self) -> dict | None:
        """The saved fit's progress record when resuming finds one with this run's settings (else one line, before
        a job loads its model); None when there is none or the run starts over."""
        progress_file = self.folder / "progress.json"
        if not (self.resume and progress_file.exists()):
            return None
        progress = _read_kept(progress_file, lambda path: json.loads(path.read_text()))
        if not isinstance(progress, dict) or not {"fingerprint", "step", "loop"} <= set(progress):
            raise FileError(f"checkpoint file {str(progress_file)!r} is damaged (not a fit's progress record); "
                            f"run again without --resume to start over")  # fmt: skip
        _same_settings(self.folder, progress["fingerprint"], self.fingerprint)
        return progress

    def start(self, now: float) -> tuple[int, dict, dict[str, torch.Tensor]] | None:
        """``(step, loop state, tensors)`` of the saved fit when resuming finds one; else a fresh folder and None.
        ``now``: the loop's clock, from which the next save is timed."""
        self._last_save = now
        progress = self.saved()
        if progress is not None:
            tensors = _read_kept(self._file(progress["step"]), lambda path: load_file(str(path)))
            self.saved_step = progress["step"]
            return progress["step"], progress["loop"], tensors
        # A fresh fit drops an earlier state; its own folder comes with its first save, so a fit that stops before
        # one leaves nothing behind.
        distributed.on_main(lambda: shutil.rmtree(self.folder, ignore_errors=True), "starting the checkpoint")
        return None

    def _file(self, step: int) -> Path:
        return self.folder / f"fit_{step}.safetensors"

    def due(self, step: int, now: float) -> bool:
        if self.every_steps:
            return step % self.every_steps == 0
        return now - self._last_save >= self.every_s

    def save(self, step: int, loop: dict, tensors: dict[str, torch.Tensor], now: float) -> None:
        """The state after ``step`` (rank 0 writes; every rank holds the same)."""
        self._last_save = now
        if step <= self.saved_step:
            return
        if distributed.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            save_tensors_atomically(tensors, self._file(step))
            progress = {"step": step, "loop": loop, "fingerprint": self.fingerprint}
            write_file_atomically(self.folder / "progress.json", json.dumps(progress, indent=2))
            if self.saved_step:
                self._file(self.saved_step).unlink(missing_ok=True)
        self.saved_step = step

    def clear(self) -> None:
        distributed.on_main(lambda: shutil.rmtree(self.folder, ignore_errors=True), "clearing the checkpoint")


def _same_settings(folder: Path, saved: dict, current: dict) -> None:
    """One UsageError line naming the settings that differ between a saved run and this one."""
    if saved != current:
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise UsageError(f"cannot resume {str(folder)!r}: the settings differ ({', '.join(changed)}); "
                         "run again with the same settings, or without --resume")  # fmt: skip
