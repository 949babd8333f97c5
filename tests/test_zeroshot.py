import gzip
import math
import shutil
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from sparsefit.errors import UsageError
from sparsefit.evaluate import tasks as task_data
from sparsefit.evaluate import zeroshot
from sparsefit.evaluate.tasks import SOURCES, TASKS, Doc, load_task
from sparsefit.evaluate.zeroshot import _encode_pair, evaluate_tasks, loglikelihoods, parse_tasks, score_docs


class UniformLM(nn.Module):
    """A 'model' whose next-token distribution is uniform, except for boosted (previous, next) token pairs."""

    def __init__(self, vocab: int = 260, boosts: dict[tuple[int, int], float] | None = None):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab, vocab), requires_grad=False)
        for (prev, nxt), value in (boosts or {}).items():
            self.table.data[prev, nxt] = value

    def forward(self, input_ids, attention_mask=None, use_cache=None):  # no logits_to_keep: the fallback path
        return SimpleNamespace(logits=self.table[input_ids])


def _toy_docs() -> list[Doc]:
    return [
        # Under a uniform model ll = -len(continuation tokens) * log(260): acc picks the short choice,
        # acc_norm (per character of the choice) the long one, which is gold.
        Doc(("Q:",) * 2, (" ab", " abcdefgh"), 1, (2, 8)),
        # A boosted 'z' -> 'z' pair makes the short gold choice win under both metrics.
        Doc(("Q:",) * 2, (" zz", " abcdefgh"), 0, (2, 8)),
    ]


def test_scorer_on_toy_task_with_known_loglikelihoods(byte_tokenizer, monkeypatch):
    (z,) = byte_tokenizer("z", add_special_tokens=False)["input_ids"]
    model = UniformLM(boosts={(z, z): 30.0})
    docs = _toy_docs()
    monkeypatch.setattr(zeroshot, "load_task", lambda name, limit=None: docs[:limit])
    calls = []
    result = evaluate_tasks(model, byte_tokenizer, ["arc_easy"], batch_size=3, progress=lambda *a: calls.append(a))
    assert result == {"arc_easy": {"acc": 0.5, "acc_norm": 1.0, "n": 2}}
    assert calls[-1] == ("arc_easy", 2, 2) and [c[1] for c in calls] == sorted(c[1] for c in calls)  # documents

    requests = [(c, x) for d in docs for c, x in zip(d.contexts, d.continuations, strict=True)]
    lls = [ll for ll, _ in loglikelihoods(model, byte_tokenizer, requests)]
    log_v = math.log(260)
    assert lls[0] == pytest.approx(-3 * log_v) and lls[1] == pytest.approx(-9 * log_v)
    # " zz": uniform space and z, then the boosted z.
    assert lls[2] == pytest.approx(-2 * log_v + 30 - math.log(math.exp(30) + 259))
    assert evaluate_tasks(model, byte_tokenizer, ["arc_easy"], limit=1)["arc_easy"] == {"acc": 0, "acc_norm": 1, "n": 1}


def test_score_docs_arithmetic_and_lambada_perplexity():
    docs = [Doc(("c",) * 3, (" a", " bb", " ccc"), 2, (1, 2, 3)), Doc(("c",) * 2, (" a", " b"), 0, (1, 1))]
    # Doc 1: acc picks -2.0 (choice 0), acc_norm picks -2.4/3 = -0.8 (choice 2, gold). Doc 2: tie -> first choice.
    results = [(-2.0, False), (-3.0, False), (-2.4, False), (-1.0, False), (-1.0, False)]
    assert score_docs(docs, results) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}
    lambada = score_docs([], [(-1.0, True), (-3.0, False)], lambada=True)
    assert lambada["acc"] == 0.5 and lambada["ppl"] == pytest.approx(math.exp(2.0)) and lambada["n"] == 2


REQUESTS = [
    ("Question: what is it?\nAnswer:", " a long answer here"),
    ("Question: what is it?\nAnswer:", " b"),
    ("Question: what is it?\nAnswer:", " c"),  # one-token continuations after one context share a forward row
    ("short", " x"),
    ("The blank is ", "filled"),  # trailing space moves to the continuation
    ("A much longer context that goes on and on, well past the others in length.", " end."),
]


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_loglikelihood_equals_direct_computation_with_logits(arch, byte_tokenizer):
    model = make_tiny_model(arch)
    got = loglikelihoods(model, byte_tokenizer, REQUESTS, batch_size=4)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got, strict=True):
        # lm-eval scores a context's trailing space as part of the continuation.
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        ctx = byte_tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = byte_tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)  # position i predicts token i + 1
        expected = sum(logprobs[p, t].item() for p, t in zip(positions, cont, strict=True))
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == all(logprobs[p].argmax().item() == t for p, t in zip(positions, cont, strict=True))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_batching_gives_the_same_result_as_batch_size_1(arch, byte_tokenizer):
    model = make_tiny_model(arch)
    one = loglikelihoods(model, byte_tokenizer, REQUESTS, batch_size=1)
    for batch_size in (3, 16):
        many = loglikelihoods(model, byte_tokenizer, REQUESTS, batch_size=batch_size)
        assert [g for _, g in many] == [g for _, g in one]
        assert [ll for ll, _ in many] == pytest.approx([ll for ll, _ in one], abs=1e-4)


