"""sparsefit's zero-shot scoring against lm-evaluation-harness itself, on the same documents and the same model.

lm-eval's own task configs (its YAML files, with their templates, ``process_docs``, target delimiter and
``process_results``) are loaded from the installed package and fed the documents sparsefit reads, through
``custom_dataset``; ``lm_eval.evaluator.evaluate`` scores them with ``HFLM`` wrapped around the model object.

- PIQA, HellaSwag, WinoGrande: the raw rows of the asset's arrow files (read in memory, so that HellaSwag's
  ``dataset.map`` writes no cache file into the asset folder).
- ARC-Easy/Challenge (test split) and BoolQ exist only as oe-eval request dumps: their raw fields are recovered from
  each document's query (``Question: {question}\\nAnswer:``, ``{passage}\\nQuestion: {question}?\\nAnswer:``) and
  fed in lm-eval's dataset schema (``choices.text/label`` + ``answerKey``; ``passage/question/label``).

lm-eval reports no acc_norm for WinoGrande and BoolQ. BoolQ's is computed here by lm-eval itself (acc_norm added to
its metric list). WinoGrande's choices are the two contexts, so lm-eval, if asked, would divide the shared
continuation's loglikelihood by the length of each *context*; sparsefit divides both by the continuation's length,
which makes its acc_norm equal to acc. Only acc is compared there.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from pathlib import Path  # noqa: E402

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval import evaluator  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from conftest import make_byte_tokenizer, make_tiny_model  # noqa: E402
from sparsefit.evaluate import tasks as task_data  # noqa: E402
from sparsefit.evaluate.zeroshot import evaluate_tasks, loglikelihoods  # noqa: E402

YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
NAMES = list(YAML)
LIMIT = 20


def _first(records, limit: int) -> list[dict]:
    out = []
    for record in records:
        if len(out) >= limit:
            break
        out.append(record)
    return out


def _lm_eval_rows(name: str, limit: int) -> tuple[str, list[dict]]:
    """(split, rows): the documents sparsefit reads, in the schema of lm-eval's data set for the task."""
    path = task_data.data_root() / task_data.SOURCES[name].path
    if path.suffix == ".arrow":
        return "validation", _first(task_data.arrow_rows(path), limit)
    docs = _first(task_data.request_docs(path, whole_line=False), limit)
    rows = []
    if name == "boolq":
        for doc in docs:
            passage, question = re.fullmatch(r"(.*)\nQuestion: (.*)\?\nAnswer:", doc["query"], re.DOTALL).groups()
            label = int(doc["choices"][int(doc["gold"])] == "yes")  # SuperGLUE: 0 = False, 1 = True
            rows.append({"passage": passage, "question": question, "idx": doc["idx"], "label": label})
        return "validation", rows
    for doc in docs:  # ARC
        (question,) = re.fullmatch(r"Question: (.*)\nAnswer:", doc["query"], re.DOTALL).groups()
        labels = list("ABCDE"[: len(doc["choices"])])
        choices = {"text": list(doc["choices"]), "label": labels}
        rows.append({"id": doc["id"], "question": question, "choices": choices, "answerKey": labels[doc["gold"]]})
    return "test", rows


def _lm_eval_task(name: str, limit: int) -> ConfigurableTask:
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / YAML[name])
    config.pop("tag", None)
    split, rows = _lm_eval_rows(name, limit)
    data = datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
    config["custom_dataset"] = lambda **kwargs: data
    for key in ("training_split", "validation_split", "test_split"):  # zero-shot: no few-shot split needed
        config[key] = split if key == f"{split}_split" else None
    metrics = [m["metric"] for m in config["metric_list"]]
    if name == "boolq" and "acc_norm" not in metrics:
        config["metric_list"] = [*config["metric_list"], {"metric": "acc_norm"}]
    return ConfigurableTask(config=config)


