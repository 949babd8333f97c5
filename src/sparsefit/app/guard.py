"""The model-level guard: a recovery that made the whole model worse is caught, said, and by default undone.

Every block's fit is already kept only if it lowered that block's error on held-out calibration windows
(``recover/ebft.py``). That is not enough: a block can fit its windows better and still hand the blocks after it
inputs they do worse on. On Gemma-3-270M (issue 21) every block's held-out error fell while wiki perplexity went
from 38 to 179. So the job keeps windows of the calibration corpus out of everything — drawn right after the
calibration windows by the same sampler and seed, so never trained on — and measures the whole model's next-token
loss on them before recovery (the pruned model: the same masks, the weights before any recovery step) and after.
When recovery raised it, the run says so on stderr, in ``report.md`` and in ``run.json``, and by default writes the
pruned model instead (``--guard warn`` keeps the recovered one, ``--guard off`` measures nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsefit import distributed
from sparsefit.app import defaults
from sparsefit.atomic import save_tensors_atomically
from sparsefit.data import calibration_windows
from sparsefit.errors import UsageError, check
from sparsefit.evaluate.streamed import streamed_head, walk_hidden
from sparsefit.recover.training import causal_lm_loss
from sparsefit.walk.shards import load_tensors
from sparsefit.walk.walker import BlockContext, BlockStep

GUARD_MODES = ("fallback", "warn", "off")


def check_mode(mode: str, where: str = "--guard") -> str:
    check(mode in GUARD_MODES, f"{where} {mode!r} is not one of {', '.join(GUARD_MODES)}")
    return mode


def guard_length(config, seqlen: int, length: int = defaults.GUARD_SEQLEN) -> int:
    """The guard's window length: the evaluation's (``length``), within the model's positions, and never shorter
    than the calibration windows (``seqlen``). Measured at the calibration length only, the guard kept a Gemma-3-270M
    recovery on 256-token windows that made 1,024-token perplexity worse (issue 33, bench/results/generalize.md)."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        length = min(length, positions)
    return max(seqlen, length)


def _runs(windows: torch.Tensor, size: int) -> set[int]:
    """The hash of every run of ``size`` consecutive tokens in ``windows`` (whole windows, when shorter): a set of
    ints, not of tuples, holds the paper preset's 256 x 1,024 calibration windows in ~10 MB."""
    runs = set()
    for row in windows.tolist():
        width = min(size, len(row))
        runs.update(hash(tuple(row[i : i + width])) for i in range(len(row) - width + 1))
    return runs