def test_encode_pair_moves_trailing_space_like_lm_eval():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], initial_alphabet=alphabet)
    raw.train_from_iterator(["The capital is Paris"] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    paris = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1  # " Paris" is a single BPE token ...
    context, continuation = _encode_pair(tok, [], "The capital is ", "Paris")
    assert continuation == paris  # ... so the context must not keep the space as a token of its own
    assert context == tok("The capital is", add_special_tokens=False)["input_ids"]


EXPECTED_CHOICES = {"piqa": 2, "hellaswag": 4, "winogrande": 2, "boolq": 2, "openbookqa": 4, "lambada": 1}


@pytest.mark.parametrize("name", TASKS)
def test_task_loading_parses_real_documents(name):
    docs = load_task(name, limit=5)
    assert len(docs) == 5
    for doc in docs:
        n = len(doc.continuations)
        assert n == EXPECTED_CHOICES[name] if name in EXPECTED_CHOICES else 3 <= n <= 5
        assert len(doc.contexts) == len(doc.lengths) == n and 0 <= doc.gold < n
        assert all(c.startswith(" ") and c.strip() for c in doc.continuations)
        assert all(ctx and not ctx.endswith(" ") for ctx in doc.contexts)


def test_task_loading_uses_lm_eval_splits_and_prompts():
    # First documents of lm-eval's default splits (ARC and OpenBookQA: test; the rest: validation; LAMBADA: test).
    first = {name: load_task(name, limit=1)[0] for name in TASKS}
    assert first["arc_easy"].contexts[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert first["arc_challenge"].contexts[0].startswith("Question: An astronomer observes that a planet rotates")
    assert first["piqa"].contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first["hellaswag"].contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first["hellaswag"].gold == 3
    wino = first["winogrande"]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    boolq = first["boolq"]
    assert boolq.contexts[0].startswith("Ethanol fuel -- All biomass")  # SuperGLUE passage with its title
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.continuations == (" no", " yes") and boolq.gold == 0
    assert first["openbookqa"].contexts[0].startswith("A person wants to start saving money")  # bare question_stem
    assert first["lambada"].continuations == (" signs",)
    assert first["lambada"].contexts[0].endswith("I don't care about")


def test_parse_tasks():
    assert parse_tasks("arc_easy, piqa,arc_easy") == ["arc_easy", "piqa"]
    assert parse_tasks("all") == list(TASKS)
    with pytest.raises(UsageError, match="unknown task 'mmlu'.*arc_easy, arc_challenge, piqa"):
        parse_tasks("arc_easy,mmlu")
    with pytest.raises(UsageError, match="no task"):
        parse_tasks(" , ")


def test_bad_inputs_raise_usage_error(byte_tokenizer):
    model = make_tiny_model("llama")
    with pytest.raises(UsageError, match="unknown task 'arc'.*known tasks: arc_easy"):
        evaluate_tasks(model, byte_tokenizer, ["arc"])
    for limit in (0, -3):
        with pytest.raises(UsageError, match="limit must be a positive"):
            evaluate_tasks(model, byte_tokenizer, ["piqa"], limit=limit)
        with pytest.raises(UsageError, match="limit must be a positive"):
            load_task("piqa", limit=limit)
    with pytest.raises(UsageError, match="batch_size"):
        evaluate_tasks(model, byte_tokenizer, ["piqa"], batch_size=0)


def _copy_source(name, real_root, root):
    source = real_root / SOURCES[name].path
    target = root / SOURCES[name].path
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    return target


def test_missing_and_corrupted_data_files_raise_usage_error(tmp_path, monkeypatch, byte_tokenizer):
    real_root = task_data.data_root()
    with pytest.raises(UsageError, match=r"task data file .*requests\.jsonl\.gz' is missing"):
        load_task("arc_easy", limit=1, root=tmp_path)
    monkeypatch.setattr(task_data, "data_root", lambda: tmp_path)
    with pytest.raises(UsageError, match=r"data-00000-of-00001\.arrow' is missing"):
        evaluate_tasks(make_tiny_model("llama"), byte_tokenizer, ["piqa"], limit=1)

    gz = _copy_source("arc_easy", real_root, tmp_path)
    gz.write_bytes(gz.read_bytes()[:2000])  # a truncated download
    assert len(load_task("arc_easy", limit=1)) == 1  # the documents before the cut still read
    with pytest.raises(UsageError, match=r"requests\.jsonl\.gz' is corrupted \(EOFError"):
        load_task("arc_easy")
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(UsageError, match="is corrupted"):
        load_task("arc_easy")
    gz.write_bytes(gzip.compress(b'{"doc_id": 0, "doc": {"query": "Q"}}\n'))  # valid gzip, fields missing
    with pytest.raises(UsageError, match="is corrupted \\(KeyError"):
        load_task("arc_easy")

    arrow = _copy_source("piqa", real_root, tmp_path)
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"data-00000-of-00001\.arrow' is corrupted"):
        load_task("piqa")
    arrow.write_bytes(b"\x00" * 64)
    with pytest.raises(UsageError, match="is corrupted|holds no documents"):
        load_task("piqa")


@pytest.mark.slow
def test_smollm2_arc_easy_limit_20():
    from sparsefit.models import load

    loaded = load("smollm2-135m")
    # One thread: with two threads and one core busy elsewhere (other test runs, benchmarks) this call goes from
    # ~5 s to ~75 s; one thread takes 7-9 s either way, so the budget below stays meaningful and the test stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        result = evaluate_tasks(loaded.model, loaded.tokenizer, ["arc_easy"], limit=20)["arc_easy"]
        assert time.perf_counter() - start < 60
    finally:
        torch.set_num_threads(threads)
    assert result["n"] == 20
    # The first 20 test documents score acc 0.60 / acc_norm 0.40 (first 100: 0.49 / 0.43; an independent script
    # gave 0.49 / 0.44). The band allows three flipped documents from BLAS or dtype noise; chance is 0.25, where
    # a misaligned scorer lands.
    assert 0.45 <= result["acc"] <= 0.75 and 0.25 <= result["acc_norm"] <= 0.55
