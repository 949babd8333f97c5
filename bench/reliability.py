"""Reliability (issue 22): bad inputs and faults as a new user meets them, each one through the real entry point.

Every case runs ``sparsefit ...`` (the script beside this interpreter, else ``python -m sparsefit``) in a new
process, in a temporary workspace that holds a tiny random Llama (three blocks, a byte tokenizer), a local text
corpus and a pruned run of it, with ``SPARSEFIT_HOME`` in that workspace. A case is *handled* when

- the exit code is the expected one: 2 for a bad input, 1 for a damaged file or a file-system fault found while
  working, 0 for an input that must be accepted;
- no traceback appears;
- a refusal (exit 2) is the whole of stderr, one ``error:`` line (so it came before any work); a fault (exit 1)
  ends stderr with its one ``error:`` line, after the progress of the work it stopped;
- nothing is left behind and no input changed: the workspace (less ``SPARSEFIT_HOME``) is listed before and
  after each case; a new path (a ``.partial`` folder, a half-written output) or a changed or removed one counts,
  except where a case expects it (``--resume`` needs the ``.partial`` that a write fault keeps).

Disk faults are real ones: a file size limit (``ulimit -f``, RLIMIT_FSIZE) makes the kernel fail a write with
EFBIG, as a full disk fails it with ENOSPC; ``/proc/sys`` is a read-only file system in most containers (the case
is skipped where none is found). Nothing is fetched: models are local, built-in names and hub ids are refused before
a download.

    .venv/bin/python bench/reliability.py            # every case, about 5 minutes on 2 cores
    .venv/bin/python bench/reliability.py --list     # the cases
    .venv/bin/python bench/reliability.py --only f5,f6 --keep   # some cases (with what they need); keep the workspace

Writes bench/results/reliability.{json,md} and docs/reliability.md (not with ``--only``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from common import write_results  # noqa: E402
from sparsefit.atomic import write_file_atomically  # noqa: E402
from sparsefit.text import markdown_table  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
TIMEOUT_S = 180
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The calibration of every run: tiny, so that a case that is not refused costs seconds.
WINDOWS = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--device", "cpu"]
CORPUS = "data/corpus.txt"
RUN = "runs/pruned"  # the pruned run that the recover, export and info cases read, made once
RUN_RECIPE = ["run", "{c}/recipe.yaml", "--runs-dir", "{c}/runs"]
# The chain of the resume cases: a write fault keeps every block in cases/resume/.out.partial; each case after it
# damages one file there and puts it back for the next; the last one resumes.
RESUME_OUT = "cases/resume/out"
PARTIAL = "cases/resume/.out.partial"


def entry_point() -> list[str]:
    script = Path(sys.executable).with_name("sparsefit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sparsefit"]


def prune(out: str, *extra: str, model: str = "models/tiny", calib: str = CORPUS) -> list[str]:
    return ["prune", "--model", model, "--calib", calib, *WINDOWS, "--out", out, *extra]


def child_env(ws: Path) -> dict:
    # One thread: tiny models gain nothing from more, and the machine may be shared.
    return {**os.environ, "SPARSEFIT_HOME": str(ws / "home"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}  # fmt: skip


def placed(args: list[str], folder: Path, ws: Path) -> list[str]:
    """``args`` with ``{c}`` the case's own folder, relative to the workspace (where every command runs)."""
    return [a.replace("{c}", str(folder.relative_to(ws))) for a in args]


def call(ws: Path, args: list[str]) -> None:
    """A set-up step that must succeed."""
    done = subprocess.run([*entry_point(), *args], cwd=ws, env=child_env(ws), capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"set-up `sparsefit {shlex.join(args)}` failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")  # fmt: skip


@dataclass
class Case:
    id: str
    section: str
    what: str
    args: list[str]  # ``{c}``: the case's own folder, cases/<id>
    expect: int  # 2: a bad input, 1: a damaged file or a fault, 0: accepted
    prepare: Callable[[Path, Path], object] | None = None  # (workspace, case folder), before the listing
    after: Callable[[Path, Path], object] | None = None  # undoes a damage for the cases that come next
    fsize: int | None = None  # RLIMIT_FSIZE of the process, bytes
    outputs: list[str] = field(default_factory=list)  # paths the case may create, change or remove
    check: Callable[[Path, str], str | None] | None = None  # (workspace, stdout) -> why not handled, or None
    skip: str | None = None  # why the case cannot run here
    needs: list[str] = field(default_factory=list)  # "pruned" (the shared run), or ids of cases to run first


