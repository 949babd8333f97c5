"""A whole-model fit (finetune; recover with SquareHead, LoRA, S2FT, full) interrupted and resumed with --resume
gives the uninterrupted run's weights bit for bit: saved when interrupted between two steps, and now and then
(an interruption inside a step resumes from the last periodic save)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sparsefit.app import finetune
from sparsefit.recover import training
from sparsefit.walk.checkpoint import FitCheckpoint
from test_cli import cli, private_cache, prune_args  # noqa: F401  (the fixtures are shared)
from test_finetune import pruned, workspace  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def finetune_args(root, model, method, out, *extra):
    # 32 examples in batches of 4, 2 epochs: 16 steps; LoRA's dropout (0.05) draws from the random state.
    return ["finetune", "--model", model, "--data", root / "sums.jsonl", "--method", method, "--epochs", 2,
            "--train-batch", 4, "--lr", 3e-3, "--device", "cpu", "--out", out, *extra]  # fmt: skip


def interrupt_at_loss(monkeypatch, call: int):
    """Ctrl-C during the forward pass of the ``call``-th batch loss (a step's start: the state is whole)."""
    original = training.train_loop
    calls = {"n": 0}

    def patched(module, params, loss_of, *args, **kwargs):
        def counted(index):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt
            return loss_of(index)

        return original(module, params, counted, *args, **kwargs)

    monkeypatch.setattr(training, "train_loop", patched)
    return lambda: monkeypatch.setattr(training, "train_loop", original)


def same_weights(a_dir, b_dir):
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", ["full", "lora", "s2ft", "squarehead"])
def test_an_interrupted_finetune_resumes_bit_identically(workspace, pruned, monkeypatch, tmp_path,  # noqa: F811
                                                         method):  # fmt: skip
    whole = tmp_path / "whole"
    assert cli(monkeypatch, *finetune_args(workspace, pruned, method, whole)) == 0
    out = tmp_path / "resumed"
    restore = interrupt_at_loss(monkeypatch, 7)  # in step 7 of 16 (the first epoch's 8 steps)
    assert cli(monkeypatch, *finetune_args(workspace, pruned, method, out)) == 130
    restore()
    partial = tmp_path / ".resumed.partial"
    assert not out.exists() and json.loads((partial / "progress.json").read_text())["step"] == 6
    assert cli(monkeypatch, *finetune_args(workspace, pruned, method, out, "--resume")) == 0
    same_weights(whole, out)
    assert not partial.exists()
    fit_a = json.loads((whole / "recovery.json").read_text())["fit"]
    fit_b = json.loads((out / "recovery.json").read_text())["fit"]
    for key in ("steps", "windows", "curve", "initial_loss", "final_loss"):
        assert fit_a[key] == fit_b[key], key


def test_an_interruption_inside_a_step_resumes_from_the_last_periodic_save(workspace, pruned,  # noqa: F811
                                                                           monkeypatch, tmp_path):  # fmt: skip
    """Ctrl-C inside AdamW's update leaves the weights half-stepped: nothing is saved then, and --resume continues
    from the state saved every 4 steps; with held-out examples the best epoch's state is carried too."""
    extra = ["-o", "heldout=8"]  # 24 training examples, 6 steps an epoch, 16 steps
    whole = tmp_path / "whole"
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "full", whole, *extra)) == 0
    monkeypatch.setattr(finetune, "fit_checkpoint_for", lambda out, fingerprint, resume: FitCheckpoint.for_output(
        out, fingerprint, resume=resume, every_steps=4))  # fmt: skip
    original_step = torch.optim.AdamW.step
    steps = {"n": 0}

    def step(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 15:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "full", out, *extra)) == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", original_step)
    progress = json.loads((tmp_path / ".resumed.partial" / "progress.json").read_text())
    assert progress["step"] == 12 and len(progress["loop"]["log"]["heldout_curve"]) == 2
    assert list((tmp_path / ".resumed.partial").glob("fit_*.safetensors")) == [
        tmp_path / ".resumed.partial" / "fit_12.safetensors"]  # the older saves are removed
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "full", out, *extra, "--resume")) == 0
    same_weights(whole, out)
    fit_a = json.loads((whole / "recovery.json").read_text())["fit"]
    fit_b = json.loads((out / "recovery.json").read_text())["fit"]
    assert fit_a["heldout_curve"] == fit_b["heldout_curve"] and fit_a["best_epoch"] == fit_b["best_epoch"]


def test_resume_with_other_settings_is_refused_before_loading(workspace, pruned, monkeypatch,  # noqa: F811
                                                               tmp_path, capsys):  # fmt: skip
    """... in one line; a run without --resume starts over (the old state cleared)."""
    out = tmp_path / "r"
    restore = interrupt_at_loss(monkeypatch, 3)
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "lora", out)) == 130
    restore()
    capsys.readouterr()
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "lora", out, "--lr", 1e-3, "--resume")) == 2
    err = capsys.readouterr().err
    assert "settings differ (config)" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "lora", out)) == 0  # a fresh run clears the old state
    assert not (tmp_path / ".r.partial").exists()
    stopped = tmp_path / "early"
    restore = interrupt_at_loss(monkeypatch, 1)  # before any step: nothing to keep, nothing left behind
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "lora", stopped)) == 130
    restore()
    assert sorted(p.name for p in tmp_path.iterdir() if "early" in p.name) == []


def test_an_interrupted_two_step_recover_with_a_whole_model_method_resumes(workspace, pruned,  # noqa: F811
                                                                           monkeypatch, tmp_path):  # fmt: skip
    def recover(out, *extra):
        return ["recover", pruned, "--method", "squarehead", "--device", "cpu", "--nsamples", 8, "--seqlen", 32,
                "-o", "epochs=2", "--out", out, *extra]  # fmt: skip

    whole = tmp_path / "whole"
    assert cli(monkeypatch, *recover(whole)) == 0
    out = tmp_path / "resumed"
    restore = interrupt_at_loss(monkeypatch, 5)
    assert cli(monkeypatch, *recover(out)) == 130
    restore()
    assert cli(monkeypatch, *recover(out, "--resume")) == 0
    same_weights(whole, out)



def test_a_damaged_fit_checkpoint_is_one_line(workspace, pruned, monkeypatch, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "d"
    restore = interrupt_at_loss(monkeypatch, 4)
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "full", out)) == 130
    restore()
    (saved,) = (tmp_path / ".d.partial").glob("fit_*.safetensors")
    saved.write_bytes(saved.read_bytes()[:1000])  # cut short, as by a full disk or a killed copy
    capsys.readouterr()
    assert cli(monkeypatch, *finetune_args(workspace, pruned, "full", out, "--resume")) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "is damaged" in err[0] and "without --resume" in err[0] and not out.exists()
