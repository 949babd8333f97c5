"""The CLI end to end on a tiny checkpoint and a local text corpus."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_byte_tokenizer, make_tiny_model
from sparsefit.cli import main
from sparsefit.recover import ebft


def write_workspace(root, layers: int):
    """``root/tiny`` (a tiny Llama of ``layers`` blocks with the byte tokenizer) and ``root/corpus.txt``."""
    model = make_tiny_model("llama", layers=layers)
    tokenizer = make_byte_tokenizer()
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly bakers".split()
    docs = [" ".join(rng.choice(words) for _ in range(120)) for _ in range(30)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("cli"), layers=3)


@pytest.fixture(autouse=True)
def private_cache(workspace, monkeypatch):
    # Token caches of the test corpora stay out of the user's ~/.cache/sparsefit.
    monkeypatch.setenv("SPARSEFIT_HOME", str(workspace / "home"))


def cli(monkeypatch, *args) -> int:
    monkeypatch.setattr("sys.argv", ["sparsefit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        raise SystemExit(0)
    return exit_info.value.code


def prune_args(ws, out, *extra):
    return ["prune", "--model", ws / "tiny", "--calib", ws / "corpus.txt", "--nsamples", 8, "--seqlen", 64,
            "--device", "cpu", "--out", out, *extra]  # fmt: skip


EBFT_ARGS = ["--recover", "ebft", "--preset", "quick", "--lr", "1e-3", "--epochs", 2]


def test_prune_writes_a_run_folder(workspace, monkeypatch, tmp_path):
    out = tmp_path / "pruned"
    assert cli(monkeypatch, *prune_args(workspace, out, "--pattern", "2:4", "--method", "sparsegpt")) == 0
    run = json.loads((out / "run.json").read_text())
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert run["config"]["method"] == "sparsegpt" and run["source_model"] == str(workspace / "tiny")
    assert sparsity["overall"] == 0.5 and sparsity["pattern_ok"] is True
    weights = load_file(out / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert (q.reshape(q.shape[0], -1, 4) == 0).sum(-1).min() >= 2  # 2:4 in the saved file
    source = load_file(workspace / "tiny" / "model.safetensors")
    assert torch.equal(weights["model.embed_tokens.weight"], source["model.embed_tokens.weight"])  # never pruned


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.0"], "outside (0, 1)"),
        (["--pattern", "4:2"], "N:M"),
        (["--pattern", "2:5"], "5"),
        (["--method", "obs"], "unknown method"),
        (["--nsamples", "0"], "nsamples"),
        (["--seqlen", "100000"], "seqlen"),
        (["--calib", "no-such-corpus"], "no-such-corpus"),
        (["--recover", "ebft", "--lr", "0"], "lr"),
        (["--recover", "ebft", "--epochs", "0"], "epochs"),
        (["--recover", "ebft", "--train-batch", "64"], "larger than"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(workspace, monkeypatch, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert cli(monkeypatch, *prune_args(workspace, out), *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert not out.exists()


def test_existing_output_needs_overwrite(workspace, monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli(monkeypatch, *prune_args(workspace, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_interrupted_ebft_run_resumes_bit_identically(workspace, monkeypatch, tmp_path):
    full = tmp_path / "full"
    assert cli(monkeypatch, *prune_args(workspace, full, *EBFT_ARGS)) == 0

    original = ebft.EBFTStep.__call__

    def killed_at_block_1(self, ctx):
        if ctx.index == 1:
            raise KeyboardInterrupt  # as if the process were killed mid-block
        return original(self, ctx)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(ebft.EBFTStep, "__call__", killed_at_block_1)
    assert cli(monkeypatch, *prune_args(workspace, resumed, *EBFT_ARGS)) == 130
    assert not resumed.exists()  # nothing half-written
    partial = tmp_path / ".resumed.partial"
    assert json.loads((partial / "progress.json").read_text())["next_block"] == 1

    monkeypatch.setattr(ebft.EBFTStep, "__call__", original)
    assert cli(monkeypatch, *prune_args(workspace, resumed, *EBFT_ARGS, "--resume")) == 0
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not partial.exists()
    report = json.loads((resumed / "ebft.json").read_text())
    assert [blk["block"] for blk in report["blocks"]] == [0, 1, 2]


def test_resume_with_other_settings_is_refused(workspace, monkeypatch, tmp_path, capsys):
    out = tmp_path / "r"
    original = ebft.EBFTStep.__call__

    def killed(self, ctx):
        if ctx.index == 1:
            raise KeyboardInterrupt
        return original(self, ctx)

    monkeypatch.setattr(ebft.EBFTStep, "__call__", killed)
    assert cli(monkeypatch, *prune_args(workspace, out, *EBFT_ARGS)) == 130
    monkeypatch.setattr(ebft.EBFTStep, "__call__", original)
    assert cli(monkeypatch, *prune_args(workspace, out, *EBFT_ARGS[:-1], 3, "--resume")) == 2
    assert "settings differ" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["sparse-path", "dense-path", "mix:0.3"])
def test_two_step_recover_from_a_run_folder(workspace, monkeypatch, tmp_path, target):
    pruned = tmp_path / "pruned"
    assert cli(monkeypatch, *prune_args(workspace, pruned, "--sparsity", "0.6")) == 0
    out = tmp_path / "recovered"
    code = cli(monkeypatch, "recover", pruned, "--preset", "quick", "--lr", "1e-3", "--epochs", 2,
               "--target", target, "--device", "cpu", "--out", out)  # fmt: skip
    assert code == 0
    before, after = load_file(pruned / "model.safetensors"), load_file(out / "model.safetensors")
    for key, value in before.items():
        if value.dim() == 2 and "layers" in key:
            assert torch.equal(value == 0, after[key] == 0), key  # masks bit-identical
    report = json.loads((out / "ebft.json").read_text())
    assert all(b["final_loss"] < b["initial_loss"] for b in report["blocks"])
    run = json.loads((out / "run.json").read_text())
    assert run["source_model"] == str(workspace / "tiny") and run["recovery"]["target"] == target
    assert (out / "ebft.png").read_bytes()[:4] == b"\x89PNG"


def test_recover_rejects_bad_folders_and_teachers(workspace, monkeypatch, tmp_path, capsys):
    assert cli(monkeypatch, "recover", workspace / "tiny", "--out", tmp_path / "o") == 2
    assert "run.json" in capsys.readouterr().err
    pruned = tmp_path / "pruned"
    assert cli(monkeypatch, *prune_args(workspace, pruned)) == 0
    other = tmp_path / "other"
    make_tiny_model("llama", layers=2).save_pretrained(other)
    make_byte_tokenizer().save_pretrained(other)
    assert cli(monkeypatch, "recover", pruned, "--teacher", other, "--device", "cpu", "--out", tmp_path / "o") == 2
    assert "has num_hidden_layers 2, the model" in capsys.readouterr().err  # from config.json, before loading


def test_info_and_eval_json(workspace, monkeypatch, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert cli(monkeypatch, *prune_args(workspace, pruned, "--pattern", "2:4")) == 0
    capsys.readouterr()
    assert cli(monkeypatch, "info", pruned) == 0
    assert "holds in every layer" in capsys.readouterr().out
    code = cli(monkeypatch, "eval", pruned, "--ppl", workspace / "corpus.txt", "--seqlen", 64, "--max-tokens", 256,
               "--device", "cpu", "--json")  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    entry = result["ppl"][str(workspace / "corpus.txt")]
    assert entry["seqlen"] == 64 and entry["tokens"] == 256 and entry["value"] > 1


def test_eval_record_stores_results_for_the_model_card(workspace, monkeypatch, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert cli(monkeypatch, *prune_args(workspace, pruned)) == 0
    code = cli(monkeypatch, "eval", pruned, "--ppl", workspace / "corpus.txt", "--seqlen", 64, "--max-tokens", 128,
               "--device", "cpu", "--record")  # fmt: skip
    assert code == 0
    run = json.loads((pruned / "run.json").read_text())
    assert run["results"]["ppl"][str(workspace / "corpus.txt")]["tokens"] == 128
    assert run["results"]["sparsity"] == 0.5  # what was there is kept
    assert cli(monkeypatch, "eval", workspace / "tiny", "--ppl", workspace / "corpus.txt", "--record") == 2
    assert "run.json" in capsys.readouterr().err


def test_run_recipe_writes_report(workspace, monkeypatch, tmp_path, capsys):
    corpus = workspace / "corpus.txt"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: tiny\nmodel: {workspace / 'tiny'}\ndevice: cpu\n"
        f"prune: {{method: wanda, sparsity: 0.7, calib: {corpus}, nsamples: 8, seqlen: 64}}\n"
        "recover: {preset: quick, lr: 0.001, epochs: 2}\n"
        f"eval: {{ppl: [{corpus}], seqlen: 64, max_tokens: 512}}\n"
    )
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs") == 0
    out = tmp_path / "runs" / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {"dense", "pruned", "recovered"} and summary["recipe"]["prune"]["sparsity"] == 0.7
    # Per row int(0.7 * width) pruned: 44 of 64, 89 of 128 inputs.
    assert summary["rows"]["pruned"]["sparsity"] == summary["rows"]["recovered"]["sparsity"]
    assert summary["rows"]["pruned"]["sparsity"] == pytest.approx(0.6892, abs=1e-4)
    assert "gap_closed" in summary and "| recovered |" in (out / "report.md").read_text()
    pruned = load_file(out / "pruned" / "model.safetensors")
    recovered = load_file(out / "recovered" / "model.safetensors")
    for key, value in pruned.items():
        if "layers" in key and value.dim() == 2:
            assert torch.equal(value == 0, recovered[key] == 0), key
    assert (out / "recovered" / "ebft.json").exists()


@pytest.mark.parametrize(
    "text, message",
    [("prune: {methd: wanda}\n", "methd"), ("colour: red\n", "colour"), ("prune: [1, 2\n", "YAML"),
     ("recover: {method: nope}\n", "nope"), ("prune: {sparsity: 2}\n", "sparsity")],
)  # fmt: skip
def test_bad_recipe_is_one_line(monkeypatch, tmp_path, capsys, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert cli(monkeypatch, "run", recipe, "--runs-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not (tmp_path / "runs").exists()


def test_export_command(workspace, monkeypatch, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert cli(monkeypatch, *prune_args(workspace, pruned)) == 0
    assert cli(monkeypatch, "export", pruned, "--format", "hf", "--masks", "--out", tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "masks.safetensors").exists() and "wanda" in (tmp_path / "hf" / "README.md").read_text()
    assert cli(monkeypatch, "export", pruned, "--format", "compressed", "--out", tmp_path / "c") == 0
    assert (tmp_path / "c" / "model.sparse.safetensors").exists()
    capsys.readouterr()
    assert cli(monkeypatch, "export", pruned, "--format", "onnx", "--out", tmp_path / "x") == 2
    assert "onnx" in capsys.readouterr().err
    assert cli(monkeypatch, "export", workspace / "tiny", "--out", tmp_path / "y") == 2
    assert "run" in capsys.readouterr().err


def fake_cuda_peak(monkeypatch, mib: int) -> None:
    """No GPU here: CUDA's counters are faked, to check where the peak is reported."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: mib * 2**20)


def test_a_command_on_cuda_reports_its_peak_gpu_memory(workspace, monkeypatch, tmp_path, capsys):
    fake_cuda_peak(monkeypatch, 123)
    assert cli(monkeypatch, *prune_args(workspace, tmp_path / "streamed")) == 0  # a local folder: the streamed path
    assert json.loads((tmp_path / "streamed" / "run.json").read_text())["memory"]["peak_gpu_mib"] == 123.0
    assert "peak GPU memory 123 MiB" in capsys.readouterr().err
    from sparsefit.app.jobs import save_run  # the in-memory path's writer

    save_run(tmp_path / "in-memory", make_tiny_model(), None, {"command": "x"}, {})
    assert json.loads((tmp_path / "in-memory" / "run.json").read_text())["memory"] == {"peak_gpu_mib": 123.0}
