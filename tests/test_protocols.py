"""The hub corpora's perplexity protocols match the reference code (SparseGPT ``datautils.py``, Wanda/EBFT ``lib``).

No hub is reached: a fake ``datasets`` module serves small splits, and the expected streams are rebuilt the way
the reference builds them (``"\\n\\n".join(testdata['text'])``, ``' '.join(valdata[:1100]['text'])`` then
``[:, :(256 * seqlen)]``, ``" ".join(testdata['sentence'])``).
"""

from __future__ import annotations

import json
import random
import sys
import types

import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_model
from sparsefit.data import Corpus, get_corpus, test_stream
from sparsefit.data import corpora as corpora_mod
from sparsefit.errors import UsageError
from sparsefit.evaluate.perplexity import eval_windows, perplexity

WIKITEXT_TEST = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor .\n", "", "",
                 " = = Career = = \n", "", " He appeared in 2000 .\n", ""]  # fmt: skip
WIKITEXT_TRAIN = ["", " = Valkyria = \n", "", " Senjō no Valkyria .\n"]
PTB_TEST = ["no it was n't black monday", "but while the new york stock exchange did n't fall", "",
            "some circuit breakers installed after the october N crash failed"]  # fmt: skip
PTB_TRAIN = ["aer banknote berlitz", "pierre <unk> N years old"]


class FakeSplit:
    """Just enough of ``datasets.Dataset``: a column by name, a slice of rows as a dict of columns, len()."""

    def __init__(self, **columns: list[str]):
        self.columns = columns

    def __getitem__(self, key):
        if isinstance(key, str):
            return list(self.columns[key])
        if isinstance(key, slice):
            return {name: values[key] for name, values in self.columns.items()}
        raise TypeError(key)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def select(self, indices):  # a real Dataset raises for indices past the end; so does this
        return FakeSplit(**{name: [values[i] for i in indices] for name, values in self.columns.items()})


def c4_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ["the", "market", "river", "garden", "sparse", "model", "recipe", "weekend", "Ünïcode", "city"]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(2, 9))).capitalize() + "." for _ in range(n)]


