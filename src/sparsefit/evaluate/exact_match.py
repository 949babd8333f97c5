"""Task accuracy by generation: greedy answers to a task's test prompts, batched, scored by exact match.

Tasks: ``arithmetic`` (the 600 test questions of :mod:`sparsefit.data.task`'s split; the answer is the first number
of the generation, cut at the first newline, compared with the labelled one) and a user's ``.jsonl`` (its held-out
last fifth; the answer is the generation with surrounding spaces stripped, compared with the completion's).

Generation is greedy (``do_sample`` off), prompts sorted by length (longest first, as lm-eval orders requests) and
left-padded into batches; each row stops at the EOS token or at the task's stop strings, and is cut at the first
stop string afterwards, as lm-eval's ``until`` does. ``exact_match`` is the share of answers equal to the gold one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsefit.data.task import ARITHMETIC, Example, load_examples, prompt_ids
from sparsefit.errors import UsageError

GENERATIVE_TASKS = {ARITHMETIC: "exact match on the 600 test questions of basic_arithmetic (greedy, first number)"}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
BATCH = 16  # prompts per generate call

Progress = Callable[[int, int], None]


def is_generative(name: str) -> bool:
    """True when ``name`` is scored by generation (a built-in generative task or a ``.jsonl`` file)."""
    return name in GENERATIVE_TASKS or name.endswith(".jsonl")


def first_number(text: str) -> str | None:
    """The first number in ``text`` (``"-12"``, ``"3.5"``), None when it has none."""
    match = NUMBER.search(text)
    return match.group(0) if match else None


@dataclass(frozen=True)
class GenerativeTask:
    name: str
    examples: list[Example]
    until: tuple[str, ...]  # stop strings (EOS always stops)
    max_new_tokens: int
    numeric: bool  # the answer is the first number of the generation (else the whole stripped generation)

    def answer(self, generation: str) -> str | None:
        text = cut(generation, self.until)
        return first_number(text) if self.numeric else text.strip()

    def gold(self, example: Example) -> str:
        return example.answer


def cut(text: str, until: tuple[str, ...]) -> str:
    """``text`` up to the first of the stop strings ``until`` (lm-eval's ``until`` post-processing)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def load_generative(name: str, limit: int | None = None, tokenizer=None) -> GenerativeTask:
    """Task ``name``'s test examples (the first ``limit``)."""
    if not is_generative(name):
        raise UsageError(f"unknown generative task {name!r}; known: {', '.join(GENERATIVE_TASKS)} or a .jsonl file")
    examples = load_examples(name, "test", limit)
    if name == ARITHMETIC:
        return GenerativeTask(name, examples, ("\n",), 12, numeric=True)
    longest = max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples) \
        if tokenizer is not None else 64  # fmt: skip
    return GenerativeTask(name, examples, (), min(512, longest + 16), numeric=False)


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, until: tuple[str, ...] = (),
    batch_size: int = BATCH, device: torch.device | str = "cpu", progress: Progress | None = None,
) -> list[str]:  # fmt: skip
    """The greedy continuation of each prompt (token ids), decoded, in the prompts' order."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UsageError("generation needs a tokenizer with a pad or eos token to pad batches with")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id, stop_strings=list(until) or None,
                              use_cache=True)  # fmt: skip
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention_mask[row, width - len(prompts[i]) :] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   generation_config=config, tokenizer=tokenizer if until else None)  # fmt: skip
        for row, i in enumerate(rows):
            new = generated[row, width:].tolist()
            if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    model.train(was_training)
    return outputs


def exact_match(
    model: nn.Module, tokenizer, task: GenerativeTask, *, batch_size: int = BATCH,
    device: torch.device | str = "cpu", chat_template: bool = True, progress: Progress | None = None,
) -> dict:  # fmt: skip
    """``{"exact_match", "n"}`` of ``model`` on ``task``, plus the first few generations for a reader to check."""
    prompts = [prompt_ids(tokenizer, example, chat_template) for example in task.examples]
    generations = greedy_generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, until=task.until,
                                  batch_size=batch_size, device=device, progress=progress)  # fmt: skip
    hits = [task.answer(text) == task.gold(example) for text, example in zip(generations, task.examples, strict=True)]
    samples = [{"prompt": e.prompt, "gold": task.gold(e), "generation": g}
               for e, g in zip(task.examples[:3], generations[:3], strict=True)]  # fmt: skip
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}
