"""Calibration windows and evaluation token streams.

Token streams (a whole split tokenized in one call, as the WikiText-2 protocol asks) are cached on disk under
``assets.home()/"tokens"``, keyed by a fingerprint of the tokenizer and a sha256 of the text, so a changed
file or tokenizer never reads a stale cache. Measured on 2 busy cores with the SmolLM2 tokenizer: ``wiki``
(849,372 calib + 218,970 test tokens) takes 6.6 s + 1.5 s to tokenize (up to 14 s under heavier load),
``books`` (233,297 + 60,056 tokens) 1.8 s + 0.5 s; reading either back from the cache takes 0.05–0.15 s.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import torch

from sparsefit import assets
from sparsefit.atomic import save_tensors_atomically
from sparsefit.data.corpora import Corpus, get_corpus
from sparsefit.errors import UsageError

MODES = ("auto", "document", "stream")
# "auto" picks the reference per-document sampler when the corpus has enough long documents: at least 1 % of
# them longer than seqlen, and about as many such documents as windows (so most windows come from their own
# document); otherwise it samples from the concatenated stream. Measured with the SmolLM2 tokenizer: no `wiki`
# article has more than 474 tokens (median 98), so at seqlen 512 or 1024 the reference sampler cannot find a
# single window there; at 256 only ~60 of 7,994 calib articles qualify, and drawing 128 windows from them took
# 12 s against 0.5 s from the (disk-cached) stream. `books` (4 documents) also streams, which differs from
# per-document sampling only at 3 boundaries. C4 at 2048 (a few % of 356k documents) keeps the reference.
AUTO_DOCUMENT_SHARE = 0.01
AUTO_PROBE_DOCS = 256  # documents tokenized to estimate that share (a fixed sample: cheap on any corpus)
PATIENCE = 1000  # draws for one window before proving by full tokenization that some document is long enough
MAX_DRAWS = 10_000_000  # hard ceiling on draws over the whole call: never loop forever


def _as_corpus(corpus: Corpus | str) -> Corpus:
    return get_corpus(corpus) if isinstance(corpus, str) else corpus


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens (as the reference code does)."""
    # verbose=False: a corpus is longer than model_max_length by design; the warning would only alarm.
    return list(tokenizer(text, verbose=False)["input_ids"])


def window_prefix(tokenizer) -> list[int]:
    """The special tokens ``tokenizer`` puts in front of a text by default: ``[bos]`` for Gemma, Llama-2 and
    Llama-3 tokenizers, ``[]`` for SmolLM2, GPT-2, Qwen. Calibration and perplexity windows start with it.
    """
    # Probed, not read from `add_bos_token`: Gemma's GGUF tokenizer reports add_bos_token=False yet its
    # post-processor prepends <bos>, and the ids are what the model receives.
    probe = "a"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def check_prefix(prefix, seqlen: int) -> list[int]:
    """``prefix`` as a list of token ids, refused with one line unless a window of ``seqlen`` has room after it."""
    prefix = list(prefix)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in prefix):
        raise UsageError(f"window prefix {prefix!r} is not accepted; give token ids, such as [2] for a BOS")
    if seqlen <= len(prefix):
        raise UsageError(
            f"seqlen {seqlen} leaves no room after the {len(prefix)}-token window prefix; use a larger --seqlen"
        )
    return prefix


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides tokenization: the serialized pipeline (or the vocab) and a probe's ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    # The probe catches settings outside the vocab, e.g. whether a BOS token is prepended.
    digest.update(json.dumps(encode(tokenizer, "Hello world.\n\n Ünïcode 123")).encode())
    return digest.hexdigest()


def _cache_path(tokenizer, text: str, tag: str) -> Path:
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}\0{hashlib.sha256(text.encode()).hexdigest()}".encode())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)[-60:]
    return assets.home() / "tokens" / f"{slug}-{key.hexdigest()[:24]}.safetensors"


