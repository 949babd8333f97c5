"""The streamed path: a safetensors folder walked one block at a time gives bit-identical results to the in-memory
path (prune, EBFT, DSnoT, two-step recovery, perplexity, resume), holds one block in memory, and refuses bad input
in one line before any work."""

import errno
import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_byte_tokenizer, make_tiny_model
from sparsefit.app.jobs import run_prune, run_recover
from sparsefit.cli import main
from sparsefit.errors import UsageError, WriteError
from sparsefit.prune import PruneConfig
from sparsefit.walk import activations
from sparsefit.walk.activations import Activations
from sparsefit.walk.checkpoint import partial_folder
from sparsefit.walk.shards import ShardedCheckpoint

EBFT = {"preset": "quick", "epochs": 1, "lr": 1e-3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers".split()
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120)) for _ in range(30)))
    return root / "corpus.txt"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path / "home"))


def sharded(path: Path, arch: str = "llama", layers: int = 3, shard: str = "40KB") -> Path:
    """A random-weight model written as several safetensors shards with an index, and a byte tokenizer."""
    make_tiny_model(arch, layers=layers).save_pretrained(path, max_shard_size=shard)
    make_byte_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").exists()
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def assert_same_weights(streamed: Path, in_memory: Path) -> None:
    a, b = tensors(streamed), tensors(in_memory)
    assert set(a) == set(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:5]


def config(corpus, **extra) -> PruneConfig:
    return PruneConfig(method="wanda", sparsity=0.5, calib=str(corpus), nsamples=6, seqlen=32, batch_size=2,
                       device="cpu", **extra)  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "llama-untied"])
def test_streamed_prune_and_ebft_equal_the_in_memory_path(arch, corpus, tmp_path):
    model = sharded(tmp_path / "model", arch)
    common = dict(recover="ebft", recover_options=EBFT, eval_ppl=[str(corpus)], eval_seqlen=64, eval_max_tokens=256)
    streamed = run_prune(str(model), config(corpus), tmp_path / "s", **common)
    in_memory = run_prune(str(model), config(corpus), tmp_path / "m", stream=False, **common)
    assert streamed["memory"]["streamed"] and not in_memory["memory"]["streamed"]
    assert_same_weights(tmp_path / "s", tmp_path / "m")
    # The output keeps the source's shard layout and index.
    assert sorted(p.name for p in (tmp_path / "s").glob("*.safetensors")) == sorted(
        p.name for p in model.glob("*.safetensors"))  # fmt: skip
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    # Streamed perplexity is the in-memory forward's number, bit for bit.
    assert streamed["results"]["ppl"] == in_memory["results"]["ppl"]
    assert streamed["results"]["sparsity"] == in_memory["results"]["sparsity"]
    ebft_s, ebft_m = (json.loads((tmp_path / run / "ebft.json").read_text()) for run in ("s", "m"))
    for a, b in zip(ebft_s["blocks"], ebft_m["blocks"], strict=True):  # the same fits (timings aside)
        assert a["train_curve"] == b["train_curve"] and a["final_loss"] == b["final_loss"]
    # transformers loads the streamed output.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("options", [
    {**EBFT, "target": "dense-path"},
    {**EBFT, "target": "mix:0.3"},
    {**EBFT, "window": "2"},
])  # fmt: skip
def test_streamed_ebft_variants_equal_the_in_memory_path(options, corpus, tmp_path):
    model = sharded(tmp_path / "model", "llama", layers=4)
    run_prune(str(model), config(corpus), tmp_path / "s", recover="ebft", recover_options=options)
    run_prune(str(model), config(corpus), tmp_path / "m", recover="ebft", recover_options=options, stream=False)
    assert_same_weights(tmp_path / "s", tmp_path / "m")


@pytest.mark.parametrize("method, options", [("ebft", EBFT), ("dsnot", {})])
def test_streamed_two_step_recovery_equals_the_in_memory_path(method, options, corpus, tmp_path):
    model = sharded(tmp_path / "model", "qwen2")
    run_prune(str(model), config(corpus), tmp_path / "pruned", stream=False)
    # The pruned run folder is one file: re-shard it so the streamed recovery reads several.
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    pruned.save_pretrained(tmp_path / "pruned", max_shard_size="40KB")
    (tmp_path / "pruned" / "model.safetensors").unlink()
    streamed = run_recover(tmp_path / "pruned", tmp_path / "s", method, options, device="cpu")
    in_memory = run_recover(tmp_path / "pruned", tmp_path / "m", method, options, device="cpu", stream=False)
    assert streamed["memory"]["streamed"] and not in_memory["memory"]["streamed"]
    assert_same_weights(tmp_path / "s", tmp_path / "m")


