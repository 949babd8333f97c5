"""No command destroys an input or an earlier result, and file-system faults end in one line (issue 22, §3-4).

An output that is, or holds, one of the job's inputs, or that cannot be written, is refused before any work (exit 2).
A damaged file (a config.json that does not describe its weights, a cut GGUF file, a garbage record, a cut checkpoint
file) or a write the file system fails (no space left) is one line with exit 1: what a ``--resume`` needs is kept,
what is of no use is removed. Full disks and read-only file systems are simulated by monkeypatching, never made.
"""

import errno
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conftest import make_byte_tokenizer, make_tiny_model
from sparsefit.atomic import (
    check_output,
    check_run_name,
    file_faults,
    save_tensors_atomically,
    write_file_atomically,
)
from sparsefit.errors import FileError, UsageError, WriteError
from sparsefit.models import load
from sparsefit.prune import PruneConfig
from test_cli import cli

# What safetensors raises when the disk fills while it writes (its Rust I/O error, with the OS error code).
DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(30)))
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path / "home"))


@pytest.fixture
def model(tmp_path) -> Path:
    """A tiny Llama of three blocks in ``models/tiny`` (a local folder: the streamed path)."""
    path = tmp_path / "models" / "tiny"
    make_tiny_model("llama", layers=3).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def prune_args(model, corpus, out, *extra) -> list:
    return ["prune", "--model", model, "--calib", corpus, "--nsamples", 4, "--seqlen", 32, "--batch-size", 2,
            "--device", "cpu", "--out", out, *extra]  # fmt: skip


def one_line(capsys) -> str:
    """The error line, the last on stderr (progress bars of the work done before a fault come first)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    assert not any(line.startswith(("Traceback", "error: ")) for line in lines[:-1]), lines
    return lines[-1]


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def left(folder: Path) -> list[str]:
    """What a run left in ``folder`` besides the models and the token cache."""
    return sorted(p.name for p in folder.iterdir() if p.name not in ("home", "models"))


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ------------------------------------------------------------------ §3: nothing destroys an input or a result


@pytest.mark.parametrize("where", ["the model", "above the model", "above the calibration text"])
def test_prune_refuses_an_output_that_is_or_holds_an_input(where, model, corpus, monkeypatch, capsys, tmp_path):
    text = tmp_path / "data" / "corpus.txt"
    text.parent.mkdir()
    shutil.copy(corpus, text)
    out = {"the model": model, "above the model": model.parent, "above the calibration text": text.parent}[where]
    before = contents(tmp_path)
    assert cli(monkeypatch, *prune_args(model, text, out, "--overwrite")) == 2
    assert "would delete it; give another output folder" in one_line(capsys)
    assert contents(tmp_path) == before  # nothing written, nothing removed, no .partial


def test_recover_and_export_refuse_to_write_over_their_run_or_teacher(model, corpus, monkeypatch, capsys, tmp_path):
    run = tmp_path / "runs" / "pruned"
    assert cli(monkeypatch, *prune_args(model, corpus, run)) == 0
    capsys.readouterr()
    before = contents(tmp_path)
    recover = ["recover", run, "--method", "dsnot", "--device", "cpu", "--overwrite", "--out"]
    assert cli(monkeypatch, *recover, run) == 2
    assert "is the run folder itself" in one_line(capsys)
    assert cli(monkeypatch, *recover, tmp_path / "runs") == 2
    assert "holds the run folder" in one_line(capsys)
    assert cli(monkeypatch, *recover, model.parent, "--teacher", model) == 2
    assert "holds the teacher" in one_line(capsys)
    assert cli(monkeypatch, "export", run, "--overwrite", "--out", tmp_path / "runs") == 2
    assert "holds the run folder" in one_line(capsys)
    assert contents(tmp_path) == before


def test_check_output_follows_links_and_skips_what_is_not_a_local_path(model, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    with pytest.raises(UsageError, match="is the model itself"):
        check_output(link, True, [("model", model)])
    with pytest.raises(UsageError, match="holds the model"):
        check_output(tmp_path / "models" / ".." / "models", True, [("model", model)])
    # A folder inside the model replaces nothing of it; names that are no local path cannot be replaced.
    assert check_output(model / "sub", False, [("model", model)]) == model / "sub"
    check_output(tmp_path / "o", False, [("model", "org/name"), ("calibration text", "wiki"), ("teacher", None)])


@pytest.mark.parametrize("name", ["default", "wanda-50", "run.2", "~x"])
def test_a_run_name_is_one_plain_folder_name(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["../escaped", "/abs/path", "a/b", "a\\b", "..", ".", "", " x", 123, None])
def test_a_run_name_that_is_a_path_is_refused(name):
    with pytest.raises(UsageError, match="one plain folder name"):
        check_run_name(name)


# ------------------------------------------------------------------ §4: file-system faults end in one line


def test_a_read_only_output_is_refused_before_the_model_loads(model, corpus, monkeypatch, capsys, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    # As root a chmod'ed folder stays writable; a read-only file system answers os.access like this.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("sparsefit.app.jobs.open_streamed", loaded)
    assert cli(monkeypatch, *prune_args(model, corpus, read_only / "out")) == 2
    assert "is not writable" in one_line(capsys)
    assert not any(read_only.iterdir())


def fill_disk_at(monkeypatch, marker: str) -> None:
    """Every safetensors write of a file whose name holds ``marker`` fails as a full disk does."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save(tensors, filename, metadata=None):
        if marker in Path(filename).name:
            raise SafetensorError(DISK_FULL)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save)