# ------------------------------------------------------------------------------------------------ the workspace


def make_workspace(ws: Path) -> dict:
    """The tiny model and the corpus; the sizes that the file-size-limit cases need."""
    import random

    from safetensors.torch import load_file

    from conftest import make_byte_tokenizer, make_tiny_model

    model = ws / "models" / "tiny"
    make_tiny_model("llama", layers=3).save_pretrained(model)
    make_byte_tokenizer().save_pretrained(model)
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers".split()
    (ws / "data").mkdir()
    (ws / CORPUS).write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(30)))
    weights = load_file(model / "model.safetensors")
    block = sum(t.numel() * t.element_size() for k, t in weights.items() if k.startswith("model.layers.0."))
    return {"block_bytes": block, "model_bytes": (model / "model.safetensors").stat().st_size}


def recipe_text(ws: Path, name: object = "tiny", **parts: str) -> str:
    """A recipe of the tiny model; ``parts`` replace its top-level entries (YAML text)."""
    entries = {
        "name": json.dumps(name),
        "model": str(ws / "models" / "tiny"),
        "device": "cpu",
        "recover": "null",
        "prune": f"{{method: wanda, sparsity: 0.5, calib: {ws / CORPUS}, nsamples: 4, seqlen: 32}}",
        "eval": f"{{ppl: [{ws / CORPUS}], seqlen: 32, max_tokens: 64}}",
    }
    entries.update(parts)
    return "".join(f"{key}: {value}\n" for key, value in entries.items())


def write_recipe(name: object = "tiny", **parts: str) -> Callable[[Path, Path], None]:
    def prepare(ws: Path, folder: Path) -> None:
        (folder / "recipe.yaml").write_text(recipe_text(ws, name, **parts))

    return prepare


def write_file(relative: str, data: bytes | str) -> Callable[[Path, Path], None]:
    """Write ``data`` to ``relative`` in the case's folder."""

    def prepare(ws: Path, folder: Path) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return prepare


def copy_of(source: str, name: str, change: Callable[[Path], object]) -> Callable[[Path, Path], None]:
    """A copy of the workspace's ``source`` folder as ``name`` in the case's folder, then ``change(copy)``."""

    def prepare(ws: Path, folder: Path) -> None:
        shutil.copytree(ws / source, folder / name)
        change(folder / name)

    return prepare


def config_mismatch(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))


def tensor_missing(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})


def cut_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage(name: str, how: str) -> dict:
    """``prepare`` and ``after`` of a resume case: damage ``name`` in the kept checkpoint, then put it back."""
    saved: dict[str, bytes] = {}

    def prepare(ws: Path, folder: Path) -> None:
        path = ws / PARTIAL / name
        if not path.exists():
            raise RuntimeError(f"{path} is missing: the write-fault case (f5) kept no checkpoint")
        saved[name] = path.read_bytes()
        if how == "cut":
            cut_half(path)
        elif how == "garbage":
            path.write_text("{not json")
        else:
            path.unlink()

    def after(ws: Path, folder: Path) -> None:
        (ws / PARTIAL / name).write_bytes(saved.pop(name))

    return {"prepare": prepare, "after": after}


def run_twice(ws: Path, folder: Path) -> None:
    write_recipe()(ws, folder)
    call(ws, placed(RUN_RECIPE, folder, ws))  # the first result, which the second run must keep


def only_tasks_scored(ws: Path, stdout: str) -> str | None:
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "stdout is not one JSON object"
    if set(result) != {"tasks"}:
        return f"more than the tasks was computed: {sorted(result)}"
    return None if "arc_easy" in result["tasks"] else "no arc_easy score"


def exists(relative: str, absent: str | None = None) -> Callable[[Path, str], str | None]:
    def check(ws: Path, stdout: str) -> str | None:
        if not (ws / relative).exists():
            return f"{relative} was not written"
        if absent and (ws / absent).exists():
            return f"{absent} is left"
        return None

    return check


def read_only_folder() -> str | None:
    """A folder on a read-only file system (os.access says so even as root), or None."""
    for folder in ("/proc/sys", "/sys/fs/cgroup", "/sys"):
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):
            return folder
    return None


