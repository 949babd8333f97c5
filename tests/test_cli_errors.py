"""Bad input is one line and exit code 2, refused before any work (issue 22: sections 1, 2 and 5).

The parser's own errors through the real entry point; option and recipe values converted to their fields' types
(nan and inf refused); the checks that used to come after pruning or loading; a hub id with no hub in reach.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsefit.app.recipe import Recipe, load_yaml
from sparsefit.errors import UsageError
from sparsefit.recover import get_method
from sparsefit.recover.training import convert_value
from test_cli import cli, private_cache, prune_args, workspace  # noqa: F401  (the fixtures are shared)

CPU = torch.device("cpu")


def one_line_error(monkeypatch, capsys, *args) -> str:
    assert cli(monkeypatch, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ---------------------------------------------------------------------------------------------- 1. the parser


def entry_point() -> list[str]:
    """The installed ``sparsefit`` script beside this interpreter, else ``python -m sparsefit``."""
    script = Path(sys.executable).with_name("sparsefit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sparsefit"]


@pytest.mark.parametrize(
    "args, message",
    [(["prune", "--model", "M", "--sparsity", "half", "--out", "X"], "'--sparsity'"),
     (["prune", "--model", "M", "--frobnicate", "3", "--out", "X"], "--frobnicate"),
     (["prune", "--model", "M"], "'--out'"),
     (["pruen"], "pruen")],
)  # fmt: skip
def test_a_usage_error_of_the_parser_is_one_line_with_exit_code_2(tmp_path, args, message):
    done = subprocess.run([*entry_point(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPARSEFIT_HOME": str(tmp_path / "home")})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------------------ 2. values and their types


@pytest.mark.parametrize(
    "value, kind, expected",
    [("4", int, 4), (4, int, 4), ("1e-3", float, 1e-3), (2, float, 2.0), ("yes", bool, True), (0, bool, False),
     (2, str, "2"), ("wiki", list[str], ["wiki"]), ("q_proj, v_proj", tuple[str, ...], ("q_proj", "v_proj")),
     (None, float | None, None), ("0.5", float | None, 0.5)],
)  # fmt: skip
def test_a_value_is_converted_as_the_command_line_converts_it(value, kind, expected):
    assert convert_value(value, kind, "key") == expected


@pytest.mark.parametrize(
    "value, kind, message",
    [("fast", float, "key 'fast' must be a finite number"), ("nan", float, "key 'nan' must be a finite number"),
     (float("inf"), float, "key inf must be a finite number"), (True, float, "key True must be a finite number"),
     ("4.0", int, "key '4.0' must be an integer"), (2.5, int, "key 2.5 must be an integer"),
     ("maybe", bool, "key 'maybe' must be true or false"), (["a", "b"], str, "key ['a', 'b'] must be a string"),
     (None, float, "key None must be a finite number"), (3, list[str], "key 3 must be a list of names"),
     (float("nan"), float | None, "key nan must be a finite number")],
)  # fmt: skip
def test_a_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(value, kind, message):
    with pytest.raises(UsageError) as error:
        convert_value(value, kind, "key")
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "method, options, message",
    [("ebft", {"lr": "fast"}, "ebft option lr 'fast' must be a finite number"),
     ("ebft", {"lr": "nan"}, "ebft option lr 'nan' must be a finite number"),
     ("squarehead", {"lr": "nan"}, "squarehead option lr 'nan' must be a finite number"),
     ("ebft", {"lr": float("inf")}, "ebft option lr inf must be a finite number"),
     ("lora", {"r": "many"}, "lora option r 'many' must be an integer"),
     ("dsnot", {"max_cycles": 2.5}, "dsnot option max_cycles 2.5 must be an integer"),
     ("ebft", {"preset": ["cpu"]}, "ebft preset ['cpu'] is not known"),
     ("lora", {"targets": 1}, "lora option targets 1 must be layer names such as q_proj,v_proj"),
     ("s2ft", {"targets": {"o_proj": 1}}, "s2ft option targets {'o_proj': 1} must be layer names such as o_proj,")],
)  # fmt: skip
def test_method_options_are_converted_to_their_fields_types(method, options, message):
    with pytest.raises(UsageError) as error:
        get_method(method).configure(options, 8, CPU)
    assert str(error.value).startswith(message)


def test_method_options_given_as_text_take_their_fields_types():
    config = get_method("ebft").configure({"lr": "1e-3", "epochs": "2", "window": 2, "train_norms": "no"}, 8, CPU)
    assert (config.lr, config.epochs, config.window, config.train_norms) == (1e-3, 2, "2", False)
    assert get_method("lora").configure({"targets": "q_proj,v_proj"}, 8, CPU).targets == ("q_proj", "v_proj")


@pytest.fixture
def fake_run(workspace, tmp_path):  # noqa: F811
    """What a run folder records, without a model: every check here comes before anything loads."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"calib": str(workspace / "corpus.txt"), "nsamples": 8, "seqlen": 64, "seed": 0}
    (run / "run.json").write_text(json.dumps({"source_model": str(tmp_path / "absent"), "config": config}))
    (run / "sparsity.json").write_text(json.dumps({"pattern": "unstructured", "overall": 0.5}))
    (run / "config.json").write_text("{}")
    return run


