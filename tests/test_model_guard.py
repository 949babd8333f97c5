"""The model-level guard (issue 21): held-out windows of the calibration corpus, the whole model's loss on them
before and after recovery, and a fall back to the pruned model when recovery made it worse — for EBFT in the
interleaved walk and for every method in the two-step `recover`."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sparsefit.app import guard
from sparsefit.app.jobs import run_prune, run_recover
from sparsefit.data import calibration_windows
from sparsefit.models import load
from sparsefit.prune import PruneConfig
from test_cli import cli, prune_args, workspace  # noqa: F401  (the fixture is shared)

pytestmark = pytest.mark.usefixtures("one_thread")

# A rate that must ruin any model, with the block-level never-worse guard off so that the ruin reaches the model.
DIVERGE = {"preset": "quick", "lr": 30.0, "epochs": 1, "keep_best": False, "retries": 0, "heldout": 0}


@pytest.fixture(autouse=True)
def private_cache(workspace, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SPARSEFIT_HOME", str(workspace / "home"))


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):  # noqa: F811
    """The workspace's tiny Llama trained a little on its corpus: a random model is near uniform, so that ruining
    its weights can even lower its loss; a model that has learned something has something to lose."""
    loaded = load(str(workspace / "tiny"))
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = calibration_windows(tokenizer, str(workspace / "corpus.txt"), 64, 64, 7)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        batch = ids[(step * 8) % 64 : (step * 8) % 64 + 8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("guard") / "trained"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prune_config(ws, **extra) -> PruneConfig:
    return PruneConfig(method="wanda", sparsity=0.5, calib=str(ws / "corpus.txt"), nsamples=8, seqlen=64,
                       device="cpu", **extra)  # fmt: skip


def linear_weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items()
            if "layers." in k and k.endswith("proj.weight")}  # fmt: skip


def test_guard_windows_come_after_the_calibration_windows(workspace):  # noqa: F811
    tokenizer = load(str(workspace / "tiny")).tokenizer
    corpus = str(workspace / "corpus.txt")
    calib = calibration_windows(tokenizer, corpus, 8, 64, 0)
    windows = guard.guard_windows(tokenizer, corpus, 8, 64, 0, calib, tokens=512)
    assert windows.shape == (8, 64)  # 512 tokens in windows of 64
    assert not any(torch.equal(w, c) for w in windows for c in calib)  # never trained on
    assert torch.equal(windows, guard.guard_windows(tokenizer, corpus, 8, 64, 0, calib, tokens=512))  # seeded


def test_longer_guard_windows_share_no_run_with_the_calibration_windows(workspace):  # noqa: F811
    tokenizer = load(str(workspace / "tiny")).tokenizer
    corpus = str(workspace / "corpus.txt")
    calib = calibration_windows(tokenizer, corpus, 8, 64, 0)
    windows = guard.guard_windows(tokenizer, corpus, 8, 64, 0, calib, length=256, tokens=512)
    assert windows.shape == (2, 256)
    overlap = guard.defaults.GUARD_OVERLAP
    calib_runs = {tuple(row[i : i + overlap]) for row in calib.tolist() for i in range(64 - overlap + 1)}
    assert all(tuple(row[i : i + overlap]) not in calib_runs for row in windows.tolist() for i in range(256 - overlap))
    assert torch.equal(windows, guard.guard_windows(tokenizer, corpus, 8, 64, 0, calib, length=256, tokens=512))
    shorter = guard.guard_windows(tokenizer, corpus, 8, 64, 0, calib, length=100_000, tokens=512)
    assert 64 < shorter.shape[1] < 100_000  # a corpus too short for the length halves it
    everything = calibration_windows(tokenizer, corpus, 4000, 64, 0)  # a corpus that is all calibration text
    assert torch.equal(guard.guard_windows(tokenizer, corpus, 4000, 64, 1, everything, length=256, tokens=512),
                       calibration_windows(tokenizer, corpus, 8, 64, 1 + 1_000_003))  # held out by seed alone


def test_the_guard_length_is_the_evaluation_s_within_the_model_s_positions():
    config = type("Config", (), {"max_position_embeddings": 512})()
    assert guard.guard_length(config, 128) == 512  # the evaluation's 1,024, capped
    assert guard.guard_length(config, 128, 256) == 256
    assert guard.guard_length(config, 1024, 256) == 1024  # never shorter than the calibration windows


def test_decide_calls_a_higher_or_non_finite_loss_worse():
    windows = torch.zeros(2, 8, dtype=torch.long)
    assert not guard.decide("fallback", windows, 3.0, 2.5).worse
    worse = guard.decide("fallback", windows, 3.0, 3.5)
    assert worse.worse and worse.action.startswith("wrote the pruned model")
    assert guard.decide("warn", windows, 3.0, math.nan).worse
    assert "kept the recovered model" in guard.decide("warn", windows, 3.0, 9.0).action


@pytest.mark.parametrize("mode", ["fallback", "warn"])
def test_a_diverging_ebft_falls_back_to_the_pruned_model_and_says_so(workspace, trained, tmp_path, mode):  # noqa: F811
    """In-memory interleaved walk: the guard keeps each block as pruned, and writes those blocks on a fall back."""
    run = run_prune(str(trained), prune_config(workspace), tmp_path / "r", recover="ebft",
                    recover_options=DIVERGE, stream=False, guard=mode, eval_seqlen=64)  # fmt: skip
    verdict = run["guard"]
    assert verdict["worse"] and not verdict["recovered_loss"] <= verdict["pruned_loss"]
    assert verdict["windows"] == math.ceil(4096 / 64) and verdict["dense_loss"] < verdict["pruned_loss"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Model guard" in report and "recovery made the model worse" in report
    assert json.loads((tmp_path / "r" / "run.json").read_text())["guard"] == verdict
    dense = linear_weights(trained)
    saved = linear_weights(tmp_path / "r")
    as_pruned = all(torch.equal(w, dense[k] * (w != 0)) for k, w in saved.items())  # Wanda: dense x mask
    assert as_pruned == (mode == "fallback")
    assert run["results"]["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_a_recovery_that_helps_is_kept(workspace, trained, tmp_path):  # noqa: F811
    run = run_prune(str(trained), prune_config(workspace), tmp_path / "r", recover="ebft",
                    recover_options={"preset": "quick", "lr": 1e-3, "epochs": 2}, stream=False,
                    eval_seqlen=64)  # the tiny model learned 64-token windows: the guard measures those  # fmt: skip
    verdict = run["guard"]
    assert not verdict["worse"] and verdict["recovered_loss"] < verdict["pruned_loss"]
    dense, saved = linear_weights(trained), linear_weights(tmp_path / "r")
    recovered = any(not torch.equal(w, dense[k] * (w != 0)) for k, w in saved.items())
    assert recovered == (not verdict["worse"])  # the model written is the one the guard chose


def test_guard_off_measures_nothing(workspace, tmp_path):  # noqa: F811
    run = run_prune(str(workspace / "tiny"), prune_config(workspace), tmp_path / "r", recover="ebft",
                    recover_options=DIVERGE, stream=False, guard="off")  # fmt: skip
    assert run["guard"]["skipped"] == "off" and run["guard"]["pruned_loss"] is None


@pytest.mark.parametrize("method", ["lora", "squarehead", "s2ft"])
def test_every_training_method_is_guarded_in_two_step_recovery(workspace, trained, monkeypatch, tmp_path, capsys,  # noqa: F811
                                                               method):  # fmt: skip
    """A whole-model method made to diverge (no probe revert) is caught at the model level: one warning line on
    stderr, the input run's weights written back, the verdict in run.json and report.md."""
    pruned = tmp_path / "pruned"
    assert cli(monkeypatch, *prune_args(workspace, pruned, "--model", trained)) == 0
    out = tmp_path / method
    code = cli(monkeypatch, "recover", pruned, "--method", method, "--out", out, "--lr", "50", "--epochs", "1",
               "-o", "keep_best=false", "--device", "cpu")  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: model guard")]
    assert len(warnings) == 1 and "recovery made the model worse" in warnings[0], err
    run = json.loads((out / "run.json").read_text())
    assert run["guard"]["worse"] and run["guard"]["action"].startswith("wrote the pruned model")
    assert "## Model guard" in (out / "report.md").read_text()
    before, after = linear_weights(pruned), linear_weights(out)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_bad_guard_mode_is_one_line(workspace, monkeypatch, tmp_path, capsys):  # noqa: F811
    code = cli(monkeypatch, *prune_args(workspace, tmp_path / "x", "--recover", "ebft", "--guard", "maybe"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --guard 'maybe' is not one of fallback, warn, off"]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("mode", ["fallback", "warn"])
def test_the_streamed_walk_is_guarded_too(workspace, trained, tmp_path, mode):  # noqa: F811
    """A local folder streams: the pruned blocks are files in the partial folder, the losses are streamed walks, and
    a fall back stores the pruned blocks again; the same verdict as the in-memory walk."""
    options = dict(recover="ebft", recover_options=DIVERGE, guard=mode)
    streamed = run_prune(str(trained), prune_config(workspace), tmp_path / "s", **options)
    whole = run_prune(str(trained), prune_config(workspace), tmp_path / "w", stream=False, **options)
    assert streamed["memory"]["streamed"] and not whole["memory"]["streamed"]
    for key in ("pruned_loss", "recovered_loss", "dense_loss"):
        assert streamed["guard"][key] == pytest.approx(whole["guard"][key], rel=1e-4), key
    assert streamed["guard"]["worse"] and streamed["guard"]["action"] == whole["guard"]["action"]
    saved, same = linear_weights(tmp_path / "s"), linear_weights(tmp_path / "w")
    assert all(torch.equal(saved[k], same[k]) for k in same)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left


def test_streamed_two_step_recovery_falls_back_to_the_run_folder(workspace, trained, tmp_path):  # noqa: F811
    pruned = tmp_path / "pruned"
    run_prune(str(trained), prune_config(workspace), pruned)
    run = run_recover(pruned, tmp_path / "r", "ebft", DIVERGE)
    assert run["memory"]["streamed"] and run["guard"]["worse"]
    before, after = linear_weights(pruned), linear_weights(tmp_path / "r")
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_recipe_falls_back_and_its_report_says_so(workspace, trained, monkeypatch, tmp_path, capsys):  # noqa: F811
    corpus = workspace / "corpus.txt"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {trained}\ndevice: cpu\n"
        f"prune: {{method: wanda, sparsity: 0.5, calib: {corpus}, nsamples: 8, seqlen: 64}}\n"
        "recover: {method: ebft, preset: quick, lr: 30, epochs: 1, keep_best: false, retries: 0, heldout: 0}\n"
        f"eval: {{ppl: [{corpus}], seqlen: 64, max_tokens: 256}}\n"
    )
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs") == 0
    assert "warning: model guard" in capsys.readouterr().err
    out = tmp_path / "runs" / "tiny"
    assert "recovery made the model worse" in (out / "report.md").read_text()
    assert json.loads((out / "recovered" / "run.json").read_text())["guard"]["worse"]
    pruned, recovered = linear_weights(out / "pruned"), linear_weights(out / "recovered")
    assert all(torch.equal(recovered[k], pruned[k]) for k in pruned)
    recipe.write_text(recipe.read_text() + "guard: sometimes\n")
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs2") == 2
    assert capsys.readouterr().err.strip() == "error: recipe guard 'sometimes' is not one of fallback, warn, off"


@pytest.mark.parametrize("stream", [False, True])
def test_the_guard_holds_across_a_resume(workspace, trained, monkeypatch, tmp_path, stream):  # noqa: F811
    """The pruned blocks are files in the run's partial folder, so a walk interrupted and resumed is guarded as
    one that ran through: the same verdict and the same weights."""
    from sparsefit.recover.ebft import EBFTStep

    options = dict(recover="ebft", recover_options=DIVERGE, stream=stream)
    full = run_prune(str(trained), prune_config(workspace), tmp_path / "full", **options)
    original = EBFTStep.__call__

    def killed_at_block_2(self, ctx):
        if ctx.index == 2:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(EBFTStep, "__call__", killed_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        run_prune(str(trained), prune_config(workspace), tmp_path / "resumed", **options)
    monkeypatch.setattr(EBFTStep, "__call__", original)
    resumed = run_prune(str(trained), prune_config(workspace), tmp_path / "resumed", resume=True, **options)
    assert resumed["progress"]["resumed_at"] == 2 and resumed["guard"]["worse"]
    assert resumed["guard"]["pruned_loss"] == pytest.approx(full["guard"]["pruned_loss"], rel=1e-6)
    a, b = linear_weights(tmp_path / "full"), linear_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