def test_a_disk_full_during_the_walk_keeps_what_resume_needs(model, corpus, monkeypatch, capsys, tmp_path):
    assert cli(monkeypatch, *prune_args(model, corpus, tmp_path / "full")) == 0
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    with monkeypatch.context() as patch:
        fill_disk_at(patch, "block_1.")
        assert cli(monkeypatch, *prune_args(model, corpus, out)) == 1
    err = one_line(capsys)
    assert "block_1.safetensors' failed: No space left on device" in err and "add --resume" in err
    assert not out.exists()
    kept = sorted(p.name for p in partial.iterdir() if p.is_file())
    assert kept == ["block_0.safetensors", "carry_1.safetensors", "progress.json"]  # no half-written file
    # A cut carry file is one line too, and resuming from the intact one gives the uninterrupted run's weights.
    carry = (partial / "carry_1.safetensors").read_bytes()
    (partial / "carry_1.safetensors").write_bytes(carry[: len(carry) // 2])
    assert cli(monkeypatch, *prune_args(model, corpus, out, "--resume")) == 1
    assert "carry_1.safetensors' is damaged" in one_line(capsys)
    (partial / "carry_1.safetensors").write_bytes(carry)
    assert cli(monkeypatch, *prune_args(model, corpus, out, "--resume")) == 0
    assert same_weights(out, tmp_path / "full") and not partial.exists()


@pytest.mark.parametrize("damage", ["cut", "garbage", "missing"])
def test_a_damaged_block_file_under_resume_is_one_line(damage, model, corpus, monkeypatch, capsys, tmp_path):
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    with monkeypatch.context() as patch:
        fill_disk_at(patch, "block_2.")  # blocks 0 and 1 are kept
        assert cli(monkeypatch, *prune_args(model, corpus, out)) == 1
    capsys.readouterr()
    block = partial / "block_0.safetensors"
    data = block.read_bytes()
    if damage == "missing":
        block.unlink()
    else:
        block.write_bytes(data[: len(data) // 2] if damage == "cut" else os.urandom(len(data)))
    assert cli(monkeypatch, *prune_args(model, corpus, out, "--resume")) == 1  # a damaged file, not a bad input
    err = one_line(capsys)
    assert f"checkpoint file {str(block)!r} is damaged" in err and "run again without --resume" in err
    assert left(tmp_path) == [".out.partial"]  # no output, no temp folder; the checkpoint stays for a look
    assert cli(monkeypatch, *prune_args(model, corpus, out)) == 0  # as the line says: starts over
    assert load_file(out / "model.safetensors") and not partial.exists()


def test_a_disk_full_before_any_block_is_kept_leaves_nothing(model, corpus, monkeypatch, capsys, tmp_path):
    fill_disk_at(monkeypatch, "block_0.")
    assert cli(monkeypatch, *prune_args(model, corpus, tmp_path / "out")) == 1
    assert "No space left on device" in one_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    assert left(tmp_path) == []


def test_a_disk_full_while_writing_the_output_keeps_every_block(model, corpus, monkeypatch, capsys, tmp_path):
    out, partial = tmp_path / "out", tmp_path / ".out.partial"

    def full(path, entries):
        with open(path, "wb") as handle:
            handle.write(b"x")  # a start, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr("sparsefit.walk.blocks.write_shard", full)
        assert cli(monkeypatch, *prune_args(model, corpus, out)) == 1
    err = one_line(capsys)
    assert f"writing {str(out)!r} failed: No space left on device" in err and "3 finished block(s)" in err
    assert left(tmp_path) == [".out.partial"]  # no temp folder
    assert json.loads((partial / "progress.json").read_text())["next_block"] == 3
    assert cli(monkeypatch, *prune_args(model, corpus, out, "--resume")) == 0
    assert load_file(out / "model.safetensors") and not partial.exists()


def test_a_disk_full_in_the_in_memory_walk(model, corpus, monkeypatch, tmp_path):
    from sparsefit.app.jobs import run_prune

    config = PruneConfig(method="wanda", sparsity=0.5, calib=str(corpus), nsamples=4, seqlen=32, batch_size=2,
                         device="cpu")  # fmt: skip
    with monkeypatch.context() as patch:
        fill_disk_at(patch, "carry_3.")  # after the last block: blocks 0 and 1 are kept
        with pytest.raises(WriteError, match=r"No space left on device; .*\(2 finished block\(s\) are kept"):
            run_prune(str(model), config, tmp_path / "out", stream=False)
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["next_block"] == 2
    run_prune(str(model), config, tmp_path / "out", stream=False, resume=True)
    run_prune(str(model), config, tmp_path / "again", stream=False)
    assert same_weights(tmp_path / "out", tmp_path / "again")


def test_write_faults_are_one_line_and_other_errors_pass(tmp_path):
    with pytest.raises(WriteError, match=r"writing '.*a.txt' failed: No space left on device; free some space"):
        with file_faults(tmp_path / "a.txt"):
            raise SafetensorError(DISK_FULL)
    with pytest.raises(WriteError, match="failed: Read-only file system"):
        with file_faults(tmp_path / "b.txt"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    # How safetensors 0.8 words it (seen with a file size limit, `ulimit -f`, on a real write).
    for code in (errno.ENOSPC, errno.EFBIG):
        with pytest.raises(WriteError, match=f"failed: {os.strerror(code)}"):
            with file_faults(tmp_path / "e.txt"):
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    with pytest.raises(SafetensorError, match="header"):
        with file_faults(tmp_path / "c.txt"):
            raise SafetensorError("Error while deserializing header")
    with pytest.raises(KeyError):
        with file_faults(tmp_path / "d.txt"):
            raise KeyError("a bug is not a fault")


def test_a_real_write_fault_of_safetensors_is_one_line(tmp_path):
    """Not a made-up message: the kernel fails the write (a file size limit gives EFBIG, as a full disk gives
    ENOSPC), in the words of the safetensors that is installed."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: the write fails instead
    try:
        with pytest.raises(WriteError, match=r"a.safetensors' failed: File too large$"):
            save_tensors_atomically({"a": torch.zeros(10_000)}, tmp_path / "a.safetensors")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not list(tmp_path.iterdir())  # no temp file


def test_write_file_atomically_leaves_no_temp_file_on_a_full_disk(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(WriteError, match="No space left"):
        write_file_atomically(tmp_path / "run.json", "{}")
    assert not list(tmp_path.iterdir())


def test_a_config_that_does_not_describe_the_weights_is_one_line(model, corpus, monkeypatch, capsys, tmp_path):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    assert cli(monkeypatch, *prune_args(model, corpus, tmp_path / "out")) == 1
    err = one_line(capsys)
    assert "mlp" in err and "has shape [128, 64] but its config.json makes it [100, 64]" in err
    assert left(tmp_path) == []  # no .partial, no output
    with pytest.raises(FileError, match="the config does not describe these weights"):
        load(str(model))  # the in-memory path says the same


def test_a_tensor_missing_from_a_later_block_is_found_before_the_walk(model, corpus, monkeypatch, capsys, tmp_path):
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert cli(monkeypatch, *prune_args(model, corpus, tmp_path / "out")) == 1
    assert "lacks tensor 'model.layers.2.mlp.up_proj.weight'" in one_line(capsys)
    assert left(tmp_path) == []


def test_a_cut_gguf_file_is_one_line(corpus, monkeypatch, capsys, tmp_path):
    gguf = tmp_path / "cut.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00\x01")  # the magic and a version, then the file ends
    assert cli(monkeypatch, *prune_args(gguf, corpus, tmp_path / "out")) == 1
    assert "is truncated or damaged" in one_line(capsys)
    assert not (tmp_path / "out").exists()
    models = tmp_path / "home" / "models"
    assert not models.exists() or not any(models.iterdir())


def test_a_garbage_run_record_is_one_line(model, corpus, monkeypatch, capsys, tmp_path):
    from sparsefit.export.run_folder import read_pattern

    run = tmp_path / "run"
    assert cli(monkeypatch, *prune_args(model, corpus, run, "--pattern", "2:4")) == 0
    capsys.readouterr()
    assert read_pattern(run) == "2:4" and read_pattern(model) == "unstructured"
    (run / "sparsity.json").write_text("{not json")
    with pytest.raises(FileError, match="sparsity.json' is not valid JSON"):
        read_pattern(run)
    assert cli(monkeypatch, "info", run) == 1
    assert "sparsity.json' is not valid JSON" in one_line(capsys)
    (run / "run.json").write_text("[1, 2]")
    assert cli(monkeypatch, "export", run, "--out", tmp_path / "exported") == 1
    assert "run.json' holds a list, not a JSON object" in one_line(capsys)


def recipe_file(tmp_path: Path, model: Path, corpus: Path, name: str = "tiny") -> Path:
    recipe = tmp_path / f"{name.replace('/', '_')}.yaml"
    recipe.write_text(
        f"name: {json.dumps(name)}\nmodel: {model}\ndevice: cpu\nrecover: null\n"
        f"prune: {{method: wanda, sparsity: 0.5, calib: {corpus}, nsamples: 4, seqlen: 32}}\n"
        f"eval: {{ppl: [{corpus}], seqlen: 32, max_tokens: 64}}\n"
    )
    return recipe


def test_a_recipe_run_again_needs_overwrite(model, corpus, monkeypatch, capsys, tmp_path):
    recipe, runs = recipe_file(tmp_path, model, corpus), tmp_path / "runs"
    assert cli(monkeypatch, "run", recipe, "--runs-dir", runs) == 0
    capsys.readouterr()
    first = contents(runs)
    assert cli(monkeypatch, "run", recipe, "--runs-dir", runs) == 2
    assert "pass --overwrite" in one_line(capsys)
    assert contents(runs) == first  # the first result is kept
    shutil.copytree(runs / "tiny" / "pruned", runs / "tiny" / "recovered")  # as if the first recipe had recovered
    assert cli(monkeypatch, "run", recipe, "--runs-dir", runs, "--overwrite") == 0
    assert set(contents(runs)) == set(first)  # no stale recovered model beside a report that lacks it


@pytest.mark.parametrize("name", ["../escaped", "absolute"])
def test_a_recipe_name_cannot_leave_the_runs_folder(name, model, corpus, monkeypatch, capsys, tmp_path):
    name = str(tmp_path / "elsewhere") if name == "absolute" else name
    assert cli(monkeypatch, "run", recipe_file(tmp_path, model, corpus, name), "--runs-dir", tmp_path / "runs") == 2
    assert "one plain folder name" in one_line(capsys)
    assert left(tmp_path) == sorted(p.name for p in tmp_path.glob("*.yaml"))  # nothing written, in or out of runs