@pytest.mark.parametrize(
    "args, message",
    [(["--method", "ebft", "-o", "lr=fast"], "ebft option lr 'fast' must be a finite number"),
     (["--method", "ebft", "-o", "lr=nan"], "ebft option lr 'nan' must be a finite number"),
     (["--method", "squarehead", "-o", "lr=nan"], "squarehead option lr 'nan' must be a finite number"),
     (["--method", "ebft", "--lr", "inf"], "ebft option lr inf must be a finite number"),
     (["--method", "ebft", "--weight-decay", "nan"], "ebft option weight_decay nan must be a finite number"),
     (["--method", "lora", "-o", "targets=1"], "lora option targets 1 must be layer names such as q_proj,v_proj "
                                               "(names separated by commas, or a list)"),
     (["--method", "s2ft", "-o", "targets=1"], "s2ft option targets 1 must be layer names such as o_proj,down_proj "
                                               "(names separated by commas, or a list)")],
)  # fmt: skip
def test_recover_refuses_a_bad_option_value_in_one_line(fake_run, monkeypatch, capsys, tmp_path, args, message):
    err = one_line_error(monkeypatch, capsys, "recover", fake_run, *args, "--out", tmp_path / "out")
    assert err == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_prune_and_compare_refuse_nan_and_inf(workspace, monkeypatch, capsys, tmp_path):  # noqa: F811
    out = tmp_path / "runs" / "out"
    err = one_line_error(monkeypatch, capsys, *prune_args(workspace, out, "--owl-lambda", "0.05", "--owl-m", "inf"))
    assert err == "error: --owl-m inf must be a finite number"
    err = one_line_error(monkeypatch, capsys, *prune_args(workspace, out, "--recover", "ebft", "--lr", "inf"))
    assert err == "error: ebft option lr inf must be a finite number"
    compare = ["compare", "--model", workspace / "tiny", "--calib", workspace / "corpus.txt", "--out", out]
    err = one_line_error(monkeypatch, capsys, *compare, "--methods", "lora", "-o", "lora.lr=abc")
    assert err == "error: lora option lr 'abc' must be a finite number"
    err = one_line_error(monkeypatch, capsys, *compare, "--owl-lambda", "0.05", "--owl-m", "nan")
    assert err == "error: --owl-m nan must be a finite number"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "text, message",
    [("prune: {sparsity: half}\n", "recipe prune sparsity 'half' must be a finite number"),
     ("prune: {sparsity: .nan}\n", "recipe prune sparsity nan must be a finite number"),
     ("prune: {nsamples: lots}\n", "recipe prune nsamples 'lots' must be an integer"),
     ("prune: {owl_lambda: .inf}\n", "recipe prune owl_lambda inf must be a finite number"),
     ("recover: {lr: fast}\n", "ebft option lr 'fast' must be a finite number"),
     ("recover: {method: squarehead, lr: .nan}\n", "squarehead option lr nan must be a finite number"),
     ("recover: {method: [ebft]}\n", "recipe recover method ['ebft'] must be a string"),
     ("recover: {method: lora, targets: 1}\n", "lora option targets 1 must be layer names such as q_proj,v_proj"),
     ("eval: {max_tokens: lots}\n", "recipe eval max_tokens 'lots' must be an integer"),
     ("eval: {seqlen: 0}\n", "recipe eval seqlen 0 must be a positive number of tokens"),
     ("eval: {tasks: [nope]}\n", "nope"),  # a task name, checked before the model loads
     ("model: [a, b]\n", "recipe model ['a', 'b'] must be a string"),
     ("name: [a]\n", "recipe name ['a'] must be a string")],
)  # fmt: skip
def test_a_bad_recipe_value_is_one_line_before_anything_loads(monkeypatch, capsys, tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tmp_path / 'absent'}\ndevice: cpu\n{text}")
    err = one_line_error(monkeypatch, capsys, "run", recipe, "--runs-dir", tmp_path / "runs")
    assert message in err
    assert not (tmp_path / "runs").exists()


