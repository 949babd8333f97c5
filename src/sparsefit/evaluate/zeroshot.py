"""Zero-shot accuracy on eight standard tasks, scored as lm-evaluation-harness scores them, offline.

Every task is a list of loglikelihood requests ``(context, continuation)``. A request is tokenized as lm-eval's
``HFLM._encode_pair`` does (trailing spaces of the context move to the continuation; the continuation tokens are
``encode(context + continuation)`` minus the first ``len(encode(context))`` tokens), and scored from one forward
over context + continuation. Requests are sorted by length and batched with right padding; requests whose model
inputs are identical (one-token continuations after the same context, e.g. BoolQ's " no" / " yes") share one row.

Metrics: ``acc`` picks the choice with the highest loglikelihood, ``acc_norm`` the highest loglikelihood per
character of the choice (lm-eval's acc_norm), and LAMBADA reports greedy-match accuracy and
``ppl = exp(-mean loglikelihood of the last word)``. Ties go to the first choice, as ``numpy.argmax`` does.

lm-eval divides by ``len(choice)``, not by the length of the scored continuation ``" " + choice`` that oe-eval's
``acc_per_char`` uses; on SmolLM2 and the first 100 documents that moves acc_norm by up to 0.03 (BoolQ 0.58 vs 0.55).
"""

from __future__ import annotations

import bisect
import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsefit.data.calibration import window_prefix
from sparsefit.distributed import WindowShard, all_gather
from sparsefit.errors import UsageError
from sparsefit.evaluate.tasks import TASKS, Doc, check_limit, check_task, load_task

__all__ = ["TASKS", "evaluate_tasks", "loglikelihoods", "parse_tasks", "score_docs"]

# progress(task, requests_done, requests_total), called after every batch.
Progress = Callable[[str, int, int], None]


def parse_tasks(spec: str) -> list[str]:
    """``"arc_easy,piqa"`` -> ``["arc_easy", "piqa"]``; ``"all"`` gives every task. Duplicates are dropped."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise UsageError(f"no task named in {spec!r}; known tasks: {', '.join(TASKS)} (or 'all')")
    if names == ["all"]:
        return list(TASKS)
    for name in names:
        check_task(name)
    return list(dict.fromkeys(names))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _start_token(tokenizer) -> int:
    """What an empty context conditions on: lm-eval's ``HFLM.prefix_token_id``, the BOS token, else the EOS token."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UsageError("an empty context needs a tokenizer with a bos or eos token")
    return start


def _encode_pair(tokenizer, prefix: list[int], context: str, continuation: str) -> tuple[list[int], list[int]]:
    if not context:
        # lm-eval (0.4.3 on): the bare continuation after the start token, or after its own first token when that
        # is the start token already.
        start = _start_token(tokenizer)
        continuation_ids = _encode(tokenizer, continuation)
        if continuation_ids[:1] == [start]:
            context_ids, continuation_ids = continuation_ids[:1], continuation_ids[1:]
        else:
            context_ids = [start]
        if not continuation_ids:
            raise UsageError(f"continuation {continuation!r} encodes to no tokens")
        return context_ids, continuation_ids
    # lm-eval: a trailing space belongs to the continuation, where BPE tokenizers attach it to the next word.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    continuation_ids = whole[len(context_ids) :]
    context_ids = prefix + context_ids
    if not context_ids:
        # A context of spaces only (lm-eval scores it wrongly): condition on the start token as for an empty one.
        context_ids = [_start_token(tokenizer)]
    if not continuation_ids:
        raise UsageError(f"continuation {continuation!r} encodes to no tokens")
    return context_ids, continuation_ids