def _run_both(model, tokenizer, names: list[str], limit: int, batch_size: int = 8) -> dict:
    """Per task: lm-eval's results and samples, sparsefit's evaluate_tasks metrics, docs and per-request lls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads; on 2 shared cores spinning costs a lot
    try:
        tasks = {name: _lm_eval_task(name, limit) for name in names}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        theirs = evaluator.evaluate(
            lm, {"tasks": tasks, "groups": {}, "group_map": {}}, limit=limit, bootstrap_iters=0, log_samples=True
        )
        ours = evaluate_tasks(model, tokenizer, names, limit=limit, batch_size=batch_size)
        out = {}
        for name in names:
            docs = task_data.load_task(name, limit)
            requests = [pair for doc in docs for pair in zip(doc.contexts, doc.continuations, strict=True)]
            lls = [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size=batch_size)]
            out[name] = {
                "task": tasks[name],
                "results": theirs["results"][name],
                "samples": sorted(theirs["samples"][name], key=lambda s: s["doc_id"]),
                "ours": ours[name],
                "docs": docs,
                "lls": lls,
            }
        return out
    finally:
        torch.set_num_threads(threads)


def _check_task(run: dict, name: str, abs_ll: float = 1e-4) -> None:
    task, samples, docs, lls = run["task"], run["samples"], run["docs"], run["lls"]
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))
    position = 0
    for doc, sample in zip(docs, samples, strict=True):
        ours = lls[position : position + len(doc.continuations)]
        position += len(doc.continuations)
        # The same requests, character for character: template, target delimiter, choice order.
        assert [tuple(a) for a in sample["arguments"]] == list(zip(doc.contexts, doc.continuations, strict=True))
        gold = task.doc_to_text(sample["doc"]) if name == "winogrande" else task.doc_to_target(sample["doc"])
        assert doc.gold == gold
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=abs_ll)
        # The same choice per document, each side from its own loglikelihoods and divisors.
        pred = max(range(len(ours)), key=ours.__getitem__)
        assert pred == int(np.argmax(theirs))
        assert sample["acc"] == float(pred == doc.gold)
        if name != "winogrande":
            assert list(doc.lengths) == [len(choice) for choice in task.doc_to_choice(sample["doc"])]
            normed = [ll / length for ll, length in zip(ours, doc.lengths, strict=True)]
            pred_norm = max(range(len(normed)), key=normed.__getitem__)
            assert sample["acc_norm"] == float(pred_norm == doc.gold)
    # The same counts.
    n = len(docs)
    assert run["ours"]["n"] == n == run["results"]["sample_len"]
    assert round(run["ours"]["acc"] * n) == round(run["results"]["acc,none"] * n)
    if name == "winogrande":
        assert "acc_norm,none" not in run["results"] and run["ours"]["acc_norm"] == run["ours"]["acc"]
    else:
        assert round(run["ours"]["acc_norm"] * n) == round(run["results"]["acc_norm,none"] * n)


@pytest.fixture(scope="module")
def tiny_run():
    return _run_both(make_tiny_model("llama"), make_byte_tokenizer(), NAMES, LIMIT)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_llama_matches_lm_eval(tiny_run, name):
    _check_task(tiny_run[name], name)


def _bos_byte_tokenizer():
    """The byte tokenizer, adding <s> in front by default as Llama-2-style tokenizers do."""
    from tokenizers import processors

    tokenizer = make_byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    assert tokenizer("a")["input_ids"] == [tokenizer.bos_token_id, *plain]
    return tokenizer


def test_bos_adding_tokenizer_matches_lm_eval():
    names = ["arc_easy", "winogrande"]
    run = _run_both(make_tiny_model("llama"), _bos_byte_tokenizer(), names, limit=8)
    for name in names:
        _check_task(run[name], name)


@pytest.mark.parametrize("make_tokenizer", [make_byte_tokenizer, _bos_byte_tokenizer])
def test_empty_context_conditions_on_lm_eval_prefix_token(make_tokenizer):
    model, tokenizer = make_tiny_model("llama"), make_tokenizer()
    # The second continuation starts with the BOS token itself, which lm-eval then uses as the context.
    requests = [("", " plain text"), ("", "<s>starts with bos"), ("", "</s>starts with eos")]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    instances = [Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)]
    theirs = lm.loglikelihood(instances, disable_tqdm=True)
    ours = loglikelihoods(model, tokenizer, requests)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]


@pytest.mark.slow
def test_smollm2_matches_lm_eval():
    from sparsefit.models import load

    loaded = load("smollm2-135m")
    run = _run_both(loaded.model, loaded.tokenizer, NAMES, limit=3)  # every task's real template and tokenizer
    for name in NAMES:
        _check_task(run[name], name, abs_ll=1e-3)


@pytest.mark.slow
def test_gemma_with_its_bos_matches_lm_eval():
    from sparsefit.data import window_prefix
    from sparsefit.models import load

    loaded = load("gemma3-270m")
    assert window_prefix(loaded.tokenizer) == [2]  # both put <bos> in front of every context
    run = _run_both(loaded.model, loaded.tokenizer, ["arc_easy", "piqa"], limit=4)
    for name in ("arc_easy", "piqa"):
        _check_task(run[name], name, abs_ll=1e-3)