def cases(ws: Path, sizes: dict) -> list[Case]:
    out = "{c}/out"  # each case's own output
    compare = ["compare", "--model", "models/tiny", "--calib", CORPUS, "--nsamples", "4", "--seqlen", "32",
               "--device", "cpu"]  # fmt: skip
    recover = ["recover", RUN, "--device", "cpu"]
    read_only = read_only_folder()
    # A file size limit between a block file and the whole model: every block is kept, the output's write fails.
    output_limit = (sizes["block_bytes"] + 4096 + sizes["model_bytes"]) // 2
    resumed = {"needs": ["f5"]}
    return [
        # §1: the parser's own errors
        Case("p1", "1 parser", "a float option given a word", prune(out, "--sparsity", "half"), 2),
        Case("p2", "1 parser", "an unknown option", prune(out, "--frobnicate", "3"), 2),
        Case("p3", "1 parser", "a required option left out (--out)", ["prune", "--model", "models/tiny"], 2),
        Case("p4", "1 parser", "a misspelt command", ["pruen"], 2),
        Case("p6", "1 parser", "eval without its model argument", ["eval"], 2),
        Case("p7", "1 parser", "an option without its value", [*recover, "--out", out, "--method"], 2),
        # §2: values converted to their fields' types, non-finite numbers refused
        Case("v1", "2 values", "recover -o lr=fast (EBFT)", [*recover, "-o", "lr=fast", "--out", out], 2,
             needs=["pruned"]),
        Case("v2", "2 values", "recover -o lr=nan (EBFT)", [*recover, "-o", "lr=nan", "--out", out], 2,
             needs=["pruned"]),
        Case("v3", "2 values", "recover -o lr=nan (SquareHead)",
             [*recover, "--method", "squarehead", "-o", "lr=nan", "--out", out], 2, needs=["pruned"]),
        Case("v4", "2 values", "compare -o lora.lr=abc",
             [*compare, "--methods", "lora", "-o", "lora.lr=abc", "--out", out], 2),
        Case("v5", "2 values", "recipe prune sparsity: half", RUN_RECIPE, 2,
             prepare=write_recipe(prune="{sparsity: half}")),
        Case("v6", "2 values", "recipe recover lr: fast", RUN_RECIPE, 2,
             prepare=write_recipe(recover="{method: ebft, lr: fast}")),
        Case("v7", "2 values", "recipe eval max_tokens: lots", RUN_RECIPE, 2,
             prepare=write_recipe(eval="{max_tokens: lots}")),
        Case("v8", "2 values", "recipe model: [a, b]", RUN_RECIPE, 2, prepare=write_recipe(model="[a, b]")),
        Case("v9", "2 values", "recipe eval ppl: one unknown name (a string, not a list)", RUN_RECIPE, 2,
             prepare=write_recipe(eval="{ppl: nope-corpus}")),
        Case("v10", "2 values", 'recipe name: 123, nsamples: "4", ppl: one path (not a list): converted, and it runs',
             RUN_RECIPE, 0, outputs=["cases/v10/runs"], check=exists("cases/v10/runs/123/pruned/run.json"),
             prepare=write_recipe(123, prune=f'{{calib: {ws / CORPUS}, nsamples: "4", seqlen: 32}}',
                                  eval=f"{{ppl: {ws / CORPUS}, seqlen: 32, max_tokens: 64}}")),  # fmt: skip
        Case("v11", "2 values", "recover --lr inf", [*recover, "--lr", "inf", "--out", out], 2, needs=["pruned"]),
        Case("v12", "2 values", "prune --recover ebft --lr inf", prune(out, "--recover", "ebft", "--lr", "inf"), 2),
        Case("v13", "2 values", "prune --owl-m inf", prune(out, "--owl-lambda", "0.05", "--owl-m", "inf"), 2),
        Case("v14", "2 values", "prune --sparsity nan", prune(out, "--sparsity", "nan"), 2),
        Case("v16", "2 values", "recover --method lora -o targets=1",
             [*recover, "--method", "lora", "-o", "targets=1", "--out", out], 2, needs=["pruned"]),
        Case("v17", "2 values", "recover --method s2ft -o targets=1",
             [*recover, "--method", "s2ft", "-o", "targets=1", "--out", out], 2, needs=["pruned"]),
        Case("v18", "2 values", "-o without '='", [*recover, "-o", "lr", "--out", out], 2, needs=["pruned"]),
        Case("v19", "2 values", "-o of an option the method lacks", [*recover, "-o", "nosuch=1", "--out", out], 2,
             needs=["pruned"]),
        Case("o1", "3 outputs", "prune --out the model itself --overwrite", prune("models/tiny", "--overwrite"), 2),
        Case("o2", "3 outputs", "prune --out the folder above the model --overwrite",
             prune("models", "--overwrite"), 2),
        Case("o3", "3 outputs", "prune --out the folder above the calibration text --overwrite",
             prune("data", "--overwrite"), 2),
        Case("o4", "3 outputs", "recover --out its own run --overwrite",
             [*recover, "--method", "dsnot", "--overwrite", "--out", RUN], 2, needs=["pruned"]),
        Case("o5", "3 outputs", "recover --out the folder above its run --overwrite",
             [*recover, "--method", "dsnot", "--overwrite", "--out", "runs"], 2, needs=["pruned"]),
        Case("o6", "3 outputs", "recover --out the folder above its teacher --overwrite",
             [*recover, "--method", "dsnot", "--teacher", "models/tiny", "--overwrite", "--out", "models"], 2,
             needs=["pruned"]),
        Case("o7", "3 outputs", "export --out its own run --overwrite", ["export", RUN, "--overwrite", "--out", RUN],
             2, needs=["pruned"]),
        Case("o8", "3 outputs", "export --out the folder above its run --overwrite",
             ["export", RUN, "--overwrite", "--out", "runs"], 2, needs=["pruned"]),
        Case("o9", "3 outputs", "compare --out the folder above the model --overwrite",
             [*compare, "--methods", "dsnot", "--overwrite", "--out", "models"], 2),
        Case("o10", "3 outputs", "sparsefit run of the same recipe twice (the first result kept)", RUN_RECIPE, 2,
             prepare=run_twice),
        Case("o11", "3 outputs", "recipe name: ../escaped", RUN_RECIPE, 2, prepare=write_recipe("../escaped")),
        Case("o12", "3 outputs", "recipe name: an absolute path", RUN_RECIPE, 2,
             prepare=lambda ws, folder: write_recipe(str(folder / "elsewhere"))(ws, folder)),
        Case("o13", "3 outputs", "prune into a non-empty folder without --overwrite", prune(out), 2,
             prepare=write_file("out/keep.txt", "an earlier result")),
        # §4: file-system faults and damaged files
        Case("f1", "4 faults", f"an output on a read-only file system ({read_only})",
             prune(f"{read_only}/sparsefit-out"), 2, skip=None if read_only else "no read-only file system found"),
        Case("f2", "4 faults", "--out names an existing file", prune("{c}/out.txt"), 2,
             prepare=write_file("out.txt", "x")),
        Case("f3", "4 faults", "--out inside a file", prune("{c}/out.txt/run"), 2, prepare=write_file("out.txt", "x")),
        Case("f4", "4 faults", "the file size limit (as a full disk) hit at the first block", prune(out), 1,
             fsize=sizes["block_bytes"] // 2),
        Case("f5", "4 faults", "the file size limit hit writing the output: every block kept for --resume",
             prune(RESUME_OUT), 1, fsize=output_limit, outputs=[PARTIAL], check=exists(f"{PARTIAL}/progress.json")),
        Case("f6", "4 faults", "a cut carry_*.safetensors under --resume", prune(RESUME_OUT, "--resume"), 1,
             **damage("carry_3.safetensors", "cut"), **resumed),
        Case("f7", "4 faults", "a cut block_*.safetensors under --resume", prune(RESUME_OUT, "--resume"), 1,
             **damage("block_0.safetensors", "cut"), **resumed),
        Case("f8", "4 faults", "a garbage progress.json under --resume", prune(RESUME_OUT, "--resume"), 1,
             **damage("progress.json", "garbage"), **resumed),
        Case("f9", "4 faults", "a block file missing under --resume", prune(RESUME_OUT, "--resume"), 1,
             **damage("block_1.safetensors", "remove"), **resumed),
        Case("f10", "4 faults", "--resume with other settings (--sparsity 0.6)",
             prune(RESUME_OUT, "--resume", "--sparsity", "0.6"), 2, **resumed),
        Case("f11", "4 faults", "--resume after the write fault finishes the run", prune(RESUME_OUT, "--resume"), 0,
             outputs=["cases/resume"], check=exists(f"{RESUME_OUT}/model.safetensors", absent=PARTIAL), **resumed),
        Case("f12", "4 faults", "config.json intermediate_size does not match the weights",
             prune(out, model="{c}/model"), 1, prepare=copy_of("models/tiny", "model", config_mismatch)),
        Case("f13", "4 faults", "a GGUF file with a valid magic, truncated", prune(out, model="{c}/cut.gguf"), 1,
             prepare=write_file("cut.gguf", b"GGUF\x03\x00\x00\x00\x01")),
        Case("f14", "4 faults", "info of a run whose sparsity.json is garbage", ["info", "{c}/run"], 1,
             prepare=copy_of(RUN, "run", lambda r: (r / "sparsity.json").write_text("{not json")), needs=["pruned"]),
        Case("f15", "4 faults", "export of a run whose run.json is a list", ["export", "{c}/run", "--out", out], 1,
             prepare=copy_of(RUN, "run", lambda r: (r / "run.json").write_text("[1, 2]")), needs=["pruned"]),
        Case("f16", "4 faults", "a tensor of the last block missing from the safetensors",
             prune(out, model="{c}/model"), 1, prepare=copy_of("models/tiny", "model", tensor_missing)),
        Case("f17", "4 faults", "a cut model.safetensors in the source model", prune(out, model="{c}/model"), 1,
             prepare=copy_of("models/tiny", "model", lambda m: cut_half(m / "model.safetensors"))),
        Case("f18", "4 faults", "a source config.json that is not JSON", prune(out, model="{c}/model"), 1,
             prepare=copy_of("models/tiny", "model", lambda m: (m / "config.json").write_text("{not json"))),
        Case("f19", "4 faults", "eval of a run whose model.safetensors is cut",
             ["eval", "{c}/run", "--ppl", CORPUS, "--seqlen", "32", "--device", "cpu"], 1,
             prepare=copy_of(RUN, "run", lambda r: cut_half(r / "model.safetensors")), needs=["pruned"]),
        # §5: checks before work
        Case("b1", "5 before work", "prune --eval-seqlen 0", prune(out, "--eval-ppl", CORPUS, "--eval-seqlen", "0"),
             2),
        Case("b2", "5 before work", "prune --eval-max-tokens 0",
             prune(out, "--eval-ppl", CORPUS, "--eval-max-tokens", "0"), 2),
        Case("b3", "5 before work", "calibration .txt of random bytes", prune(out, calib="{c}/noise.txt"), 2,
             prepare=write_file("noise.txt", bytes(range(128, 256)) * 40)),
        Case("b4", "5 before work", "calibration .jsonl of random bytes", prune(out, calib="{c}/noise.jsonl"), 2,
             prepare=write_file("noise.jsonl", bytes(range(128, 256)) * 40)),
        Case("b5", "5 before work", "--max-memory on a built-in model (loaded whole)",
             prune(out, "--max-memory", "1MB", model="smollm2-135m"), 2),
        Case("b6", "5 before work", "--max-memory on a hub id (loaded whole)",
             prune(out, "--max-memory", "1MB", model="org/name"), 2),
        Case("b7", "5 before work", "--max-memory on a structured prune (loaded whole)",
             prune(out, "--pattern", "structured", "--max-memory", "1MB"), 2),
        Case("b8", "5 before work", "recover --method squarehead --max-memory (loaded whole)",
             [*recover, "--method", "squarehead", "--max-memory", "1GB", "--out", out], 2, needs=["pruned"]),
        Case("b9", "5 before work", "a hub id with no hub in reach", prune(out, model="sparsefit-tests/no-such-model"),
             2),
        Case("b10", "5 before work", "eval --tasks without --ppl scores only the tasks",
             ["eval", "models/tiny", "--tasks", "arc_easy", "--limit", "4", "--device", "cpu", "--json"], 0,
             check=only_tasks_scored),
        Case("b11", "5 before work", "eval --seqlen 0", ["eval", "models/tiny", "--seqlen", "0", "--device", "cpu"], 2),
        Case("b12", "5 before work", "eval --tasks of an unknown task", ["eval", "models/tiny", "--tasks", "nope"], 2),
        # Further bad inputs a new user may try
        Case("x1", "more", "--pattern 4:2", prune(out, "--pattern", "4:2"), 2),
        Case("x2", "more", "--pattern bogus", prune(out, "--pattern", "bogus"), 2),
        Case("x3", "more", "--method obs", prune(out, "--method", "obs"), 2),
        Case("x4", "more", "--sparsity 1.5", prune(out, "--sparsity", "1.5"), 2),
        Case("x6", "more", "a model path that does not exist", prune(out, model="./no-such-dir"), 2),
        Case("x7", "more", "a model folder with no weights", prune(out, model="{c}/model"), 2,
             prepare=copy_of("models/tiny", "model", lambda m: (m / "model.safetensors").unlink())),
        Case("x8", "more", "--calib of an unknown corpus", prune(out, calib="no-such-corpus"), 2),
        Case("x9", "more", "--calib of an empty .txt", prune(out, calib="{c}/empty.txt"), 2,
             prepare=write_file("empty.txt", "")),
        Case("x10", "more", "--calib of an empty folder", prune(out, calib="{c}/texts"), 2,
             prepare=lambda ws, folder: (folder / "texts").mkdir()),
        Case("x11", "more", "--calib of a .jsonl without a text field", prune(out, calib="{c}/rows.jsonl"), 2,
             prepare=write_file("rows.jsonl", '{"body": "hello"}\n' * 20)),
        Case("x12", "more", "--nsamples 0", prune(out, "--nsamples", "0"), 2),
        Case("x13", "more", "--seqlen longer than the model's context", prune(out, "--seqlen", "100000"), 2),
        Case("x14", "more", "--batch-size 0", prune(out, "--batch-size", "0"), 2),
        Case("x15", "more", "--device tpu", prune(out, "--device", "tpu"), 2),
        Case("x16", "more", "--dtype float8", prune(out, "--dtype", "float8"), 2),
        Case("x17", "more", "--act-dtype int8", prune(out, "--act-dtype", "int8"), 2),
        Case("x18", "more", "--max-memory lots", prune(out, "--max-memory", "lots"), 2),
        Case("x19", "more", "prune --recover lora (block-wise methods only)", prune(out, "--recover", "lora"), 2),
        Case("x20", "more", "--guard maybe", prune(out, "--recover", "ebft", "--guard", "maybe"), 2),
        Case("x21", "more", "--owl-lambda 0.9 (block sparsities outside [0, 1))", prune(out, "--owl-lambda", "0.9"), 2),
        Case("x22", "more", "--keep-heads 0 on a structured prune",
             prune(out, "--pattern", "structured", "--keep-heads", "0"), 2),
        Case("x23", "more", "recover of a dense model folder (not a run)", ["recover", "models/tiny", "--out", out], 2),
        Case("x24", "more", "recover of a run that does not exist", ["recover", "no-such-run", "--out", out], 2),
        Case("x25", "more", "recover --method nosuch", [*recover, "--method", "nosuch", "--out", out], 2,
             needs=["pruned"]),
        Case("x26", "more", "export --format zip", ["export", RUN, "--format", "zip", "--out", out], 2,
             needs=["pruned"]),
        Case("x27", "more", "info of a folder that does not exist", ["info", "no-such-run"], 2),
        Case("x28", "more", "compare --methods nosuch", [*compare, "--methods", "nosuch", "--out", out], 2),
        Case("x29", "more", "compare --mode bogus", [*compare, "--methods", "dsnot", "--mode", "bogus", "--out", out],
             2),
        Case("x30", "more", "run of a recipe file that does not exist", ["run", "{c}/no-such.yaml"], 2),
        Case("x31", "more", "run of a recipe that is not YAML", RUN_RECIPE, 2,
             prepare=write_file("recipe.yaml", "name: [unclosed\n  : : :")),
        Case("x32", "more", "run of a recipe with an unknown key", RUN_RECIPE, 2,
             prepare=write_recipe(pruning="{sparsity: 0.5}")),
        Case("x33", "more", "eval --ppl of an unknown corpus", ["eval", "models/tiny", "--ppl", "nope-corpus"], 2),
    ]


# ------------------------------------------------------------------------------------------------- one case


def listing(ws: Path) -> dict[str, tuple]:
    """Every path of the workspace but SPARSEFIT_HOME: (is a folder, size, modification time)."""
    found = {}
    for path in ws.rglob("*"):
        relative = path.relative_to(ws)
        if relative.parts[0] == "home":
            continue
        stat = path.lstat()
        folder = path.is_dir()
        found[str(relative)] = (folder, 0 if folder else stat.st_size, 0 if folder else stat.st_mtime_ns)
    return found


def outermost(paths: list[str]) -> list[str]:
    """The outermost of ``paths`` (a new folder, not every file in it)."""
    chosen: list[str] = []
    for path in sorted(paths):
        if not any(path.startswith(top + os.sep) for top in chosen):
            chosen.append(path)
    return chosen


def run_case(case: Case, ws: Path) -> dict:
    folder = ws / "cases" / case.id
    folder.mkdir(parents=True, exist_ok=True)
    args = placed(case.args, folder, ws)
    command = shlex.join(["sparsefit", *args])
    if case.fsize:
        command = f"(ulimit -f {case.fsize // 1024}; {command})"
    record = {"id": case.id, "section": case.section, "case": case.what, "command": command,
              "expected_exit": case.expect}  # fmt: skip
    if case.skip:
        return {**record, "skipped": case.skip, "handled": None}
    if case.prepare is not None:
        case.prepare(ws, folder)
    before = listing(ws)

    def limit() -> None:  # in the child, before it runs sparsefit
        if case.fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))

    began = time.perf_counter()
    try:
        done = subprocess.run([*entry_point(), *args], cwd=ws, env=child_env(ws), capture_output=True, text=True,
                              timeout=TIMEOUT_S, preexec_fn=limit)  # fmt: skip
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout = None, ""
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
    wall = time.perf_counter() - began
    after = listing(ws)
    if case.after is not None:
        case.after(ws, folder)

    allowed = [os.path.normpath(p) for p in case.outputs]

    def expected(path: str) -> bool:
        return any(path == a or path.startswith(a + os.sep) for a in allowed)

    created = outermost([p for p in after if p not in before and not expected(p)])
    removed = outermost([p for p in before if p not in after and not expected(p)])
    changed = [p for p in after if p in before and after[p] != before[p] and not after[p][0] and not expected(p)]
    lines = [ANSI.sub("", line).rstrip() for line in stderr.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    traceback = "Traceback (most recent call last)" in stderr
    problems = []
    if code != case.expect:
        problems.append("timed out" if code is None else f"exit {code}, expected {case.expect}")
    if traceback:
        problems.append("traceback")
    if case.expect == 2 and (len(lines) != 1 or len(errors) != 1):
        problems.append(f"{len(lines)} stderr lines, not one error line before any work")
    if case.expect == 1 and (len(errors) != 1 or lines[-1] != errors[0]):
        problems.append("stderr does not end in its one error line")
    if created:
        problems.append(f"left behind: {', '.join(created)}")
    if removed or changed:
        problems.append(f"inputs changed: {', '.join(removed + changed)}")
    if case.check is not None and code == case.expect and (why := case.check(ws, stdout)):
        problems.append(why)
    return {
        **record,
        "exit_code": code,
        "first_line": lines[0] if lines else "",
        "error_line": errors[0] if errors else "",
        "stderr_lines": len(lines),
        "traceback": traceback,
        "left_behind": created,
        "inputs_changed": removed + changed,
        "wall_s": round(wall, 2),
        "handled": not problems,
        "problems": problems,
    }


# --------------------------------------------------------------------------------------------------- report


def quote(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def shown_line(r: dict) -> str:
    """The error line (the first stderr line when there is no error line); how many lines of progress came first."""
    line = r["error_line"] or r["first_line"]
    if not line:
        return "(nothing on stderr)"
    text = f"`{quote(line)}`"
    if r["error_line"] and r["first_line"] != r["error_line"]:
        text += f" (after {r['stderr_lines'] - 1} line(s) of progress)"
    return text


def document(results: list[dict], summary: dict) -> str:
    rows = []
    for r in results:
        if r["handled"] is None:
            rows.append([r["id"], quote(r["case"]), r["expected_exit"], "-", "skipped", quote(r["skipped"])])
        else:
            verdict = "yes" if r["handled"] else "**no**: " + quote("; ".join(r["problems"]))
            rows.append([r["id"], quote(r["case"]), r["expected_exit"], r["exit_code"], verdict, shown_line(r)])
    skipped = [r for r in results if r["handled"] is None]
    misses = [r for r in results if r["handled"] is False]
    text = (
        "# Reliability: bad inputs and faults\n\n"
        f"**{summary['handled']} / {summary['ran']} cases handled**"
        + (f" ({len(skipped)} skipped: {'; '.join(r['id'] + ', ' + r['skipped'] for r in skipped)})" if skipped else "")
        + f", measured in {summary['seconds']:.0f} s. Reproduce with:\n\n"
        "```bash\n.venv/bin/python bench/reliability.py\n```\n\n"
        "Each case runs the real entry point (`sparsefit ...`) in a new process, as a new user would, on a tiny "
        "random Llama (three blocks) and a local text corpus in a temporary workspace `$WS`, with `SPARSEFIT_HOME` "
        "in it. Every command runs in `$WS`; a case's own files are in `cases/<id>`; the commands are in "
        "`bench/results/reliability.json`. A case is handled when its exit code is the expected one (2: a bad "
        "input, 1: a damaged file or a file-system fault found while working, 0: an input that must be accepted), "
        "no traceback appears, a refusal is the whole of stderr in one `error:` line (so it came before any work), "
        "a fault ends stderr in its one `error:` line, and nothing is left behind and no input changed (the "
        "workspace is listed before and after each case; a write fault is expected to keep the `.partial` that "
        "`--resume` needs). File-system faults are real: a file size limit (`ulimit -f`) makes writes fail with "
        "EFBIG as a full disk fails them with ENOSPC, and `/proc/sys` is a read-only file system. Sections follow "
        "issue 22; `more` are further inputs a new user may try.\n\n"
    )
    if misses:
        text += "Not handled:\n\n" + "".join(
            f"- {r['id']} ({quote(r['case'])}): {shown_line(r)}; {quote('; '.join(r['problems']))}\n" for r in misses
        ) + "\n"
    return text + markdown_table(["id", "case", "expected", "exit", "handled", "stderr: the error line"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated case ids (with the cases they need); writes no report")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--keep", action="store_true", help="keep the workspace (its path is printed)")
    options = parser.parse_args()

    ws = Path(tempfile.mkdtemp(prefix="sparsefit-reliability-"))
    began = time.perf_counter()
    try:
        sizes = make_workspace(ws)
        every = cases(ws, sizes)
        if options.list:
            for case in every:
                print(f"{case.id:4} {case.section:14} {case.what}")
            return
        chosen = every
        if options.only:
            wanted = set(options.only.split(","))
            wanted |= {need for case in every if case.id in wanted for need in case.needs}
            chosen = [case for case in every if case.id in wanted]
        if any("pruned" in case.needs for case in chosen):
            call(ws, prune(RUN))
        (ws / "cases" / "resume").mkdir(parents=True)
        results = []
        for case in chosen:
            result = run_case(case, ws)
            results.append(result)
            mark = {True: "ok", False: "MISS", None: "skip"}[result["handled"]]
            print(f"{mark:4} {case.id:4} exit {result.get('exit_code', '-')!s:4} {result.get('wall_s', 0):5.1f}s "
                  f"{case.what}: {result.get('error_line') or result.get('first_line') or result.get('skipped')}"
                  + (f"  [{'; '.join(result['problems'])}]" if result["handled"] is False else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
        ran = [r for r in results if r["handled"] is not None]
        summary = {"handled": sum(1 for r in ran if r["handled"]), "ran": len(ran), "skipped": len(results) - len(ran),
                   "seconds": round(time.perf_counter() - began, 1),
                   "not_handled": [r["id"] for r in ran if not r["handled"]]}  # fmt: skip
        print(json.dumps(summary), flush=True)
        if options.only:
            return
        rows = [[r["id"], r["case"], r["expected_exit"], r.get("exit_code", "-"),
                 {True: "yes", False: "no", None: "skipped"}[r["handled"]],
                 quote(r.get("error_line") or r.get("first_line") or r.get("skipped", ""))]
                for r in results]  # fmt: skip
        write_results("reliability", {"summary": summary, "cases": results},
                      ["id", "case", "expected", "exit", "handled", "stderr: the error line"], rows,
                      f"{summary['handled']} / {summary['ran']} cases handled; see docs/reliability.md")  # fmt: skip
        write_file_atomically(DOC, document(results, summary))
    finally:
        if options.keep:
            print(f"workspace kept: {ws}", file=sys.stderr)
        else:
            shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
