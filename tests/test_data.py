"""Corpora, their splits, the calibration sampler and the token-stream cache."""

from __future__ import annotations

import json
import random
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from sparsefit import assets
from sparsefit.data import (
    CORPORA,
    Corpus,
    calib_stream,
    calibration_windows,
    get_corpus,
    test_stream,
    window_prefix,
)
from sparsefit.data import corpora as corpora_mod
from sparsefit.data.corpora import is_calib, split_tail, stable_bucket
from sparsefit.errors import UsageError

REAL_HOME = str(assets.home())  # where the offline assets are cached; other tests get an empty home


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Token caches written by a test go to a fresh folder, never to the user's cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("SPARSEFIT_HOME", str(home))
    return home


@pytest.fixture
def real_home(monkeypatch):
    monkeypatch.setenv("SPARSEFIT_HOME", REAL_HOME)


def words(rng: random.Random, n: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "sparse", "model", "token", "window", "prune", "river"]
    return " ".join(rng.choice(vocab) for _ in range(n)).capitalize() + "."


def make_docs(count: int, low: int, high: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"Doc {i}: " + words(rng, rng.randint(low, high)) for i in range(count)]


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"])


def is_slice(window: torch.Tensor, source: torch.Tensor) -> bool:
    if source.numel() < window.numel():
        return False
    return bool((source.unfold(0, window.numel(), 1) == window).all(dim=1).any())


# --- splitting -------------------------------------------------------------------------------------------


def test_stable_bucket_is_fixed_and_spread():
    # sha256, not hash(): the same bucket in every process (hash() is salted per process).
    assert stable_bucket("Albert Einstein") == stable_bucket("Albert Einstein")
    assert [stable_bucket(k) for k in ("a", "b", "c", "d")] == [
        int.from_bytes(__import__("hashlib").sha256(k.encode()).digest()[:8], "big") % 10 for k in "abcd"
    ]
    share = sum(is_calib(f"title {i}") for i in range(5000)) / 5000
    assert 0.77 < share < 0.83


def test_split_tail_cuts_at_a_paragraph_break():
    paras = [f"Paragraph {i} " + "x" * 40 for i in range(10)]
    text = "\n\n".join(paras)
    head, tail = split_tail(text)
    assert head + "\n\n" + tail == text
    assert tail.startswith("Paragraph ")  # whole paragraphs only
    assert 0.1 < len(tail) / len(text) < 0.25
    head2, tail2 = split_tail("one two three four five six seven eight nine ten")
    assert (head2, tail2) == ("one two three four five six seven eight", "nine ten")


# --- local files -----------------------------------------------------------------------------------------


def test_txt_corpus_splits_paragraphs_by_hash(tmp_path):
    docs = make_docs(40, 5, 20)
    path = tmp_path / "notes.txt"
    path.write_text("\r\n\r\n".join(docs) + "\n\n\n  \n")  # CRLF and a trailing whitespace-only paragraph
    corpus = get_corpus(str(path))
    assert corpus.name == str(path)
    assert sorted(corpus.calib + corpus.test) == sorted(docs)
    assert set(corpus.calib).isdisjoint(corpus.test)
    assert list(corpus.calib) == [d for d in docs if is_calib(d)]
    assert corpus.test_text() == "\n\n".join(d for d in docs if not is_calib(d))
    again = get_corpus(str(path))
    assert (again.calib, again.test) == (corpus.calib, corpus.test)
    assert 20 <= len(corpus.calib) <= 38


def test_jsonl_corpus_and_folder(tmp_path):
    docs = make_docs(30, 5, 20, seed=2)
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[:20])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("\n\n".join(docs[20:]))
    (sub / "ignored.csv").write_text("text\nnot a document\n")
    single = get_corpus(str(tmp_path / "a.jsonl"))
    assert sorted(single.calib + single.test) == sorted(docs[:20])
    folder = get_corpus(str(tmp_path))
    assert sorted(folder.calib + folder.test) == sorted(docs)
    assert set(folder.calib).isdisjoint(folder.test)


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl' line 3 is not valid JSON"):
        get_corpus(str(path))
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(UsageError, match=r"line 2 has no string field \"text\""):
        get_corpus(str(path))