def tokenize_cached(tokenizer, text: str, tag: str) -> torch.Tensor:
    """``text`` tokenized in one call, as a LongTensor (1, T); read from / written to the disk cache."""
    from safetensors.torch import load_file

    path = _cache_path(tokenizer, text, tag)
    if path.exists():
        try:
            return load_file(path)["ids"].long().unsqueeze(0)
        except Exception:  # a truncated or foreign file: tokenize again and overwrite it
            pass
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    try:
        save_tensors_atomically({"ids": ids.to(torch.int32)}, path)  # int32 halves the file; every vocabulary fits
    except OSError:
        pass  # a read-only cache only costs speed
    return ids.unsqueeze(0)


def test_stream(tokenizer, corpus: Corpus | str) -> torch.Tensor:
    """The corpus test text tokenized once: LongTensor (1, T)."""
    corpus = _as_corpus(corpus)
    return tokenize_cached(tokenizer, corpus.test_text(), f"{corpus.name}-test")


test_stream.__test__ = False  # not a pytest test, despite its name


def calib_stream(tokenizer, corpus: Corpus | str) -> torch.Tensor:
    """The calibration documents joined with ``"\\n\\n"`` and tokenized once: LongTensor (1, T)."""
    corpus = _as_corpus(corpus)
    return tokenize_cached(tokenizer, "\n\n".join(corpus.calib_texts()), f"{corpus.name}-calib")


def _check_sizes(nsamples: int, seqlen: int) -> None:
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples <= 0:
        raise UsageError(f"nsamples {nsamples!r} is not accepted; give a positive integer such as 128")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen <= 0:
        raise UsageError(f"seqlen {seqlen!r} is not accepted; give a positive integer such as 512")


def _auto_mode(tokenizer, docs: list[str], nsamples: int, seqlen: int) -> str:
    if len(docs) < nsamples:  # fewer documents than windows: no need to tokenize a probe to know
        return "stream"
    probe = random.Random(0).sample(range(len(docs)), min(len(docs), AUTO_PROBE_DOCS))
    lengths = [len(ids) for ids in tokenizer([docs[i] for i in probe], verbose=False)["input_ids"]]
    share = sum(n > seqlen for n in lengths) / len(lengths)
    enough = share >= AUTO_DOCUMENT_SHARE and share * len(docs) >= nsamples
    return "document" if enough else "stream"


def _with_prefix(rows: list[torch.Tensor], prefix: list[int]) -> torch.Tensor:
    """The windows with their first ``len(prefix)`` tokens replaced by ``prefix``."""
    windows = torch.stack(rows)
    if prefix:
        windows[:, : len(prefix)] = torch.tensor(prefix, dtype=windows.dtype)
    return windows


def _windows_from_stream(
    stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, name: str, prefix: list[int]
) -> torch.Tensor:
    total = stream.shape[1]
    if total <= seqlen:
        raise UsageError(
            f"seqlen {seqlen} is longer than the calibration text of corpus {name!r} allows "
            f"({total} tokens); use a smaller --seqlen"
        )
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        i = rng.randint(0, total - seqlen - 1)  # the reference's bounds (get_wikitext2), kept for equal windows
        rows.append(stream[0, i : i + seqlen])
    return _with_prefix(rows, prefix)


