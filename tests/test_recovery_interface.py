"""One recovery interface: every method from `recover`, `run` and `compare --keep`; resume for block-wise methods;
bad options before any work; the one training loop's early stopping."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sparsefit.recover import METHODS, get_method
from sparsefit.recover.dsnot import DSnoTStep
from sparsefit.recover.training import FitConfig, train_loop
from test_cli import cli, prune_args, workspace  # noqa: F401  (the fixture is shared)


@pytest.fixture(autouse=True)
def private_cache(workspace, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SPARSEFIT_HOME", str(workspace / "home"))


@pytest.fixture(scope="module")
def pruned(workspace, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pruned") / "w60"
    monkeypatch = pytest.MonkeyPatch()
    assert cli(monkeypatch, *prune_args(workspace, out, "--sparsity", "0.6")) == 0
    monkeypatch.undo()
    return out


TRAIN_FAST = ["--epochs", 1, "--train-batch", 2]
FAST = {"ebft": TRAIN_FAST, "dsnot": ["-o", "layers=all"], "squarehead": TRAIN_FAST, "lora": TRAIN_FAST,
        "s2ft": TRAIN_FAST, "full": TRAIN_FAST}  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_recover_runs_every_method_and_writes_its_report(workspace, pruned, monkeypatch, tmp_path, method):  # noqa: F811
    out = tmp_path / method
    assert cli(monkeypatch, "recover", pruned, "--method", method, "--device", "cpu", *FAST[method], "--out", out) == 0
    run = json.loads((out / "run.json").read_text())
    report = json.loads((out / "recovery.json").read_text())
    assert run["recovery"]["method"] == method and report["method"] == method
    assert run["command"] == "recover" and "trainable_params" in report
    for name in get_method(method).writes:
        assert (out / name).exists(), name
    before, after = load_file(pruned / "model.safetensors"), load_file(out / "model.safetensors")
    if method != "dsnot":  # DSnoT moves the masks (same count per row); every other method keeps them exactly
        for key, value in before.items():
            if "layers" in key and value.dim() == 2:
                assert torch.equal(value == 0, after[key] == 0), key
    assert json.loads((out / "sparsity.json").read_text())["overall"] == pytest.approx(
        json.loads((pruned / "sparsity.json").read_text())["overall"])


def test_interrupted_dsnot_recover_resumes_bit_identically(pruned, monkeypatch, tmp_path):
    args = ["recover", pruned, "--method", "dsnot", "-o", "layers=all", "--device", "cpu"]
    assert cli(monkeypatch, *args, "--out", tmp_path / "full") == 0
    original = DSnoTStep.__call__

    def killed_at_block_2(self, ctx):
        if ctx.index == 2:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(DSnoTStep, "__call__", killed_at_block_2)
    assert cli(monkeypatch, *args, "--out", tmp_path / "resumed") == 130
    progress = json.loads((tmp_path / ".resumed.partial" / "progress.json").read_text())
    assert progress["next_block"] == 2 and progress["blocks_total"] == 3
    monkeypatch.setattr(DSnoTStep, "__call__", original)
    assert cli(monkeypatch, *args, "--out", tmp_path / "resumed", "--resume") == 0
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    blocks = json.loads((tmp_path / "resumed" / "recovery.json").read_text())["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "lora", "-o", "rank=4"], "lora does not accept option(s) rank; accepted: preset, lr"),
        (["--method", "dsnot", "--lr", "1e-3"], "dsnot does not accept option(s) lr"),
        (["--method", "ebft", "-o", "target=teacher"], "ebft target 'teacher' is not one of"),
        (["--method", "nope"], "recovery method 'nope' is not known"),
        (["--method", "ebft", "-o", "lr"], "is not KEY=VALUE"),
    ],
)
def test_bad_method_options_are_one_line_before_loading(pruned, monkeypatch, tmp_path, capsys, args, message):
    # The teacher does not exist: an error about it would mean a model was being loaded.
    code = cli(monkeypatch, "recover", pruned, *args, "--teacher", tmp_path / "absent", "--out", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err


def test_prune_recover_refuses_whole_model_methods(workspace, monkeypatch, tmp_path, capsys):  # noqa: F811
    assert cli(monkeypatch, *prune_args(workspace, tmp_path / "o", "--recover", "lora")) == 2
    assert "prune first, then use sparsefit recover --method lora" in capsys.readouterr().err


def test_prune_with_interleaved_dsnot(workspace, monkeypatch, tmp_path):  # noqa: F811
    out = tmp_path / "w60-dsnot"
    assert cli(monkeypatch, *prune_args(workspace, out, "--sparsity", "0.6", "--recover", "dsnot")) == 0
    report = json.loads((out / "recovery.json").read_text())
    assert report["method"] == "dsnot" and report["swaps"] > 0
    assert report["abs_error_after"] < report["abs_error_before"]


@pytest.mark.parametrize("method", ["dsnot", "squarehead", "lora", "s2ft"])
def test_recipe_runs_any_method(workspace, monkeypatch, tmp_path, method):  # noqa: F811
    corpus = workspace / "corpus.txt"
    recipe = tmp_path / "recipe.yaml"
    options = "" if method == "dsnot" else ", epochs: 1"
    recipe.write_text(
        f"name: tiny\nmodel: {workspace / 'tiny'}\ndevice: cpu\n"
        f"prune: {{method: wanda, sparsity: 0.6, calib: {corpus}, nsamples: 8, seqlen: 64}}\n"
        f"recover: {{method: {method}{options}}}\n"
        f"eval: {{ppl: [{corpus}], seqlen: 64, max_tokens: 256}}\n"
    )
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs") == 0
    out = tmp_path / "runs" / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {"dense", "pruned", "recovered"}
    assert json.loads((out / "recovered" / "recovery.json").read_text())["method"] == method
    assert not (out / "recovered" / "ebft.json").exists()


def test_recipe_with_an_unknown_method_option_fails_before_loading(monkeypatch, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tmp_path / 'absent'}\nrecover: {{method: squarehead, rank: 3}}\n")
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs") == 2
    assert "squarehead does not accept option(s) rank" in capsys.readouterr().err


def test_compare_keep_writes_a_run_folder_per_method(workspace, monkeypatch, tmp_path):  # noqa: F811
    corpus = workspace / "corpus.txt"
    out = tmp_path / "cmp"
    assert cli(monkeypatch, "compare", "--model", workspace / "tiny", "--methods", "none,dsnot,lora", "--calib", corpus,
               "--ppl", corpus, "--nsamples", 4, "--seqlen", 64, "--eval-seqlen", 64, "--eval-max-tokens", 128,
               "--device", "cpu", "-o", "lora.epochs=1", "--keep", "--out", out) == 0  # fmt: skip
    for name in ("none", "dsnot", "lora"):
        assert (out / name / "model.safetensors").exists() and (out / name / "run.json").exists(), name
    assert json.loads((out / "lora" / "recovery.json").read_text())["method"] == "lora"
    assert not list(tmp_path.glob(".cmp-keep-*"))


def test_early_stopping_restores_the_best_epoch():
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    states, scripted = [], iter([0.5, 0.3, 0.6, 0.7, 0.8])

    def heldout() -> float:
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scripted)

    config = FitConfig(lr=1e-2, epochs=5, batch_size=4, heldout=1, early_stop=2)
    log = train_loop(module, list(module.parameters()), lambda i: ((module(x[i]) - y[i]) ** 2).mean(), 8, config,
                     steps=10, seed=0, heldout_loss=heldout, initial_heldout=1.0)  # fmt: skip
    assert log.heldout_curve == [0.5, 0.3, 0.6, 0.7] and log.stopped_early and log.best_epoch == 2
    assert log.epochs_run == 4
    for key, value in module.state_dict().items():
        assert torch.equal(value, states[1][key]), key  # the state held out at epoch 2, not the last one


def test_micro_batches_accumulate_to_the_whole_batch_step_and_warmup_counts_steps():
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 1)
    results = []
    for micro in (0, 3):
        torch.manual_seed(0)
        module = nn.Linear(4, 1)
        config = FitConfig(lr=1e-2, epochs=2, batch_size=8, micro_batch=micro, warmup_steps=1)
        log = train_loop(module, list(module.parameters()), lambda i, m=module: ((m(x[i]) - y[i]) ** 2).mean(), 8,
                         config, steps=2, seed=0)  # fmt: skip
        results.append((module.weight.detach().clone(), log.curve))
    (w_full, curve_full), (w_micro, curve_micro) = results
    assert torch.allclose(w_full, w_micro, atol=1e-6) and curve_full == pytest.approx(curve_micro, rel=1e-5)


def test_methods_command_lists_every_method_with_its_presets(monkeypatch, capsys):
    assert cli(monkeypatch, "methods") == 0
    err = capsys.readouterr().err  # rich tables go to stderr with the progress bars
    for name in METHODS:
        assert f"{name}:" in err, name
    assert "same_sign" in err and "micro_batch" in err and "paper" in err and "cpu" in err