def test_tiny_local_corpus_is_split_inside_each_document(tmp_path):
    path = tmp_path / "one.txt"
    text = "\n".join(f"line {i} " + "y" * 30 for i in range(20))
    path.write_text(text)
    corpus = get_corpus(str(path))
    assert len(corpus.calib) == len(corpus.test) == 1
    assert corpus.calib[0] + "\n" + corpus.test[0] == text
    assert 0.15 < len(corpus.test[0]) / len(text) < 0.25


def test_unknown_missing_and_unsupported_corpora(tmp_path):
    with pytest.raises(UsageError, match="unknown corpus 'wikipedia'; accepted: wiki, books"):
        get_corpus("wikipedia")
    with pytest.raises(UsageError, match="does not exist"):
        get_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match=r"is not \.txt or \.jsonl"):
        get_corpus(str(tmp_path / "data.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="holds no .txt or .jsonl files"):
        get_corpus(str(empty))
    with pytest.raises(UsageError, match="no test documents"):
        Corpus("x", ("a",), ()).test_text()
    assert set(CORPORA) >= {"wiki", "books", "wikitext2", "c4", "ptb"}


def test_hub_corpora_need_datasets(monkeypatch):
    corpora_mod._hf_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, installed or not
    with pytest.raises(UsageError, match="needs the `datasets` package"):
        get_corpus("c4")


def test_hub_corpora_through_datasets(monkeypatch):
    corpora_mod._hf_cached.cache_clear()
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        if args[0] != "wikitext":
            raise ConnectionError("Couldn't reach the Hugging Face Hub\nsecond line")
        return {"train": {"text": ["", " = Title = \n", "Body one.\n"]}, "test": {"text": ["A\n", "", "B\n"]}}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = get_corpus("wikitext2")
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert corpus.calib_texts() == [" = Title = \n", "Body one.\n"]
    assert corpus.test_text() == "\n\n".join(["A\n", "", "B\n"])  # every row, the empty one too (the reference)
    with pytest.raises(UsageError, match=r"could not load corpus 'ptb' with `datasets` \(Couldn't reach .*Hub\);"):
        get_corpus("ptb")
    corpora_mod._hf_cached.cache_clear()


# --- built-in corpora (real offline assets, cached after the first fetch; each loads in < 1 s) ------------


def test_wiki_corpus_split(real_home):
    corpus = get_corpus("wiki")
    total = len(corpus.calib) + len(corpus.test)
    assert total == 10_033
    assert 0.78 < len(corpus.calib) / total < 0.82
    assert set(corpus.calib).isdisjoint(corpus.test)
    assert get_corpus("wiki") is corpus  # cached in memory
    corpora_mod._wiki.cache_clear()
    again = get_corpus("wiki")
    assert again is not corpus and (again.calib, again.test) == (corpus.calib, corpus.test)
    assert corpus.test_text().count("\n\n") >= len(corpus.test) - 1


def test_books_corpus_split(real_home):
    corpus = get_corpus("books")
    assert len(corpus.calib) == len(corpus.test) == 4
    for head, tail in zip(corpus.calib, corpus.test, strict=True):
        assert 0.19 < len(tail) / (len(head) + len(tail)) < 0.21
        assert "\r" not in head + tail
    assert corpus.calib[1].startswith("ALICE'S ADVENTURES IN WONDERLAND")
    total = sum(map(len, corpus.calib + corpus.test))
    assert 1_100_000 < total < 1_200_000


# --- calibration sampler ---------------------------------------------------------------------------------


def reference_get_c4(tokenizer, docs, nsamples, seqlen, seed):
    """Wanda/SparseGPT get_c4's sampling loop, verbatim apart from the data source."""
    state = random.getstate()
    random.seed(seed)
    out = []
    try:
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(docs) - 1)
                enc = tokenizer(docs[i], return_tensors="pt")
                if enc.input_ids.shape[1] > seqlen:
                    break
            i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
            out.append(enc.input_ids[:, i : i + seqlen])
    finally:
        random.setstate(state)
    return torch.cat(out)


def test_document_sampler_matches_the_reference(byte_tokenizer):
    docs = make_docs(60, 3, 60)  # ~20..400 bytes: many documents are shorter than 96 tokens
    corpus = Corpus("synthetic", tuple(docs), ("test",))
    got = calibration_windows(byte_tokenizer, corpus, nsamples=16, seqlen=96, seed=3, mode="document")
    assert got.shape == (16, 96) and got.dtype == torch.long
    assert torch.equal(got, reference_get_c4(byte_tokenizer, docs, 16, 96, 3))
    sources = [ids_of(byte_tokenizer, d) for d in docs]
    for window in got:
        assert any(len(s) > 96 and is_slice(window, s) for s in sources)
    assert torch.equal(got, calibration_windows(byte_tokenizer, corpus, 16, 96, seed=3, mode="document"))
    other = calibration_windows(byte_tokenizer, corpus, nsamples=16, seqlen=96, seed=4, mode="document")
    assert not torch.equal(got, other)


def test_stream_sampler_windows_are_slices_of_the_stream(byte_tokenizer):
    docs = make_docs(30, 3, 10)  # every document is shorter than the window
    corpus = Corpus("short-docs", tuple(docs), ("test",))
    got = calibration_windows(byte_tokenizer, corpus, nsamples=8, seqlen=128, seed=0)  # auto -> stream
    assert got.shape == (8, 128)
    stream = ids_of(byte_tokenizer, "\n\n".join(docs))
    assert torch.equal(calib_stream(byte_tokenizer, corpus)[0], stream)
    assert all(is_slice(w, stream) for w in got)
    assert torch.equal(got, calibration_windows(byte_tokenizer, corpus, 8, 128, seed=0, mode="stream"))
    assert not torch.equal(got, calibration_windows(byte_tokenizer, corpus, 8, 128, seed=1, mode="stream"))
    # The reference draws for a stream: randint(0, T - seqlen - 1) per window.
    rng = random.Random(0)
    starts = [rng.randint(0, len(stream) - 129) for _ in range(8)]
    assert torch.equal(got, torch.stack([stream[i : i + 128] for i in starts]))


def test_auto_mode_uses_documents_when_enough_are_long(byte_tokenizer):
    docs = make_docs(40, 60, 80)  # all longer than 64 tokens
    corpus = Corpus("long-docs", tuple(docs), ("test",))
    auto = calibration_windows(byte_tokenizer, corpus, nsamples=8, seqlen=64, seed=5)
    assert torch.equal(auto, calibration_windows(byte_tokenizer, corpus, 8, 64, seed=5, mode="document"))
    assert not torch.equal(auto, calibration_windows(byte_tokenizer, corpus, 8, 64, seed=5, mode="stream"))
    # Asking for more windows than there are long documents falls back to the stream.
    many = calibration_windows(byte_tokenizer, corpus, nsamples=50, seqlen=64, seed=5)
    assert torch.equal(many, calibration_windows(byte_tokenizer, corpus, 50, 64, seed=5, mode="stream"))


def test_sampler_rejects_bad_sizes(byte_tokenizer):
    docs = make_docs(30, 3, 10)
    corpus = Corpus("short-docs", tuple(docs), ("test",))
    longest = max(len(byte_tokenizer(d)["input_ids"]) for d in docs)
    with pytest.raises(UsageError, match=f"seqlen 512 is longer than any document .* \\(max {longest} tokens\\)"):
        calibration_windows(byte_tokenizer, corpus, nsamples=2, seqlen=512, mode="document")
    total = len(byte_tokenizer("\n\n".join(docs))["input_ids"])
    with pytest.raises(UsageError, match=f"seqlen 4096 is longer than the calibration text .* \\({total} tokens\\)"):
        calibration_windows(byte_tokenizer, corpus, nsamples=2, seqlen=4096)
    for bad in ({"nsamples": 0}, {"nsamples": -3}, {"seqlen": 0}, {"seqlen": 1.5}):
        with pytest.raises(UsageError, match=f"{next(iter(bad))} .* is not accepted"):
            calibration_windows(byte_tokenizer, corpus, **{"nsamples": 2, "seqlen": 16, **bad})
    with pytest.raises(UsageError, match="calibration mode 'random' is not accepted; use one of auto"):
        calibration_windows(byte_tokenizer, corpus, 2, 16, mode="random")


def bos_byte_tokenizer():
    """The byte tokenizer, putting <s> (256) in front of every text as Gemma and Llama tokenizers do."""
    from tokenizers import processors

    from conftest import make_byte_tokenizer

    tokenizer = make_byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def test_window_prefix_is_read_from_the_tokenizer(byte_tokenizer):
    assert window_prefix(byte_tokenizer) == []
    tokenizer = bos_byte_tokenizer()
    assert getattr(tokenizer, "add_bos_token", False) is False  # as for Gemma's GGUF tokenizer: the ids decide
    assert window_prefix(tokenizer) == [256]


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_windows_start_with_the_bos_the_tokenizer_adds(byte_tokenizer, mode):
    tokenizer = bos_byte_tokenizer()
    docs = make_docs(60, 3, 60)
    corpus = Corpus("synthetic", tuple(docs), ("test",))
    got = calibration_windows(tokenizer, corpus, nsamples=16, seqlen=96, seed=3, mode=mode)
    assert got.shape == (16, 96) and (got[:, 0] == 256).all() and (got[:, 1:] != 256).all()
    # The same draws as the reference windows (so the same text), whose first token the BOS replaces.
    plain = calibration_windows(tokenizer, corpus, nsamples=16, seqlen=96, seed=3, mode=mode, prefix=[])
    assert torch.equal(got[:, 1:], plain[:, 1:])
    if mode == "document":
        assert torch.equal(plain, reference_get_c4(tokenizer, docs, 16, 96, 3))
    # A tokenizer that adds nothing keeps the reference windows; an explicit prefix is put in front of them.
    reference = calibration_windows(byte_tokenizer, corpus, 16, 96, seed=3, mode=mode)
    assert torch.equal(calibration_windows(byte_tokenizer, corpus, 16, 96, seed=3, mode=mode, prefix=[]), reference)
    forced = calibration_windows(byte_tokenizer, corpus, 16, 96, seed=3, mode=mode, prefix=[256])
    assert (forced[:, 0] == 256).all() and torch.equal(forced[:, 1:], reference[:, 1:])


def test_window_prefix_must_fit(byte_tokenizer):
    corpus = Corpus("short-docs", tuple(make_docs(30, 3, 10)), ("test",))
    with pytest.raises(UsageError, match="seqlen 2 leaves no room after the 2-token window prefix"):
        calibration_windows(byte_tokenizer, corpus, 2, 2, prefix=[256, 256])
    with pytest.raises(UsageError, match=r"window prefix \['x'\] is not accepted; give token ids"):
        calibration_windows(byte_tokenizer, corpus, 2, 16, prefix=["x"])


# --- token streams and their cache -----------------------------------------------------------------------


def test_test_stream_is_cached_on_disk(byte_tokenizer, isolated_home):
    docs = make_docs(40, 5, 20)
    corpus = Corpus("cached", tuple(docs[:30]), tuple(docs[30:]))
    stream = test_stream(byte_tokenizer, corpus)
    assert stream.shape == (1, len(ids_of(byte_tokenizer, corpus.test_text())))
    assert torch.equal(stream[0], ids_of(byte_tokenizer, corpus.test_text()))
    files = list((isolated_home / "tokens").glob("cached-test-*.safetensors"))
    assert len(files) == 1 and not list((isolated_home / "tokens").glob(".*"))  # no temp file left behind
    save_file({"ids": torch.tensor([1, 2, 3], dtype=torch.int32)}, str(files[0]))
    assert test_stream(byte_tokenizer, corpus).tolist() == [[1, 2, 3]]  # read back, not re-tokenized
    files[0].write_bytes(b"garbage")
    assert torch.equal(test_stream(byte_tokenizer, corpus), stream)  # a broken file is rebuilt
    other = Corpus("cached", tuple(docs[:30]), tuple(docs[31:]))  # other text: another key
    assert test_stream(byte_tokenizer, other).shape[1] < stream.shape[1]
    assert len(list((isolated_home / "tokens").glob("cached-test-*.safetensors"))) == 2


def test_a_mix_draws_equal_interleaved_shares_of_each_part(byte_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"alpha {i} " * 40 for i in range(30)))
    (tmp_path / "b.txt").write_text("\n\n".join(f"bravo {i} " * 40 for i in range(30)))
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    mix = get_corpus(f"{a}+{b}")
    assert mix.name == f"{a}+{b}" and [part.name for part in mix.parts] == [a, b]
    assert mix.test_text() == "\n\n".join([get_corpus(a).test_text(), get_corpus(b).test_text()])
    windows = calibration_windows(byte_tokenizer, mix, 5, 32, 3)
    alone = [calibration_windows(byte_tokenizer, part, n, 32, 3) for part, n in ((a, 3), (b, 2))]
    assert torch.equal(windows, torch.stack([alone[0][0], alone[1][0], alone[0][1], alone[1][1], alone[0][2]]))
    for bad in (f"{a}+", f"{a}+{a}", f"{a}+no-such-corpus"):
        with pytest.raises(UsageError, match="such"):
            get_corpus(bad)