def test_recipe_values_take_their_fields_types(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text('name: 123\nprune: {nsamples: "4", sparsity: "0.6", pattern: 2:4}\n'
                    "eval: {ppl: wiki, tasks: arc_easy}\n")  # fmt: skip
    recipe = Recipe.load(path)
    assert recipe.name == "123"
    assert (recipe.prune["nsamples"], recipe.prune["sparsity"], recipe.prune["pattern"]) == (4, 0.6, "2:4")
    assert recipe.eval["ppl"] == ["wiki"] and recipe.eval["tasks"] == ["arc_easy"]  # one name, not its letters
    assert load_yaml("2:4") == "2:4" and load_yaml("8") == 8  # YAML 1.1 would read 124


# ----------------------------------------------------------------------------------------- 5. before any work


@pytest.mark.parametrize(
    "extra, message",
    [(["--eval-seqlen", 0], "--eval-seqlen 0 must be a positive number of tokens"),
     (["--eval-max-tokens", 0], "--eval-max-tokens 0 must be a positive number of tokens"),
     (["--eval-seqlen", 64, "--eval-max-tokens", 32], "--eval-max-tokens 32 is shorter than --eval-seqlen 64")],
)  # fmt: skip
def test_evaluation_settings_are_refused_before_pruning(workspace, monkeypatch, capsys, tmp_path, extra, message):  # noqa: F811
    out = tmp_path / "runs" / "out"
    err = one_line_error(monkeypatch, capsys,
                         *prune_args(workspace, out, "--eval-ppl", workspace / "corpus.txt", *extra))  # fmt: skip
    assert err.startswith(f"error: {message}")
    assert not (tmp_path / "runs").exists()  # no run folder, no .partial


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_calibration_text_that_is_not_utf8_is_refused_naming_the_file(workspace, monkeypatch, capsys, tmp_path,  # noqa: F811
                                                                      suffix):  # fmt: skip
    noise = tmp_path / f"noise{suffix}"
    noise.write_bytes(bytes(range(128, 256)) * 40)
    out = tmp_path / "runs" / "out"
    args = [a if a != workspace / "corpus.txt" else noise for a in prune_args(workspace, out)]
    err = one_line_error(monkeypatch, capsys, *args)
    assert f"corpus file {str(noise)!r} is not UTF-8 text" in err
    assert not (tmp_path / "runs").exists()


def test_max_memory_is_refused_where_the_model_is_loaded_whole(workspace, fake_run, monkeypatch, capsys, tmp_path):  # noqa: F811
    out = tmp_path / "runs" / "out"
    for model in ("smollm2-135m", "org/name"):  # a built-in, a hub id: neither is fetched for this
        args = [a if a != workspace / "tiny" else model for a in prune_args(workspace, out, "--max-memory", "1MB")]
        err = one_line_error(monkeypatch, capsys, *args)
        assert err == (f"error: --max-memory applies only to the streamed path (a local safetensors folder, not a "
                       f"structured prune); {model!r} is loaded whole")  # fmt: skip
    err = one_line_error(monkeypatch, capsys, "recover", fake_run, "--method", "squarehead", "--max-memory", "1GB",
                         "--out", out)  # fmt: skip
    assert err.startswith("error: --max-memory applies only to the streamed path") and "squarehead" in err
    assert not (tmp_path / "runs").exists()


def test_eval_with_tasks_and_no_ppl_scores_only_the_tasks(workspace, monkeypatch, capsys):  # noqa: F811
    import sparsefit.app.jobs as jobs

    asked = []

    def evaluated(folder, *, ppl, tasks, **kwargs):
        asked.append((ppl, tasks))
        return {}

    monkeypatch.setattr(jobs, "evaluate_streamed", evaluated)
    monkeypatch.setattr("sparsefit.data.get_corpus", lambda name: name)  # the built-in corpora are not fetched
    assert cli(monkeypatch, "eval", workspace / "tiny", "--tasks", "arc_easy", "--device", "cpu") == 0
    assert cli(monkeypatch, "eval", workspace / "tiny", "--device", "cpu") == 0
    assert cli(monkeypatch, "eval", workspace / "tiny", "--tasks", "arc_easy", "--ppl", "wiki", "--device", "cpu") == 0
    assert asked == [([], ["arc_easy"]), (["wiki", "books"], []), (["wiki"], ["arc_easy"])]
    capsys.readouterr()  # the (empty) tables
    err = one_line_error(monkeypatch, capsys, "eval", workspace / "tiny", "--seqlen", 0)
    assert err == "error: --seqlen 0 must be a positive number of tokens" and len(asked) == 3


def test_a_hub_id_with_no_hub_in_reach_is_one_line_at_once(monkeypatch, capsys, tmp_path):
    import sparsefit.models.loading as loading

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words to evaluate on\n" * 20)

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=loading.HUB_PROBE_S: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    began = time.perf_counter()
    err = one_line_error(monkeypatch, capsys, "eval", "sparsefit-tests/no-such-model", "--ppl", corpus)
    assert time.perf_counter() - began < 30  # no retries with back-off (about a minute)
    assert "cannot be reached and no copy is cached" in err and "sparsefit-tests/no-such-model" in err


def test_the_hub_probe_reports_what_a_connection_finds(monkeypatch):
    from sparsefit.models.loading import hub_reachable

    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    with socket.socket() as server:  # a listening port answers; a closed one does not
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable(timeout=2)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub_reachable(timeout=2)
