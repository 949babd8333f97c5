"""Per-block checkpoints, so a long walk resumes at the block where it stopped.

After each finished block: its weights go to ``block_<i>.safetensors``, the next block's inputs
(and any other carried activations) to ``carry.safetensors``, then ``progress.json`` names the
next block. Every file is written to a temp name and renamed, and ``progress.json`` is renamed
last, so a run killed at any moment resumes from the last block that was fully saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sparsefit.atomic import save_tensors_atomically, write_file_atomically
from sparsefit.errors import UsageError


class BlockCheckpoint:
    """The resumable state of one run, in ``folder``; ``fingerprint`` must match to resume."""

    def __init__(self, folder: Path, fingerprint: dict) -> None:
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised as it is stored

    @classmethod
    def for_output(cls, out: Path, fingerprint: dict) -> BlockCheckpoint:
        out = Path(out)
        return cls(out.parent / f".{out.name}.partial", fingerprint)

    def start(self, resume: bool) -> tuple[int, list[dict], dict[str, torch.Tensor]]:
        """Begin a run: ``(next_block, reports, carried tensors)``; fresh unless ``resume`` finds a state."""
        progress_file = self.folder / "progress.json"
        if resume and progress_file.exists():
            progress = json.loads(progress_file.read_text())
            if progress["fingerprint"] != self.fingerprint:
                changed = sorted(
                    k for k in set(progress["fingerprint"]) | set(self.fingerprint)
                    if progress["fingerprint"].get(k) != self.fingerprint.get(k)
                )  # fmt: skip
                raise UsageError(
                    f"cannot resume {str(self.folder)!r}: the settings differ ({', '.join(changed)}); "
                    "run again with the same settings, or without --resume"
                )
            return progress["next_block"], progress["reports"], load_file(str(self.folder / "carry.safetensors"))
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        return 0, [], {}

    def restore_blocks(self, blocks: nn.ModuleList, next_block: int) -> None:
        """Load the saved weights of every finished block into ``blocks``."""
        for index in range(next_block):
            state = load_file(str(self.folder / f"block_{index}.safetensors"))
            blocks[index].load_state_dict(state, strict=True)

    def save_block(self, index: int, block: nn.Module) -> None:
        """Block ``index``'s weights (again, when a later step changed a finished block)."""
        save_tensors_atomically(block.state_dict(), self.folder / f"block_{index}.safetensors")

    def save(
        self, index: int, block: nn.Module | None, carry: dict[str, torch.Tensor], reports: list[dict], total: int
    ) -> None:
        """``block`` None: the block's weights are already in the folder (the streamed path's block store)."""
        if block is not None:
            self.save_block(index, block)
        save_tensors_atomically(carry, self.folder / "carry.safetensors")
        progress = {"next_block": index + 1, "blocks_total": total, "reports": reports, "fingerprint": self.fingerprint}
        write_file_atomically(self.folder / "progress.json", json.dumps(progress, indent=2))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