def _windows_from_documents(
    tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int, name: str, prefix: list[int]
) -> torch.Tensor:
    """The reference sampler (Wanda/SparseGPT ``get_c4``), with the same random draws for the same seed.

    A ``prefix`` replaces the first tokens of each window (see :func:`calibration_windows`).
    """
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}  # documents tokenized lazily: a C4 shard is too big to tokenize up front
    proven = False  # True once every document is tokenized and at least one is known to be long enough
    draws = 0
    rows = []
    for _ in range(nsamples):
        tries = 0
        while True:
            d = rng.randint(0, len(docs) - 1)
            if d not in cache:
                cache[d] = encode(tokenizer, docs[d])
            ids = cache[d]
            if len(ids) > seqlen:
                break
            tries += 1
            draws += 1
            if tries >= PATIENCE and not proven:
                missing = [i for i in range(len(docs)) if i not in cache]
                if missing:
                    encoded = tokenizer([docs[i] for i in missing], verbose=False)["input_ids"]
                    for i, enc in zip(missing, encoded, strict=True):
                        cache[i] = list(enc)
                longest = max(len(v) for v in cache.values())
                if longest <= seqlen:
                    raise UsageError(
                        f"seqlen {seqlen} is longer than any document of corpus {name!r} allows (max {longest} "
                        "tokens); use a smaller --seqlen or the stream sampler"
                    )
                proven = True
            if draws >= MAX_DRAWS:
                raise UsageError(
                    f"seqlen {seqlen}: too few documents of corpus {name!r} are longer than that to draw "
                    f"{nsamples} windows; use a smaller --seqlen or the stream sampler"
                )
        i = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(torch.tensor(ids[i : i + seqlen], dtype=torch.long))
    return _with_prefix(rows, prefix)


def _mixed_windows(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int, mode: str,
                   prefix: list[int]) -> torch.Tensor:  # fmt: skip
    """A mix's windows: equal shares of each part (the first parts take the remainder), drawn with the same seed,
    then interleaved part by part, so every batch of a fit sees each part. Drawn by size from the joined text
    instead, ``wiki+books`` would be 78 % wiki."""
    count = len(corpus.parts)
    shares = [nsamples // count + (i < nsamples % count) for i in range(count)]
    drawn = [calibration_windows(tokenizer, part, share, seqlen, seed, mode, prefix)
             for part, share in zip(corpus.parts, shares, strict=True) if share]  # fmt: skip
    order = sorted(((i, k) for k, windows in enumerate(drawn) for i in range(windows.shape[0])))
    return torch.stack([drawn[k][i] for i, k in order])


def calibration_windows(
    tokenizer,
    corpus: Corpus | str,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    mode: str = "auto",
    prefix: list[int] | None = None,
) -> torch.Tensor:
    """``nsamples`` random token windows of length ``seqlen`` from the calib split: LongTensor (nsamples, seqlen).

    ``mode="document"`` is the reference sampler: draw random documents until one has more than ``seqlen``
    tokens, then a random window inside it. ``mode="stream"`` joins the documents with ``"\\n\\n"`` and draws
    random windows from that one stream (windows may span documents). ``"auto"`` uses "document" when at least
    1 % of the documents, and at least ``nsamples`` of them, are longer than ``seqlen``, else "stream".
    The same seed gives the same windows. A mix of corpora (``wiki+books``) draws equal shares from each part.

    Every window starts with ``prefix`` (default :func:`window_prefix`: a BOS for tokenizers that add one, so the
    model sees each window as the start of a document, as in training; nothing for SmolLM2): the reference
    window's first ``len(prefix)`` tokens are replaced by it, so the draws (and the text) stay the reference's, and
    the tokenizer's own BOS at the start of a document or stream never appears twice. ``prefix=[]`` gives the
    reference windows for any tokenizer.
    """
    _check_sizes(nsamples, seqlen)
    if mode not in MODES:
        raise UsageError(f"calibration mode {mode!r} is not accepted; use one of {', '.join(MODES)}")
    prefix = check_prefix(window_prefix(tokenizer) if prefix is None else prefix, seqlen)
    corpus = _as_corpus(corpus)
    if corpus.parts:
        return _mixed_windows(tokenizer, corpus, nsamples, seqlen, seed, mode, prefix)
    docs = corpus.calib_texts()
    if mode == "auto":
        mode = _auto_mode(tokenizer, docs, nsamples, seqlen)
    if mode == "stream":
        return _windows_from_stream(calib_stream(tokenizer, corpus), nsamples, seqlen, seed, corpus.name, prefix)
    return _windows_from_documents(tokenizer, docs, nsamples, seqlen, seed, corpus.name, prefix)