def cli(monkeypatch, *args) -> int:
    monkeypatch.setattr("sys.argv", ["sparsefit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        raise SystemExit(0)
    return exit_info.value.code


def test_interrupted_streamed_run_resumes_bit_identically(corpus, monkeypatch, tmp_path):
    from sparsefit.recover import ebft

    model = sharded(tmp_path / "model", "llama", layers=4)
    args = ["prune", "--model", model, "--calib", corpus, "--nsamples", 6, "--seqlen", 32, "--batch-size", 2,
            "--device", "cpu", "--recover", "ebft", "--preset", "quick", "--epochs", 1]  # fmt: skip
    assert cli(monkeypatch, *args, "--out", tmp_path / "full") == 0
    real = ebft.fine_tune_block
    calls = []

    def interrupt_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ebft, "fine_tune_block", interrupt_third)
    assert cli(monkeypatch, *args, "--out", tmp_path / "resumed") == 130
    assert not (tmp_path / "resumed").exists()
    partial = tmp_path / ".resumed.partial"
    assert json.loads((partial / "progress.json").read_text())["next_block"] == 2
    assert sorted(p.name for p in partial.glob("block_*.safetensors")) == ["block_0.safetensors", "block_1.safetensors"]
    monkeypatch.setattr(ebft, "fine_tune_block", real)
    assert cli(monkeypatch, *args, "--out", tmp_path / "resumed", "--resume") == 0
    assert_same_weights(tmp_path / "resumed", tmp_path / "full")
    assert not partial.exists()


def spill_everything(model: Path) -> int:
    """A memory budget just above one block's need (twice its weights when pruning): every activation set spills."""
    shards = ShardedCheckpoint(model)
    return 2 * shards.nbytes([name for name in shards.tensors if name.startswith("model.layers.0.")]) + 100


def test_activations_in_bfloat16_and_spilled_to_disk(corpus, tmp_path):
    model = sharded(tmp_path / "model")
    spilled = run_prune(str(model), config(corpus), tmp_path / "spill", max_memory=spill_everything(model))
    plain = run_prune(str(model), config(corpus), tmp_path / "plain")
    assert spilled["memory"]["spilled_sets"] > 0 and plain["memory"]["spilled_sets"] == 0
    assert_same_weights(tmp_path / "spill", tmp_path / "plain")
    bf16 = run_prune(str(model), config(corpus), tmp_path / "bf16", act_dtype="bfloat16")
    assert bf16["memory"]["act_dtype"] == "bfloat16"
    store = Activations(torch.bfloat16, budget=0)
    store.begin(tmp_path)
    spilled_set = store.empty((2, 3, 4))
    spilled_set.fill_(1.5)
    assert store.spilled == 1 and spilled_set.dtype == torch.bfloat16 and float(spilled_set.sum()) == 36.0
    assert not list((tmp_path / "activations").iterdir())  # unlinked at once: a crash leaves nothing behind


def test_full_disk_at_a_spilled_set_is_one_line_and_keeps_the_checkpoint(corpus, monkeypatch, tmp_path):
    """A spilled set's disk space is reserved before it is mapped: a full disk is an error (ENOSPC) at the
    reservation, not a SIGBUS at the first write through the mapping (a sparse file's blocks are taken lazily)."""
    model = sharded(tmp_path / "model")
    calls = []
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        calls.append(length)
        if len(calls) > 4:  # a few sets fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(activations.os, "posix_fallocate", fallocate)
    with pytest.raises(WriteError, match=r"No space left on device; free some space.*1 finished block.*--resume"):
        run_prune(str(model), config(corpus), tmp_path / "out", max_memory=spill_everything(model))
    assert len(calls) == 5 and not (tmp_path / "out").exists()
    spill = partial_folder(tmp_path / "out") / "activations"
    assert not spill.exists() or not list(spill.iterdir())  # the refused set's file is gone too


def one_line_error(monkeypatch, capsys, *args) -> str:
    assert cli(monkeypatch, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_bad_input_is_one_line_before_any_work(corpus, monkeypatch, capsys, tmp_path):
    model = sharded(tmp_path / "model")
    base = ["prune", "--calib", corpus, "--nsamples", 4, "--seqlen", 32, "--device", "cpu"]
    # --seqlen beyond the model's positions (512 for the tiny model)
    assert "beyond the model's 512 positions" in one_line_error(monkeypatch, capsys, *base[:-4], "--seqlen", 100000,
                                                                "--device", "cpu", "--model", model, "--out",
                                                                tmp_path / "o1")  # fmt: skip
    # --max-memory below one block's need
    assert "below one block's need" in one_line_error(monkeypatch, capsys, *base, "--model", model,
                                                      "--max-memory", "1KB", "--out", tmp_path / "o2")  # fmt: skip
    assert "is not a size" in one_line_error(monkeypatch, capsys, *base, "--model", model, "--max-memory", "lots",
                                             "--out", tmp_path / "o3")  # fmt: skip
    # too little disk for the output
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**6, 10**6, 1000))
    assert "free disk" in one_line_error(monkeypatch, capsys, *base, "--model", model, "--out", tmp_path / "o4")
    monkeypatch.undo()
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path / "home"))
    # a shard that does not match the index, then a missing shard
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "does not match" in one_line_error(monkeypatch, capsys, *base, "--model", model, "--out", tmp_path / "o5")
    (model / second).unlink()
    assert "is missing" in one_line_error(monkeypatch, capsys, *base, "--model", model, "--out", tmp_path / "o6")
    for out in ("o1", "o2", "o3", "o4", "o5", "o6"):
        assert not (tmp_path / out).exists() and not (tmp_path / f".{out}.partial").exists()
    with pytest.raises(UsageError):
        run_prune(str(model), config(corpus), tmp_path / "o7")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_zero_shot_of_a_folder_streams_and_gives_the_in_memory_numbers(arch, tmp_path):
    """Every request's log-likelihood walked block by block (grouped by length, unpadded) against the in-memory,
    padded batches: equal to float rounding, the greedy flags and the accuracies exactly."""
    from sparsefit.app.streamed import open_streamed
    from sparsefit.evaluate.tasks import load_task
    from sparsefit.evaluate.zeroshot import evaluate_tasks, loglikelihoods, streamed_loglikelihoods
    from sparsefit.models import load
    from sparsefit.models.loading import streamable

    model = sharded(tmp_path / "model", arch)
    opened = open_streamed(streamable(str(model)), torch.float32)
    docs = load_task("arc_easy", limit=6) + load_task("piqa", limit=6)
    requests = [pair for doc in docs for pair in zip(doc.contexts, doc.continuations, strict=True)]
    streamed = streamed_loglikelihoods(opened.source, opened.tokenizer, requests)
    loaded = load(str(model))
    in_memory = loglikelihoods(loaded.model, loaded.tokenizer, requests, batch_size=4)
    assert [g for _, g in streamed] == [g for _, g in in_memory]
    assert [ll for ll, _ in streamed] == pytest.approx([ll for ll, _ in in_memory], rel=1e-5, abs=1e-4)
    from sparsefit.app.jobs import evaluate_streamed

    results = evaluate_streamed(model, ppl=[], tasks=["arc_easy", "piqa"], limit=6)["tasks"]
    assert results == evaluate_tasks(loaded.model, loaded.tokenizer, ["arc_easy", "piqa"], limit=6)


@pytest.mark.parametrize("arch", ["gemma3", "llama-untied"])
def test_eval_of_a_folder_streams_and_gives_the_in_memory_number(arch, corpus, tmp_path):
    """llama-untied: the output layer has its own weight, which a streamed walk once replaced by the input
    embedding after the first capture (tying whenever the embedding was loaded)."""
    from sparsefit.app.jobs import evaluate_model, evaluate_streamed
    from sparsefit.models import load

    model = sharded(tmp_path / "model", arch)
    streamed = evaluate_streamed(model, ppl=[str(corpus)], seqlen=64, max_tokens=512)
    loaded = load(str(model))
    assert streamed == evaluate_model(loaded.model, loaded.tokenizer, ppl=[str(corpus)], seqlen=64, max_tokens=512)
    with pytest.raises(UsageError, match="beyond the model's 512 positions"):
        evaluate_streamed(model, ppl=[str(corpus)], seqlen=1024)