def _max_length(model: nn.Module, tokenizer) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(getattr(model, "config", None), attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else 2048


@dataclass
class Encoded:
    """The requests as model inputs: ``inputs[i]`` (the context and continuation, less the last token, whose
    prediction nobody needs, cut on the left to the model's positions as lm-eval does) and ``targets[i]`` (the
    continuation tokens it predicts). Requests with the same input share one forward (``rows``)."""

    inputs: list[tuple[int, ...]]
    targets: list[list[int]]
    rows: dict[tuple[int, ...], list[int]]

    @classmethod
    def of(cls, tokenizer, requests: Sequence[tuple[str, str]], max_length: int) -> Encoded:
        prefix = window_prefix(tokenizer)  # what lm-eval's tok_encode puts in front: a BOS for Gemma, none for SmolLM2
        inputs, targets, rows = [], [], {}
        for index, (context, continuation) in enumerate(requests):
            context_ids, continuation_ids = _encode_pair(tokenizer, prefix, context, continuation)
            whole = (context_ids + continuation_ids)[-(max_length + 1) :]
            inputs.append(tuple(whole[:-1]))
            targets.append(continuation_ids[-(len(whole) - 1) :])
            rows.setdefault(inputs[-1], []).append(index)
        return cls(inputs, targets, rows)

    def first_scored(self, inputs: tuple[int, ...]) -> int:
        """The first position of ``inputs`` whose logits some request sharing it needs."""
        return min(len(inputs) - len(self.targets[i]) for i in self.rows[inputs])

    def score(self, inputs: tuple[int, ...], logits: torch.Tensor, offset: int, results: list) -> int:
        """Fill ``results`` for every request of ``inputs`` from its ``logits`` (positions ``offset ..``, one row);
        returns how many requests were scored."""
        for index in self.rows[inputs]:
            target = self.targets[index]
            begin = len(inputs) - len(target) - offset
            scores = torch.log_softmax(logits[begin : begin + len(target)].float(), dim=-1)
            target_ids = torch.tensor(target, device=scores.device)
            logprob = scores.gather(1, target_ids[:, None]).sum().item()
            greedy = bool((scores.argmax(dim=-1) == target_ids).all())
            results[index] = (logprob, greedy)
        return len(self.rows[inputs])


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation tokens | context), all continuation tokens are the greedy argmax)`` per request.

    ``model`` must already be on ``device``. ``progress(done, total)`` counts requests.
    """
    if batch_size <= 0:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    encoded = Encoded.of(tokenizer, requests, _max_length(model, tokenizer))
    # Longest first, as lm-eval does: the padding within a batch stays small and a memory error shows up at once.
    order = sorted(encoded.rows, key=lambda inputs: (-len(inputs), inputs))
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    done = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = len(batch[0])
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, inputs in enumerate(batch):
            input_ids[row, : len(inputs)] = torch.tensor(inputs)
            attention_mask[row, : len(inputs)] = 1
        # Only the positions that predict a continuation token need logits (vocab-sized rows are the memory cost).
        first = min(encoded.first_scored(inputs) for inputs in batch)
        kwargs = {"logits_to_keep": width - first} if keep_logits else {}
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, **kwargs
        ).logits
        offset = width - logits.shape[1]  # position of logits[:, 0]
        for row, inputs in enumerate(batch):
            done += encoded.score(inputs, logits[row], offset, results)
        if progress is not None:
            progress(done, len(requests))
    return results  # type: ignore[return-value]


@torch.no_grad()
def streamed_loglikelihoods(
    source,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    activations=None,
) -> list[tuple[float, bool]]:
    """:func:`loglikelihoods` of a model whose blocks stream from its shards (``source``: a
    :class:`sparsefit.walk.blocks.StreamedBlocks`): the inputs, grouped by length (so no padding), go through
    the embeddings, then each block in turn on all of them (one block in memory), then the final norm and head.
    Equal to the in-memory numbers up to float rounding (no padding here; the in-memory batches pad). ``progress``
    counts requests (scored after the last block)."""
    from sparsefit.evaluate.streamed import streamed_head, walk_hidden

    encoded = Encoded.of(tokenizer, requests, _max_length(source.model, tokenizer))
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for inputs in sorted(encoded.rows):
        by_length.setdefault(len(inputs), []).append(inputs)
    groups = list(by_length.values())
    hidden = walk_hidden(source, [torch.tensor(group, dtype=torch.long) for group in groups], device=device,
                         activations=activations)  # fmt: skip
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    done = 0
    with streamed_head(source, device) as head:
        for group, states in zip(groups, hidden, strict=True):
            for row, inputs in enumerate(group):
                first = encoded.first_scored(inputs)
                logits = head(torch.tensor([inputs]), states[row : row + 1], logits_to_keep=len(inputs) - first)
                done += encoded.score(inputs, logits[0], len(inputs) - logits.shape[1], results)
                if progress is not None:
                    progress(done, len(requests))
    return results  # type: ignore[return-value]


def score_docs(docs: Sequence[Doc], results: Sequence[tuple[float, bool]], lambada: bool = False) -> dict:
    """Aggregate per-request results (in the docs' request order) into the task's metrics."""
    if lambada:
        lls = [ll for ll, _ in results]
        return {
            "acc": sum(greedy for _, greedy in results) / len(results),
            "ppl": math.exp(-sum(lls) / len(lls)),
            "n": len(results),
        }
    acc = acc_norm = 0
    position = 0
    for doc in docs:
        lls = [ll for ll, _ in results[position : position + len(doc.continuations)]]
        position += len(doc.continuations)
        normed = [ll / max(length, 1) for ll, length in zip(lls, doc.lengths, strict=True)]
        # max(range, key) returns the first maximum, like numpy.argmax in lm-eval.
        acc += max(range(len(lls)), key=lls.__getitem__) == doc.gold
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == doc.gold
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs), "n": len(docs)}


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict:
    """Zero-shot metrics of ``model`` on ``tasks`` over their first ``limit`` documents (all when None).

    Returns ``{task: {"acc", "acc_norm", "n"}}`` (WinoGrande's acc_norm equals its acc: both options share one
    continuation) and ``{"lambada": {"acc", "ppl", "n"}}``. The model is moved to ``device`` and put in eval mode
    for the run; its training flag is restored afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    loaded = _load_tasks(tasks, limit)
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        return _score_tasks(loaded, lambda requests, report: loglikelihoods(model, tokenizer, requests, batch_size,
                                                                             device, report), progress)  # fmt: skip
    finally:
        model.train(was_training)


def streamed_tasks(source, tokenizer, tasks: list[str], limit: int | None = None, device: str | torch.device = "cpu",
                   progress: Progress | None = None, activations=None) -> dict:  # fmt: skip
    """:func:`evaluate_tasks` of a model whose blocks stream from its shards (one block in memory at a time)."""
    loaded = _load_tasks(tasks, limit)
    return _score_tasks(loaded, lambda requests, report: streamed_loglikelihoods(source, tokenizer, requests, device,
                                                                                  report, activations), progress)


def _load_tasks(tasks: list[str] | str, limit: int | None) -> dict[str, list[Doc]]:
    """Every task's documents, loaded first so that a missing data file fails before any model time is spent."""
    if isinstance(tasks, str):  # "arc_easy,piqa" would otherwise be iterated letter by letter
        tasks = parse_tasks(tasks)
    for name in tasks:
        check_task(name)
    check_limit(limit)
    return {name: load_task(name, limit) for name in dict.fromkeys(tasks)}


def _score_tasks(loaded: dict[str, list[Doc]], loglik: Callable, progress: Progress | None) -> dict:
    """Each task's metrics from ``loglik(requests, report)``; under torchrun the documents are shared by the ranks."""
    metrics = {}
    for name, all_docs in loaded.items():
        shard = WindowShard.spread(len(all_docs))
        docs = shard.take(all_docs)
        requests = [pair for doc in docs for pair in zip(doc.contexts, doc.continuations, strict=True)]
        # Progress counts documents: a document is done once all its requests (one per choice) are scored.
        ends = list(itertools.accumulate(len(doc.contexts) for doc in docs))

        def report(done: int, total: int, name: str = name, ends: list[int] = ends) -> None:
            if progress is not None:
                progress(name, bisect.bisect_right(ends, done), len(ends))

        results = loglik(requests, report)
        if not shard.single:  # every rank's results per document, back in document order
            per_doc = [results[start - len(doc.contexts) : start] for doc, start in zip(docs, ends, strict=True)]
            results = [r for doc_results in shard.join(all_gather(per_doc)) for r in doc_results]
        metrics[name] = score_docs(all_docs, results, lambada=name == "lambada")
    return metrics