C4_VALIDATION = c4_docs(1150, 1)  # more than the 1100 the protocol takes
C4_TRAIN = c4_docs(20, 2)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake ``datasets`` module (installed or not); records its calls. Token caches go to a fresh folder."""
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path / "home"))
    calls = []
    splits = {
        "wikitext": {"train": FakeSplit(text=WIKITEXT_TRAIN), "test": FakeSplit(text=WIKITEXT_TEST)},
        "allenai/c4": {"train": FakeSplit(text=C4_TRAIN), "validation": FakeSplit(text=C4_VALIDATION)},
        "ptb_text_only": {"train": FakeSplit(sentence=PTB_TRAIN), "test": FakeSplit(sentence=PTB_TEST)},
    }

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return splits[path]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    corpora_mod._hf_cached.cache_clear()
    yield types.SimpleNamespace(calls=calls, splits=splits)
    corpora_mod._hf_cached.cache_clear()


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


def reference_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def test_wikitext2_keeps_every_row_of_the_test_split(hub, tok):
    corpus = get_corpus("wikitext2")
    assert hub.calls == [("wikitext", "wikitext-2-raw-v1", {})]
    assert corpus.test_text() == "\n\n".join(WIKITEXT_TEST)  # empty rows included, exactly
    assert corpus.test == tuple(WIKITEXT_TEST)
    assert corpus.test_text().startswith("\n\n = Robert") and corpus.test_text().endswith(" .\n\n\n")
    assert torch.equal(test_stream(tok, corpus), reference_ids(tok, "\n\n".join(WIKITEXT_TEST)))
    assert corpus.max_windows is None  # every window of the stream is evaluated
    assert corpus.calib_texts() == [" = Valkyria = \n", " Senjō no Valkyria .\n"]  # calibration: non-empty rows


def test_c4_evaluates_the_first_256_windows_of_1100_documents(hub, tok):
    corpus = get_corpus("c4")
    (path, name, kwargs), = hub.calls  # fmt: skip
    assert path == "allenai/c4" and name is None
    assert kwargs["data_files"]["validation"] == "en/c4-validation.00000-of-00008.json.gz"
    assert kwargs["data_files"]["train"] == "en/c4-train.00000-of-01024.json.gz"
    assert corpus.test_text() == " ".join(C4_VALIDATION[:1100])
    assert corpus.max_windows == 256

    full = reference_ids(tok, " ".join(C4_VALIDATION[:1100]))
    stream = test_stream(tok, corpus)
    assert torch.equal(stream, full)
    for seqlen in (16, 24, 37):  # 256 * seqlen is shorter than the stream: exactly 256 windows
        assert full.shape[1] > 256 * seqlen
        expected = full[:, : (256 * seqlen)]  # the reference cut
        got = eval_windows(stream, seqlen, max_windows=corpus.max_windows)
        assert got.shape == (256, seqlen)
        assert torch.equal(got.reshape(1, -1), expected)
    seqlen = 256  # the stream is shorter than 256 * seqlen: the reference keeps numel() // seqlen windows
    assert full.shape[1] < 256 * seqlen
    got = eval_windows(stream, seqlen, max_windows=corpus.max_windows)
    assert got.shape == (full.shape[1] // seqlen, seqlen)
    assert torch.equal(got.reshape(-1), full[0, : got.numel()])
    # max_tokens and max_windows both cut; the shorter wins
    assert eval_windows(stream, 16, max_tokens=100 * 16 + 5, max_windows=256).shape == (100, 16)
    assert eval_windows(stream, 16, max_tokens=10**6, max_windows=256).shape == (256, 16)


def test_c4_perplexity_covers_exactly_the_reference_tokens(hub, tok, one_thread):
    corpus = get_corpus("c4")
    seqlen = 16
    model = make_tiny_model("llama")
    result = perplexity(model, test_stream(tok, corpus), seqlen=seqlen, batch_size=64, max_windows=corpus.max_windows)
    assert (result.windows, result.tokens, result.seqlen) == (256, 256 * seqlen, seqlen)
    # The reference loop on valenc[:, :(256 * seqlen)]: equal-length windows, so the batch mean is the mean of means.
    valenc = reference_ids(tok, " ".join(C4_VALIDATION[:1100]))[:, : (256 * seqlen)]
    inputs = valenc.reshape(valenc.numel() // seqlen, seqlen)
    with torch.no_grad():
        loss = model(input_ids=inputs, labels=inputs).loss.item()
    assert result.value == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)
    uncut = perplexity(model, test_stream(tok, corpus), seqlen=seqlen, batch_size=64)
    assert uncut.windows > 256 and uncut.value != pytest.approx(result.value, rel=1e-6)


def test_c4_with_fewer_validation_documents_takes_them_all(hub):
    hub.splits["allenai/c4"]["validation"] = FakeSplit(text=C4_VALIDATION[:7])
    assert get_corpus("c4").test_text() == " ".join(C4_VALIDATION[:7])  # valdata[:1100] of 7 rows: all 7


def test_ptb_joins_every_test_sentence_with_a_space(hub, tok):
    corpus = get_corpus("ptb")
    assert hub.calls == [("ptb_text_only", "penn_treebank", {})]
    assert corpus.test_text() == " ".join(PTB_TEST)  # the test split (not validation), every row
    assert torch.equal(test_stream(tok, corpus), reference_ids(tok, " ".join(PTB_TEST)))
    assert corpus.max_windows is None
    assert corpus.calib_texts() == PTB_TRAIN


def test_local_corpora_keep_their_own_rules(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"Document {i} about rivers."} for i in range(3)] + [{"text": "   "}, {"text": ""}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    corpus = get_corpus(str(path))
    assert "" not in corpus.test and all(doc.strip() for doc in corpus.test)  # empty documents still dropped
    assert corpus.max_windows is None and Corpus("x", ("a",), ("b",)).max_windows is None


def test_bad_max_windows(tok):
    stream = torch.arange(100).unsqueeze(0)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(UsageError, match=f"max_windows {bad!r} is not accepted"):
            eval_windows(stream, 10, max_windows=bad)
    assert eval_windows(stream, 10, max_windows=3).tolist() == torch.arange(30).view(3, 10).tolist()
