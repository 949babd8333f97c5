"""Perplexity by the WikiText-2 protocol used by SparseGPT, Wanda, DSnoT and EBFT.

The test text is tokenized once (``sparsefit.data.test_stream``), cut into non-overlapping windows of
``seqlen`` tokens (the remainder is dropped), and

    ppl = exp( sum_w nll_w / (n_windows * seqlen) ),   nll_w = seqlen * mean CE of window w's shifted logits.

Each window predicts only its last ``seqlen - 1`` tokens, yet the reference multiplies that mean by ``seqlen``;
we keep this exact convention (it equals ``exp`` of the mean per-window loss) so numbers compare with the
papers'. The sequence length changes the number: always report it with the number.

A tokenizer that puts a BOS in front of every text (Gemma, Llama-2/3: ``sparsefit.data.window_prefix``) gets that
prefix in front of every window, as the model saw documents in training: pass ``prefix=window_prefix(tokenizer)``.
A window is then the prefix plus ``seqlen - len(prefix)`` stream tokens (still ``seqlen`` positions), and every one
of those stream tokens is scored -- the prefix never is -- so a window with a BOS again scores ``seqlen - 1``
tokens, and the formula above is unchanged. The stream's own leading prefix (from tokenizing the whole text in one
call) is dropped first. Measured at seqlen 512 on the first 16,384 ``wiki`` test tokens: Gemma-3-270M 29.4 without
a BOS, 15.0 with one per window; SmolLM2-135M, whose tokenizer adds none (prefix ``[]``, the reference
protocol), 16.2, and 16.4 with its ``<|im_start|>`` put in front of each window.

C4 follows the reference's extra cut (SparseGPT/Wanda/EBFT ``get_c4``: ``valenc[:, :(256 * seqlen)]``): only the
first 256 windows of the stream are evaluated, whatever the seqlen. Callers pass ``max_windows=corpus.max_windows``
(``sparsefit.data.Corpus``), which is 256 for ``c4`` and None (every window) for the other corpora.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsefit.data.calibration import check_prefix
from sparsefit.distributed import WindowShard, sum_values
from sparsefit.errors import UsageError
from sparsefit.evaluate.streamed import streamed_head, walk_hidden


@dataclass(frozen=True)
class PerplexityResult:
    value: float
    seqlen: int
    tokens: int  # stream tokens the windows hold: n_windows * (seqlen - len(prefix)); the remainder is dropped
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _check_int(name: str, value, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{name} {value!r} is not accepted; give a positive integer such as {example}")


def eval_windows(
    stream: torch.Tensor,
    seqlen: int,
    max_tokens: int | None = None,
    max_windows: int | None = None,
    prefix: Sequence[int] = (),
) -> torch.Tensor:
    """The windows that :func:`perplexity` evaluates: LongTensor (n_windows, seqlen).

    The stream (LongTensor (1, T) or (T,)) loses a leading ``prefix``, is cut to its first ``max_tokens`` tokens and
    its first ``max_windows`` windows (each when given), then into whole windows of ``seqlen - len(prefix)`` tokens
    (the remainder is dropped), each behind ``prefix``. With no prefix and ``max_windows=256`` this is the reference
    C4 protocol, ``valenc[:, :(256 * seqlen)]`` then ``numel() // seqlen`` windows: a stream shorter than that gives
    fewer windows, as there.
    """
    _check_int("seqlen", seqlen, 1024)
    if seqlen < 2:
        raise UsageError(f"seqlen {seqlen} is too short to predict a token; give at least 2, such as 1024")
    prefix = check_prefix(prefix, seqlen)
    body = seqlen - len(prefix)  # stream tokens per window
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 16384)
        if max_tokens < seqlen:
            raise UsageError(f"max_tokens {max_tokens} is smaller than seqlen {seqlen}; give at least one window")
    if max_windows is not None:
        _check_int("max_windows", max_windows, 256)
    if stream.dim() == 2 and stream.shape[0] == 1:
        stream = stream[0]
    if stream.dim() != 1 or stream.dtype not in (torch.long, torch.int32, torch.int64):
        raise UsageError(
            f"token stream of shape {tuple(stream.shape)} and {stream.dtype} is not accepted; give a LongTensor (1, T)"
        )
    if prefix and stream[: len(prefix)].tolist() == prefix:
        stream = stream[len(prefix) :]  # the prefix the tokenizer put in front of the whole text
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if max_windows is not None:
        stream = stream[: max_windows * body]
    windows = stream.numel() // body
    if windows == 0:
        raise UsageError(
            f"seqlen {seqlen} is longer than the evaluation text ({stream.numel()} tokens); use a smaller --seqlen"
        )
    data = stream[: windows * body].to(torch.long).view(windows, body)
    if prefix:
        data = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(windows, -1), data], dim=1)
    return data


@torch.no_grad()
def perplexity(
    model: nn.Module,
    stream: torch.Tensor,
    seqlen: int = 1024,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_windows: int | None = None,
    prefix: Sequence[int] = (),
) -> PerplexityResult:
    """Perplexity of ``model`` on a token ``stream`` (LongTensor (1, T) or (T,)) in windows of ``seqlen``.

    ``max_tokens`` keeps only the first tokens of the stream, ``max_windows`` only its first windows (pass the
    corpus's ``max_windows``: 256 for C4, the reference protocol; see :func:`eval_windows`). ``device`` (default:
    where the model is) runs the model there; a model moved for this call is moved back afterwards.
    ``progress(done, total)`` is called after each batch with window counts. ``prefix`` (token ids, e.g.
    ``sparsefit.data.window_prefix(tokenizer)``) starts every window and is never scored; see the module docstring.
    Under torchrun the windows are shared by the ranks and the losses summed (``progress`` counts this rank's).
    """
    _check_int("batch_size", batch_size, 1)
    data = eval_windows(stream, seqlen, max_tokens, max_windows, prefix)
    skip = max(len(prefix) - 1, 0)  # logits before the last prefix position predict prefix tokens: not scored
    windows = data.shape[0]
    shard = WindowShard.spread(windows)
    data = shard.take(data)
    context = _context_length(model)
    if context is not None and seqlen > context:
        raise UsageError(
            f"seqlen {seqlen} is longer than the model's context ({context} positions); use a smaller --seqlen"
        )

    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    target = torch.device(device) if device is not None else home
    # A model spread over devices by accelerate (hf_device_map) must not be moved as a whole.
    movable = target != home and not getattr(model, "hf_device_map", None)
    was_training = model.training
    model.eval()
    if movable:
        model.to(target)
    try:
        total_nll = 0.0  # float64 (Python) accumulator; each window's nll is computed in float32
        done = 0
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size].to(target)
            logits = model(input_ids=batch, use_cache=False).logits
            for row in range(batch.shape[0]):  # one window at a time keeps the float32 copy of the logits small
                shifted = logits[row, skip:-1, :].float()
                loss = F.cross_entropy(shifted, batch[row, skip + 1 :].to(shifted.device), reduction="mean")
                total_nll += loss.item() * seqlen  # the reference's convention (see the module docstring)
            done += batch.shape[0]
            del logits
            if progress is not None:
                progress(done, data.shape[0])
    finally:
        if movable:
            model.to(home)
        model.train(was_training)
    return _reduced(total_nll, shard, windows, seqlen, prefix)


@torch.no_grad()
def streamed_perplexity(
    source,
    stream: torch.Tensor,
    seqlen: int = 1024,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    max_windows: int | None = None,
    activations=None,
    prefix: Sequence[int] = (),
) -> PerplexityResult:
    """:func:`perplexity` of a model whose blocks stream from its shards (``source``: a
    :class:`sparsefit.walk.blocks.StreamedBlocks`): the embeddings give every window's hidden states, each block
    in turn runs on all of them (one block in memory), then the final norm and head give each window's loss.

    Each block runs on one window at a time, as the in-memory forward does with ``batch_size=1``, so the numbers
    are the same on the CPU. ``activations`` keeps the hidden states (default: float32 in memory).
    ``progress(done, total)`` counts blocks, then windows. ``prefix`` starts every window, as in :func:`perplexity`.
    """
    data = eval_windows(stream, seqlen, max_tokens, max_windows, prefix)
    skip = max(len(prefix) - 1, 0)
    total_windows = data.shape[0]
    shard = WindowShard.spread(total_windows)  # under torchrun: this rank's windows, the losses summed
    data = shard.take(data)
    windows = data.shape[0]
    context = _context_length(source.model)
    if context is not None and seqlen > context:
        raise UsageError(
            f"seqlen {seqlen} is longer than the model's context ({context} positions); use a smaller --seqlen"
        )
    total_nll = 0.0
    if windows == 0:  # under torchrun, a rank with no window of a short text adds nothing
        return _reduced(total_nll, shard, total_windows, seqlen, prefix)
    hidden = walk_hidden(source, [data], device=device, activations=activations,
                         progress=(lambda done, _total: progress(done, len(source) + windows)) if progress else None)[0]
    with streamed_head(source, device) as head:
        for row in range(windows):
            batch = data[row : row + 1]
            logits = head(batch, hidden[row : row + 1])
            shifted = logits[0, skip:-1, :].float()
            loss = F.cross_entropy(shifted, batch[0, skip + 1 :].to(shifted.device), reduction="mean")
            total_nll += loss.item() * seqlen  # the reference's convention (see the module docstring)
            if progress is not None:
                progress(len(source) + row + 1, len(source) + windows)
    return _reduced(total_nll, shard, total_windows, seqlen, prefix)


def _reduced(total_nll: float, shard: WindowShard, windows: int, seqlen: int,
             prefix: Sequence[int]) -> PerplexityResult:  # fmt: skip
    """The perplexity of all ``windows`` from this rank's summed nll (under torchrun, summed over the ranks)."""
    if not shard.single:
        total_nll = sum_values(total_nll)[0]
    value = math.exp(total_nll / (windows * seqlen))
    return PerplexityResult(value=value, seqlen=seqlen, tokens=windows * (seqlen - len(prefix)), windows=windows)