def guard_windows(tokenizer, corpus, nsamples: int, seqlen: int, seed: int, calib: torch.Tensor,
                  length: int | None = None, tokens: int = defaults.GUARD_TOKENS) -> torch.Tensor:  # fmt: skip
    """Windows of the calibration corpus that no step trains on, ``length`` tokens long (default ``seqlen``).

    Longer than the calibration windows, they are drawn with another seed, and a window that shares a run of
    ``GUARD_OVERLAP`` tokens with a calibration window is drawn again; a corpus too small for that halves the
    length, down to ``seqlen``. At the calibration length they are the sampler's next draws after ``calib``: the
    samplers draw window after window from one seeded generator, so drawing ``nsamples + count`` windows gives the
    calibration windows first and then ``count`` new ones (where the sampler's first draws differ for the larger
    count, they are drawn as the longer ones are; from a corpus too small for that, by another seed alone).
    """
    length = seqlen if length is None else max(length, seqlen)
    seen = _runs(calib, defaults.GUARD_OVERLAP)  # once, for every length tried
    while length > seqlen:
        windows = _clean_windows(tokenizer, corpus, seed, seen, length, tokens)
        if windows is not None:
            return windows
        length = max(seqlen, length // 2)
    count = max(defaults.GUARD_MIN_WINDOWS, math.ceil(tokens / seqlen))
    both = calibration_windows(tokenizer, corpus, nsamples + count, seqlen, seed)
    if torch.equal(both[:nsamples], calib):
        return both[nsamples:]
    windows = _clean_windows(tokenizer, corpus, seed, seen, seqlen, tokens)
    if windows is None:  # a corpus that is hardly more than its calibration windows: held out by seed only
        windows = calibration_windows(tokenizer, corpus, count, seqlen, seed + 1_000_003)
    return windows


def _clean_windows(tokenizer, corpus, seed: int, seen: set[int], length: int, tokens: int):
    """``tokens / length`` windows of ``length`` drawn with another seed that share no run of ``GUARD_OVERLAP``
    tokens with the calibration windows (``seen``: their :func:`_runs`); None when the corpus has too little text."""
    count = max(defaults.GUARD_MIN_WINDOWS, math.ceil(tokens / length))
    for attempt in range(4):  # draws of 2x, 4x, 8x, 16x the windows needed, until enough are clean
        try:
            drawn = calibration_windows(tokenizer, corpus, count << (attempt + 1), length, seed + 1_000_003 + attempt)
        except UsageError:  # the corpus holds no window this long
            return None
        kept = [row for row in drawn if seen.isdisjoint(_runs(row[None], defaults.GUARD_OVERLAP))]
        if len(kept) >= count:
            return torch.stack(kept[:count])
    return None


@torch.no_grad()
def lm_loss(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 4) -> float:
    """The model's mean next-token loss over ``windows`` (equal lengths, so the mean of the batches' means).

    A batch holds at most ``defaults.GUARD_BATCH_TOKENS`` tokens: the logits of Gemma's 262k-word vocabulary take
    1 GiB per 1,024 tokens."""
    model.to(device)
    model.eval()
    batch_size = max(1, min(batch_size, defaults.GUARD_BATCH_TOKENS // windows.shape[1]))
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        total += float(causal_lm_loss(model, batch)) * batch.shape[0]
    model.to("cpu")
    return total / windows.shape[0]


@dataclass
class GuardResult:
    """What the guard measured and did; ``run.json["guard"]``."""

    mode: str
    windows: int
    tokens: int
    pruned_loss: float | None = None
    recovered_loss: float | None = None
    dense_loss: float | None = None
    worse: bool = False
    action: str = "kept the recovered model"
    skipped: str | None = None  # why nothing was measured (a resumed walk, a streamed run, --guard off)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for stderr and the reports."""
        if self.skipped:
            return f"model guard: not measured ({self.skipped})"
        change = self.recovered_loss - self.pruned_loss
        head = (f"model guard: held-out loss ({self.windows} windows, {self.tokens} tokens of the calibration corpus) "
                f"pruned {self.pruned_loss:.4f} -> recovered {self.recovered_loss:.4f} ({change:+.4f})")  # fmt: skip
        if self.dense_loss is not None:
            head += f", dense {self.dense_loss:.4f}"
        verdict = "recovery made the model worse" if self.worse else "recovery improved the model"
        return f"{head}: {verdict}; {self.action}"

    def markdown(self) -> str:
        return f"## Model guard\n\n{self.line()}.\n"


def decide(mode: str, windows: torch.Tensor, pruned: float, recovered: float,
           dense: float | None = None) -> GuardResult:  # fmt: skip
    """Whether recovery made the model worse (a higher held-out loss, or a non-finite one), and what to keep."""
    worse = not math.isfinite(recovered) or (math.isfinite(pruned) and recovered > pruned)
    action = "kept the recovered model"
    if worse:
        action = ("wrote the pruned model instead (its weights before recovery; --guard warn keeps the recovered one)"
                  if mode == "fallback" else "kept the recovered model (--guard warn)")  # fmt: skip
    return GuardResult(mode, windows.shape[0], windows.numel(), pruned, recovered, dense, worse, action)


def skipped(mode: str, windows: torch.Tensor | None, reason: str) -> GuardResult:
    count, tokens = (windows.shape[0], windows.numel()) if windows is not None else (0, 0)
    return GuardResult(mode, count, tokens, action="kept the recovered model", skipped=reason)


def snapshot(modules: Iterable[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """A CPU copy of every parameter and buffer of ``modules``, to put back with :func:`restore`."""
    return [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for m in modules]


@torch.no_grad()
def restore(modules: Iterable[nn.Module], states: list[dict[str, torch.Tensor]]) -> None:
    for module, state in zip(modules, states, strict=True):
        current = module.state_dict()
        for name, value in state.items():
            current[name].copy_(value)


@torch.no_grad()
def swap(modules: Iterable[nn.Module], states: list[dict[str, torch.Tensor]]) -> None:
    """Exchange the modules' values with ``states`` in place (twice gives back the start)."""
    for module, state in zip(modules, states, strict=True):
        current = module.state_dict()
        for name, value in state.items():
            held = current[name].detach().to("cpu", copy=True)
            current[name].copy_(value)
            state[name] = held


class PrunedBlocks(BlockStep):
    """A walk step between pruning and recovery: keeps each block as pruned, before any recovery step changes it.

    The interleaved walk never holds the whole pruned-only model, so this is what the guard compares the recovered
    model against: the same masks, the weights as the pruning step left them. With a ``folder`` (the run's
    checkpoint folder) each block is a file there, so a streamed walk holds none of them and a ``--resume`` finds
    the ones kept before it; without, a CPU copy of each block.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.blocks: dict[int, dict[str, torch.Tensor]] = {}

    def file(self, index: int) -> Path:
        return self.folder / f"pruned_{index}.safetensors"

    def __call__(self, ctx: BlockContext) -> None:
        state = snapshot([ctx.block])[0]
        if self.folder is None:
            self.blocks[ctx.index] = state
        else:
            distributed.on_main(lambda: save_tensors_atomically(state, self.file(ctx.index)), "keeping a pruned block")

    def complete(self, n_blocks: int) -> bool:
        return all(i in self.blocks or (self.folder is not None and self.file(i).exists()) for i in range(n_blocks))

    def state(self, index: int) -> dict[str, torch.Tensor]:
        return self.blocks[index] if index in self.blocks else load_tensors(self.file(index))

    def states(self, n_blocks: int) -> list[dict[str, torch.Tensor]]:
        return [self.state(i) for i in range(n_blocks)]


def check_recovery(model: nn.Module, modules: list[nn.Module], pruned_states: list[dict[str, torch.Tensor]],
                   windows: torch.Tensor, mode: str, device: torch.device, dense_loss: float | None = None,
                   batch_size: int = 4) -> GuardResult:  # fmt: skip
    """The recovered ``model`` against itself with ``modules`` set to ``pruned_states``, on the held-out windows.

    ``model`` ends as the one to write: the recovered model, or with ``mode`` fallback and a worse recovery, the
    pruned one (``pruned_states`` then hold the recovered values).
    """
    recovered = lm_loss(model, windows, device, batch_size)
    swap(modules, pruned_states)
    pruned = lm_loss(model, windows, device, batch_size)
    result = decide(mode, windows, pruned, recovered, dense_loss)
    if not (result.worse and mode == "fallback"):
        swap(modules, pruned_states)
    return result


@torch.no_grad()
def streamed_lm_loss(source, windows: torch.Tensor, device: torch.device) -> float:
    """:func:`lm_loss` of a streamed model (a :class:`sparsefit.walk.blocks.StreamedBlocks`, or a view of one): the
    windows walked block by block, then the model's own final norm and head."""
    hidden = walk_hidden(source, [windows], device=device)[0]
    total = 0.0
    with streamed_head(source, device) as head:
        for row in range(windows.shape[0]):
            logits = head(windows[row : row + 1], hidden[row : row + 1])[0, :-1].float()
            total += F.cross_entropy(logits, windows[row, 1:].to(logits.device)).item()
    return total / windows.shape[0]


class FinishedBlocks:
    """The finished blocks of a streamed walk as a source to walk again: each as stored, or with ``pruned``'s state.

    :func:`walk_hidden` and :func:`streamed_head` read ``model``, ``adapter``, ``modules``, ``head_paths`` and
    ``load`` / ``release`` of it.
    """

    def __init__(self, source, pruned: PrunedBlocks | None = None) -> None:
        self.source, self.pruned = source, pruned
        self.model, self.adapter = source.model, source.adapter

    def __len__(self) -> int:
        return len(self.source)

    def modules(self, *paths: str):
        return self.source.modules(*paths)

    def head_paths(self) -> tuple[str, ...]:
        return self.source.head_paths()

    def load(self, index: int) -> nn.Module:
        block = self.source.reload(index)
        if self.pruned is not None:
            restore([block], [self.pruned.state(index)])
        return block

    def release(self, index: int) -> None:
        self.source.release(index)


def check_streamed_recovery(source, pruned: PrunedBlocks | None, windows: torch.Tensor, mode: str,
                            device: torch.device, dense_loss: float | None = None) -> GuardResult:  # fmt: skip
    """:func:`check_recovery` for a streamed walk, on the blocks stored in the run's partial folder.

    The pruned model is ``pruned``'s blocks, or with None the source's own (a two-step recovery reads a pruned run
    folder). A fall back stores the pruned blocks in place of the recovered ones, one block at a time.
    """
    recovered = streamed_lm_loss(FinishedBlocks(source), windows, device)
    reference = FinishedBlocks(source, pruned) if pruned is not None else source
    result = decide(mode, windows, streamed_lm_loss(reference, windows, device), recovered, dense_loss)
    if result.worse and mode == "fallback":
        for index in range(len(source)):
            block = reference.load(index)
            distributed.on_main(lambda i=index: source.store(i), "storing a pruned block")
            del block
            source.release(index)
    return result
