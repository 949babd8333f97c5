"""Issue 32's bad-input battery: each case that ended in a traceback or was silently accepted is one line and
exit code 2 now, before any work (the tiny workspace of test_cli: a 3-block Llama and a text corpus)."""

import json

import pytest

from conftest import make_byte_tokenizer, make_tiny_model
from test_cli import cli, private_cache, prune_args, workspace  # noqa: F401  (the fixtures are shared)


def refused(monkeypatch, capsys, *args, code: int = 2) -> str:
    assert cli(monkeypatch, *args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def pruned(workspace, tmp_path_factory):  # noqa: F811
    """A Wanda 50 % run folder of the tiny model."""
    out = tmp_path_factory.mktemp("bad") / "pruned"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SPARSEFIT_HOME", str(workspace / "home"))
        assert cli(monkeypatch, *prune_args(workspace, out)) == 0
    return out


@pytest.mark.parametrize(
    "extra, message",
    [(["--sparsity", "0"], "sparsity 0.0 is outside (0, 1)"),
     (["--pattern", "2:4", "--sparsity", "0.7"], "sparsity 0.7 does not go with pattern 2:4, which removes 0.5"),
     (["--pattern", "1:4", "--sparsity", "0.5"], "sparsity 0.5 does not go with pattern 1:4, which removes 0.75")],
)  # fmt: skip
def test_a_sparsity_that_removes_nothing_or_contradicts_the_pattern_is_refused(
    workspace, monkeypatch, capsys, tmp_path, extra, message  # noqa: F811
):
    err = refused(monkeypatch, capsys, *prune_args(workspace, tmp_path / "out", *extra))
    assert message in err
    assert not (tmp_path / "out").exists()


def test_an_nm_pattern_alone_takes_its_own_sparsity(workspace, monkeypatch, tmp_path):  # noqa: F811
    assert cli(monkeypatch, *prune_args(workspace, tmp_path / "out", "--pattern", "1:4")) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["config"]["sparsity"] == 0.75 and run["results"]["sparsity"] == pytest.approx(0.75)


@pytest.mark.parametrize("option", ["--nsamples", "--seqlen"])
def test_recover_with_zero_windows_or_tokens_is_refused_not_replaced(
    workspace, pruned, monkeypatch, capsys, tmp_path, option  # noqa: F811
):
    err = refused(monkeypatch, capsys, "recover", pruned, option, "0", "--device", "cpu", "--out", tmp_path / "r")
    assert f"{option.removeprefix('--')} 0 must be a positive number" in err


def test_a_squarehead_teacher_of_another_width_is_refused_before_loading(
    workspace, pruned, monkeypatch, capsys, tmp_path  # noqa: F811
):
    narrow = tmp_path / "narrow"
    make_tiny_model("llama", layers=3, hidden=32).save_pretrained(narrow)
    make_byte_tokenizer().save_pretrained(narrow)
    err = refused(monkeypatch, capsys, "recover", pruned, "--method", "squarehead", "--teacher", narrow,
                  "--device", "cpu", "--out", tmp_path / "r")  # fmt: skip
    assert "has hidden_size 32, the model" in err and "64" in err


def test_a_recipe_that_is_not_text_is_refused(workspace, monkeypatch, capsys, tmp_path):  # noqa: F811
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\xff\xfe\x00\x81name: x\n")
    assert "is not UTF-8 text" in refused(monkeypatch, capsys, "run", recipe, "--runs-dir", tmp_path / "runs")


def test_eval_with_nothing_to_evaluate_is_refused(workspace, pruned, monkeypatch, capsys):  # noqa: F811
    assert "leave nothing to evaluate" in refused(monkeypatch, capsys, "eval", pruned, "--ppl", "")


def test_a_compressed_export_of_a_model_without_zeros_is_refused(workspace, pruned, monkeypatch, capsys, tmp_path):  # noqa: F811
    dense = tmp_path / "dense"
    dense.mkdir()
    for item in pruned.iterdir():
        (dense / item.name).write_bytes(item.read_bytes())
    sparsity = json.loads((dense / "sparsity.json").read_text())
    (dense / "sparsity.json").write_text(json.dumps({**sparsity, "overall": 0.0}))
    err = refused(monkeypatch, capsys, "export", dense, "--format", "compressed", "--out", tmp_path / "e")
    assert "has no zeros to compress" in err and "--format hf" in err


def test_finetune_longer_than_the_models_positions_is_refused(workspace, pruned, monkeypatch, capsys, tmp_path):  # noqa: F811
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "word " * 700 + str(i), "completion": " yes"}) + "\n"
                            for i in range(40)))  # fmt: skip
    err = refused(monkeypatch, capsys, "finetune", "--model", pruned, "--data", data, "--max-length", "1000",
                  "--device", "cpu", "--out", tmp_path / "f")  # fmt: skip
    assert "--max-length 1000 is beyond the model's 512 positions" in err


def test_an_output_inside_the_cache_of_built_in_models_is_refused(workspace, monkeypatch, capsys, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    (home / "models" / "smollm2-135m").mkdir(parents=True)
    monkeypatch.setenv("SPARSEFIT_HOME", str(home))
    err = refused(monkeypatch, capsys, *prune_args(workspace, home / "models" / "smollm2-135m", "--overwrite"))
    assert "lies inside sparsefit's cache" in err
    assert (home / "models" / "smollm2-135m").is_dir()


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "corpus.txt"),
                                   IsADirectoryError(21, "Is a directory", "config.json")])  # fmt: skip
def test_a_file_that_cannot_be_read_is_one_line(workspace, monkeypatch, capsys, tmp_path, error):  # noqa: F811
    def unreadable(*args, **kwargs):
        raise error

    monkeypatch.setattr("sparsefit.app.jobs.get_corpus", unreadable)  # where prune reads its calibration text first
    err = refused(monkeypatch, capsys, *prune_args(workspace, tmp_path / "out"))
    assert err == f"error: cannot read {error.filename}: {error.strerror}"


@pytest.mark.parametrize("model_type", ["bert", "frobnet"])  # one transformers knows (not causal), one it does not
def test_a_model_of_an_unsupported_architecture_is_one_line_and_exit_2(
    workspace, monkeypatch, capsys, tmp_path, model_type  # noqa: F811
):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in (workspace / "tiny").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    args = prune_args(workspace, tmp_path / "out")
    args[args.index("--model") + 1] = folder
    err = refused(monkeypatch, capsys, *args)
    assert f"architecture {model_type!r} of {str(folder)!r} is not supported; supported: gemma3_text, " in err
