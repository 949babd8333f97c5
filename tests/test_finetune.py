"""Task fine-tuning (issue 23): task data and its tokens, the loss on completions, `sparsefit finetune` with every
method keeping the masks, exact-match scoring by greedy generation, and bad input refused in one line."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_byte_tokenizer, make_tiny_model
from sparsefit.data.task import (
    ARITHMETIC_TEST,
    Example,
    TaskSet,
    encode_examples,
    load_examples,
)
from sparsefit.errors import UsageError
from sparsefit.evaluate.exact_match import GenerativeTask, exact_match, first_number, greedy_generate
from sparsefit.recover.training import batch_order, causal_lm_loss
from test_cli import cli, private_cache, prune_args, write_workspace  # noqa: F401  (the fixtures are shared)
from test_cli_errors import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sums(n=40, seed=0):
    rng = random.Random(seed)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(n)]
    return [{"prompt": f"{a}+{b}=", "completion": f" {a + b}"} for a, b in pairs]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = write_workspace(tmp_path_factory.mktemp("finetune"), layers=2)
    write_jsonl(root / "sums.jsonl", sums())
    return root


# --- data ------------------------------------------------------------------------------------------------------


def test_arithmetic_has_the_documented_split():
    train, test = load_examples("arithmetic", "train"), load_examples("arithmetic", "test")
    every = load_examples("arithmetic", "all")
    assert (len(train), len(test), ARITHMETIC_TEST) == (2400, 600, 600) and len(every) == 3000
    assert every[0] == Example("Calculate 5 + 91 =", " 96")  # labelled choice D of the first row
    assert all(e.completion.startswith(" ") and first_number(e.completion) == e.answer for e in every)
    assert sorted(map(every.index, train + test)) == list(range(3000))  # the two parts, each in file order
    assert train == sorted(train, key=every.index) and test == sorted(test, key=every.index)
    # The file runs from easy addition to hard division: the hashed split puts every kind in both parts.
    for op in " + ", " - ", " * ", " / ":
        share = sum(op in e.prompt for e in test) / 600
        assert abs(share - sum(op in e.prompt for e in train) / 2400) < 0.05, op
    assert load_examples("arithmetic", "test", limit=5) == test[:5]


def test_jsonl_forms_and_their_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        *sums(8),
        {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3="},
                      {"role": "assistant", "content": "6"}]},
    ])  # fmt: skip
    every = load_examples(str(path), "all")
    assert len(every) == 10 and len(load_examples(str(path), "test")) == 2  # the last fifth
    assert load_examples(str(path), "train") == every[:8]
    chat = every[-1]
    assert chat.prompt == "be brief\n3+3=\n" and chat.completion == "6" and chat.messages[-1] == ("assistant", "6")


@pytest.mark.parametrize("record, message", [
    ({"text": "no fields"}, "neither string"),
    ({"prompt": "p", "completion": "  "}, "completion is empty"),
    ({"messages": [{"role": "user", "content": "only one"}]}, "at least two"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "is empty"),
])  # fmt: skip
def test_bad_jsonl_lines_are_one_line_errors_naming_the_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [*sums(3), record])
    with pytest.raises(UsageError, match=f"line 4.*{message}|{message}"):
        load_examples(str(path))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(UsageError, match="line 2 is not valid JSON"):
        load_examples(str(tmp_path / "broken.jsonl"))
    with pytest.raises(UsageError, match="unknown task data 'nope'"):
        load_examples("nope")
    with pytest.raises(UsageError, match="max examples 0"):
        load_examples(str(path), limit=0)


def test_labels_cover_the_completion_only_and_long_examples_are_counted():
    tokenizer = make_byte_tokenizer()
    examples = [Example("12+3=", " 15"), Example("x" * 40, " y"), Example("1+1=", " 2" + "0" * 30)]
    data = encode_examples(tokenizer, examples, max_length=20)
    assert (data.dropped, data.cut, len(data)) == (1, 1, 2)  # the 40-byte prompt fills 20 tokens; the long answer cut
    batch = data[torch.tensor([0, 1])]
    first = data.ids[0]
    encode = tokenizer.encode
    assert first == [*encode("12+3="), *encode(" 15"), tokenizer.eos_token_id]  # prompt, completion, EOS
    assert batch.labels[0, :5].eq(-100).all() and batch.labels[0, 5:9].tolist() == first[5:]
    assert batch.attention_mask[0].sum() == 9 and batch.input_ids[0, 9:].eq(tokenizer.pad_token_id).all()
    assert batch.labels[1].ne(-100).sum() == 20 - 4  # the cut answer: 16 tokens, no EOS left
    assert isinstance(data[0:1], TaskSet) and data[0:1].ids == [first]


def test_the_chat_template_switch():
    tokenizer = make_byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    chat = Example("hi\n", "yo", (("user", "hi"), ("assistant", "yo")))
    templated = encode_examples(tokenizer, [chat], 64, chat_template=True)
    plain = encode_examples(tokenizer, [chat], 64, chat_template=False)
    decode = tokenizer.decode
    assert decode(templated.ids[0][: templated.prompt_lengths[0]]) == "<user>hi\n<assistant>"
    assert decode(templated.ids[0][templated.prompt_lengths[0]:]) == "yo\n"
    assert decode(plain.ids[0], skip_special_tokens=True) == "hi\nyo"
    # A prompt / completion pair stays plain text whatever the switch (TRL's rule: only conversations are templated).
    pair = encode_examples(tokenizer, [Example("1+1=", " 2")], 64, chat_template=True)
    assert decode(pair.ids[0], skip_special_tokens=True) == "1+1= 2"


def test_the_loss_is_the_mean_cross_entropy_of_completion_tokens():
    tokenizer, model = make_byte_tokenizer(), make_tiny_model("llama")
    data = encode_examples(tokenizer, [Example("12+3=", " 15"), Example("7+1=", " 8")], 32)
    batch = data[torch.tensor([0, 1])]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    terms = []
    for row, (ids, start) in enumerate(zip(data.ids, data.prompt_lengths, strict=True)):
        for t in range(start, len(ids)):
            terms.append(-torch.log_softmax(logits[row, t - 1].float(), -1)[ids[t]])
    assert torch.allclose(causal_lm_loss(model, batch), torch.stack(terms).mean(), atol=1e-5)


def test_batches_are_grouped_by_length_within_runs():
    lengths = [random.Random(i).randrange(5, 50) for i in range(300)]
    batches = list(batch_order(300, 4, steps=150, seed=0, lengths=lengths))
    epoch = torch.cat(batches[:75])
    assert sorted(epoch.tolist()) == list(range(300))  # every example once per epoch
    run = [lengths[i] for i in torch.cat(batches[:50]).tolist()]  # the first run of 50 batches, longest first
    assert run == sorted(run, reverse=True)
    assert torch.cat(batches[75:]).tolist() != epoch.tolist()  # reshuffled


# --- generation and exact match ---------------------------------------------------------------------------------


def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    tokenizer, model = make_byte_tokenizer(), make_tiny_model("llama")
    prompts = [list(b"1+2="), list(b"Calculate 14 - 9 ="), list(b"x")]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [greedy_generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == alone and all(isinstance(text, str) for text in batched)


def test_exact_match_scores_the_first_number_before_the_stop_string(monkeypatch):
    task = GenerativeTask("arithmetic", [Example("1+2=", " 3"), Example("5-9=", " -4"), Example("2*2=", " 4")],
                          ("\n",), 8, "number")  # fmt: skip
    outputs = [" 3 apples", " -4", "\n4"]  # the last answer comes after the stop string: wrong
    monkeypatch.setattr("sparsefit.evaluate.exact_match.greedy_generate", lambda *a, **k: outputs)
    result = exact_match(make_tiny_model("llama"), make_byte_tokenizer(), task)
    assert result["exact_match"] == pytest.approx(2 / 3) and result["n"] == 3 and result["empty"] == 0


def test_empty_generations_are_counted_and_eval_says_so(workspace, monkeypatch, capsys):
    """Issue 32: an instruct model that ends its turn at once scored 0.000 and nothing said why."""
    outputs = ["", "  ", " 9"] + [""] * 5  # sums.jsonl's 8 held-out questions
    for name in ("greedy_generate", "streamed_greedy_generate"):  # a folder streams
        monkeypatch.setattr(f"sparsefit.evaluate.exact_match.{name}", lambda *a, **k: outputs)
    assert cli(monkeypatch, "eval", workspace / "tiny", "--tasks", workspace / "sums.jsonl", "--device", "cpu") == 0
    err = capsys.readouterr().err  # the table too: it is printed on the console's stream
    assert f"warning: 7 of 8 generations on {workspace / 'sums.jsonl'} were empty" in err
    assert "n 8, 7 empty" in err


# --- sparsefit finetune ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("SPARSEFIT_HOME", str(workspace / "home"))
        assert cli(monkeypatch, *prune_args(workspace, out, "--sparsity", "0.5")) == 0
    return out


@pytest.mark.parametrize("method", ["full", "lora", "s2ft", "squarehead"])
def test_finetune_keeps_the_masks_and_lowers_the_task_loss(workspace, pruned, monkeypatch, tmp_path, method):
    out = tmp_path / method
    args = ["finetune", "--model", pruned, "--data", workspace / "sums.jsonl", "--method", method, "--epochs", 3,
            "--train-batch", 4, "--lr", 3e-3, "--device", "cpu", "--out", out]  # fmt: skip
    assert cli(monkeypatch, *args) == 0
    before, after = load_file(pruned / "model.safetensors"), load_file(out / "model.safetensors")
    changed = False
    for name, weight in before.items():
        if name.endswith("proj.weight"):
            assert torch.equal(after[name] == 0, weight == 0), name  # pruned weights stay exact zeros, no new zeros
            changed |= not torch.equal(after[name], weight)
    assert changed
    run = json.loads((out / "run.json").read_text())
    fit = json.loads((out / "recovery.json").read_text())["fit"]
    assert run["command"] == "finetune" and run["data"]["examples"] == 32 and run["data"]["cut"] == 0
    assert fit["final_loss"] < fit["initial_loss"], fit
    assert run["results"]["sparsity"] == pytest.approx(json.loads((pruned / "sparsity.json").read_text())["overall"])
    if method == "squarehead":  # the teacher defaulted to the run's dense source: said, and recorded
        assert "task" in run["warnings"][0] and run["config"]["teacher"] == str(workspace / "tiny")


def test_task_rates_are_the_measured_ones_unless_a_preset_or_a_rate_is_named():
    """bench/finetune.py: full, S2FT and SquareHead hold a task at other rates than their recovery presets'
    (SquareHead's table, 4-10x full tuning's rate, left SparseGPT 70 % at 0.21 where 3e-5 gave 0.405)."""
    from sparsefit.app.finetune import task_defaults

    assert task_defaults("squarehead", {})["lr"] == 3e-5
    assert task_defaults("full", {})["lr"] == 3e-5 and task_defaults("s2ft", {})["lr"] == 1e-3
    assert "lr" not in task_defaults("lora", {})  # its recovery rate holds on a task
    assert task_defaults("squarehead", {"lr": 1e-4})["lr"] == 1e-4
    assert "lr" not in task_defaults("squarehead", {"preset": "cpu"})  # a named preset keeps its own rate


def test_eval_scores_generative_tasks(workspace, monkeypatch, capsys):
    assert cli(monkeypatch, "eval", workspace / "tiny", "--tasks", workspace / "sums.jsonl", "--device", "cpu",
               "--json") == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)["tasks"][str(workspace / "sums.jsonl")]
    assert result["n"] == 8 and 0 <= result["exact_match"] <= 1 and len(result["samples"]) == 3


@pytest.mark.parametrize("extra, message", [
    (["--data", "nope"], "unknown task data 'nope'"),
    (["--max-examples", 0], "--max-examples 0"),
    (["--method", "dsnot"], "finetune method 'dsnot'"),
    (["--teacher", "x"], "--teacher is for squarehead"),
])  # fmt: skip
def test_finetune_refuses_bad_input_in_one_line_writing_nothing(workspace, monkeypatch, capsys, tmp_path, extra,
                                                                 message):  # fmt: skip
    out = tmp_path / "out"
    args = ["finetune", "--model", workspace / "tiny", "--data", workspace / "sums.jsonl", "--out", out]
    err = one_line_error(monkeypatch, capsys, *args, *extra)
    assert message in err and not out.exists()


def test_finetune_refuses_a_bad_jsonl_and_a_teacher_of_another_vocabulary(workspace, monkeypatch, capsys, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    out = tmp_path / "out"
    err = one_line_error(monkeypatch, capsys, "finetune", "--model", workspace / "tiny", "--data", bad, "--out", out)
    assert "line 1" in err and not out.exists()
    other = make_tiny_model("llama")
    other.resize_token_embeddings(300)
    other.save_pretrained(tmp_path / "other")
    err = one_line_error(monkeypatch, capsys, "finetune", "--model", workspace / "tiny", "--data",
                         workspace / "sums.jsonl", "--method", "squarehead", "--teacher", tmp_path / "other",
                         "--out", out)  # fmt: skip
    assert "vocab_size 300" in err and not out.exists()
    err = one_line_error(monkeypatch, capsys, "eval", workspace / "tiny", "--tasks", "arithmetic,nope")
    assert "nope" in err


@pytest.mark.slow
def test_full_fine_tuning_of_smollm2_lowers_the_task_loss_on_unseen_questions():
    """The real model on the real task: 4 steps of 8 training questions lower the completion loss on 32 test
    questions (measured 4.26 -> 1.57 on 16). Exact match after 100 steps (0.135 -> 0.445 at 3e-5, ~4 CPU-minutes)
    is bench/finetune.py's."""
    from sparsefit.models import load
    from sparsefit.prune import parse_pattern
    from sparsefit.recover import RecoveryContext, get_method

    loaded = load("smollm2-135m")
    train = encode_examples(loaded.tokenizer, load_examples("arithmetic", "train", 32), 256)
    test = encode_examples(loaded.tokenizer, load_examples("arithmetic", "test", 32), 256)

    def test_loss() -> float:
        with torch.no_grad():
            return sum(float(causal_lm_loss(loaded.model, test[range(i, i + 8)])) for i in range(0, 32, 8)) / 4

    before = test_loss()
    method = get_method("full")
    config = method.configure({"epochs": 1, "batch_size": 8, "lr": 1e-4})
    ctx = RecoveryContext(model=loaded.model, teacher=loaded.model, tokenizer=loaded.tokenizer, calib_ids=train,
                          pattern=parse_pattern("unstructured"), device=torch.device("cpu"))  # fmt: skip
    fit = method.run(ctx, config)["fit"]
    after = test_loss()
    print(f"arithmetic test loss {before:.4f} -> {after:.4f}")
    assert fit["steps"] == 4 and fit["final_loss"] < fit["initial_loss"]
    assert after < 0.6 * before, (before, after)


def test_gsm8k_is_lm_evals_8_shot_gsm8k_cot():
    from sparsefit.evaluate.exact_match import GSM8K_SHOTS, load_generative

    lm_eval = pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k-cot.yaml").read_text())
    shots = [(s["question"], s["target"]) for s in config["fewshot_config"]["samples"]]
    assert config["num_fewshot"] == 8 and list(GSM8K_SHOTS) == shots  # the transcription, word for word
    task = load_generative("gsm8k")
    assert len(task.examples) == 1319 and task.until == tuple(config["generation_kwargs"]["until"])
    first = task.examples[0]
    assert first.answer == "18" and first.prompt.startswith("Q: There are 15 trees")
    assert first.prompt.endswith("\n\nQ: Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every "
                                 "morning and bakes muffins for her friends every day with four. She sells the "
                                 "remainder at the farmers' market daily for $2 per fresh duck egg. How much in "
                                 "dollars does she make every day at the farmers' market?\nA:")  # fmt: skip
    assert first.prompt.count("\n\nQ: ") == 8 and "A: There are 15 trees originally." in first.prompt


GENERATIONS = [
    " She has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.\n\n",
    " The answer is $1,800.",
    " 9 eggs, so 18 dollars.",
    " The answer is 18.5. Q: next",
    " I do not know.",
    " 7 + 11 = 18\nQ: The answer is 18.",
]


def test_gsm8k_scores_equal_lm_evals_filters_and_exact_match():
    from sparsefit.evaluate.exact_match import GSM8K_IGNORE, load_generative

    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    task = load_generative("gsm8k", limit=1)
    golds = [" 18", " 1800", " 18", " 18", " 18", " 18"]
    ours = [task.scores(g, Example("", gold)) for g, gold in zip(GENERATIONS, golds, strict=True)]
    cut_texts = [g.split("Q:")[0] for g in GENERATIONS]  # lm-eval cuts at its until strings before filtering
    strict = RegexFilter(r"The answer is (\-?[0-9\.\,]+).")
    flexible = RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    for name, filt in (("exact_match", strict), ("exact_match_flexible", flexible)):
        answers = [out[0] for out in filt.apply([[t] for t in cut_texts], [{}] * len(cut_texts))]
        theirs = [exact_match_hf_evaluate([a], [gold.strip()], regexes_to_ignore=list(GSM8K_IGNORE),
                                          ignore_case=True)["exact_match"] == 1.0
                  for a, gold in zip(answers, golds, strict=True)]  # fmt: skip
        assert [o[name] for o in ours] == theirs, name
    assert [o["exact_match"] for o in ours] == [True, False, False, False, False, False]  # "$1,800" is not strict
    assert [o["exact_match_flexible"] for o in ours] == [True, True, True, False, False, True]


def test_one_recipe_tunes_the_teacher_prunes_on_the_task_and_distils(workspace, tmp_path):
    from sparsefit.app.recipe import Recipe, run_recipe

    data = workspace / "sums.jsonl"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: sq
model: {workspace / "tiny"}
device: cpu
finetune: {{data: {data}, method: full, epochs: 2, lr: 3.0e-3, batch_size: 4}}
prune: {{method: wanda, sparsity: 0.5, calib: {data}, nsamples: 8, seqlen: 32}}
recover: {{method: squarehead, data: {data}, epochs: 2, lr: 3.0e-3, batch_size: 4}}
eval: {{ppl: [], tasks: [{data}], limit: 4}}
guard: warn
""")
    summary = run_recipe(Recipe.load(recipe), runs_root=tmp_path / "runs")
    rows = summary["rows"]
    assert list(rows) == ["base", "dense", "pruned", "recovered"]
    assert all(rows[r]["tasks"][str(data)]["n"] == 4 for r in rows)  # limit 4 of the held-out fifth
    out = tmp_path / "runs" / "sq"
    tuned, pruned = load_file(out / "tuned" / "model.safetensors"), load_file(out / "pruned" / "model.safetensors")
    recovered = load_file(out / "recovered" / "model.safetensors")
    source = load_file(workspace / "tiny" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned[q], source[q])  # the teacher was tuned, then pruned
    assert torch.equal(pruned[q] == 0, recovered[q] == 0) and not torch.equal(pruned[q], recovered[q])
    assert json.loads((out / "tuned" / "run.json").read_text())["data"]["examples"] == 32
    assert "exact_match" in (out / "report.md").read_text() or str(data) in (out / "report.md").read_text()


def test_a_recipe_refuses_a_block_wise_method_on_task_examples(workspace, tmp_path):
    from sparsefit.app.recipe import Recipe, run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {workspace / 'tiny'}\nrecover: {{method: ebft, data: {workspace / 'sums.jsonl'}}}\n")
    with pytest.raises(UsageError, match="block by block"):
        run_recipe(Recipe.load(recipe), runs_root=tmp_path / "runs")
    recipe.write_text(f"model: {workspace / 'tiny'}\nfinetune: {{method: full}}\n")
    with pytest.raises(UsageError, match="finetune needs data"):
        Recipe.load(recipe)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ["s2ft", "lora"])
def test_an_adapter_saves_alone_fuses_unfuses_exactly_and_switches(workspace, pruned, monkeypatch, capsys, tmp_path,
                                                                   method):  # fmt: skip
    from sparsefit.app.finetune import ADAPTER_METHODS, ADAPTERS, load_tuned
    from sparsefit.models import load

    ADAPTER_FILE, S2Adapter = ADAPTER_METHODS[method], ADAPTERS[method]  # noqa: N806  (the adapter's file and class)
    common = ["finetune", "--model", pruned, "--data", workspace / "sums.jsonl", "--method", method, "--epochs", 2,
              "--train-batch", 4, "--device", "cpu"]  # fmt: skip
    for seed in (0, 1):
        assert cli(monkeypatch, *common, "--seed", seed, "--out", tmp_path / f"whole{seed}") == 0
        assert cli(monkeypatch, *common, "--seed", seed, "--adapter-only", "--out", tmp_path / f"a{seed}") == 0
    assert not (tmp_path / "a0" / "model.safetensors").exists() and (tmp_path / "a0" / ADAPTER_FILE).exists()
    assert (tmp_path / "a0" / ADAPTER_FILE).stat().st_size * 5 < (pruned / "model.safetensors").stat().st_size
    base = load(str(pruned)).model
    start = {k: v.clone() for k, v in base.state_dict().items()}
    whole = [load_file(tmp_path / f"whole{seed}" / "model.safetensors") for seed in (0, 1)]

    def same_as(expected) -> bool:
        return all(torch.equal(v, expected[k]) for k, v in base.state_dict().items() if k in expected)

    first = S2Adapter.load(base, tmp_path / "a0" / ADAPTER_FILE)
    x = torch.tensor([[5, 6, 7, 8]])
    unfused = base(input_ids=x).logits
    first.fuse()
    assert same_as(whole[0])  # the fused adapter is the whole checkpoint, bit for bit
    if method == "s2ft":  # unfused, S²FT's adapter adds its update in the forward (LoRA's is not attached)
        assert torch.allclose(base(input_ids=x).logits, unfused, atol=1e-5)
    first.unfuse()
    first.remove()
    assert same_as(start)  # exactly the base again
    second = S2Adapter.load(base, tmp_path / "a1" / ADAPTER_FILE)  # switched on the same loaded base
    second.fuse()
    assert same_as(whole[1]) and not same_as(whole[0])
    tuned = load_tuned(str(tmp_path / "a1")).model.state_dict()  # what `sparsefit eval` of the folder loads
    assert all(torch.equal(v, whole[1][k]) for k, v in tuned.items() if k in whole[1])
    for method in ("full", "squarehead"):
        capsys.readouterr()
        err = one_line_error(monkeypatch, capsys, *common[:5], "--method", method, "--adapter-only", "--out",
                             tmp_path / "x")  # fmt: skip
        assert "--adapter-only" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streamed_generation_equals_the_in_memory_one(tmp_path, arch):
    from sparsefit.app.jobs import evaluate_model, evaluate_streamed
    from sparsefit.models import load

    model, tokenizer = make_tiny_model(arch, layers=2), make_byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", sums(40))
    loaded = load(str(tmp_path / "m"))
    whole = evaluate_model(loaded.model, loaded.tokenizer, ppl=[], tasks=[str(data)])["tasks"][str(data)]
    streamed = evaluate_streamed(tmp_path / "m", ppl=[], tasks=[str(data)])["tasks"][str(data)]
    assert [s["generation"] for s in streamed["samples"]] == [s["generation"] for s in whole["samples"]]
    assert streamed["exact_match"] == whole["exact_match"] and streamed["n"] == whole["n"] == 8
    from sparsefit.app.streamed import open_streamed
    from sparsefit.data.task import prompt_ids
    from sparsefit.evaluate.exact_match import streamed_greedy_generate

    opened = open_streamed(tmp_path / "m", torch.float32)
    prompts = [prompt_ids(tokenizer, e) for e in load_examples(str(data), "all")[:12]]
    ours = streamed_greedy_generate(opened.source, opened.tokenizer, prompts, max_new_tokens=6, until=("=",))
    assert ours == greedy_generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=6, until=("=",))


def test_a_task_is_calibration_text_split_as_the_task(tmp_path):
    from sparsefit.data import calibration_windows, get_corpus

    corpus = get_corpus("arithmetic")
    assert len(corpus.calib) == 2400 and len(corpus.test) == 600
    assert corpus.calib[0] == "Calculate 5 + 91 = 96"  # prompt then completion, the training questions only
    test_prompts = {e.prompt for e in load_examples("arithmetic", "test")}
    assert not any(doc.rsplit(" = ", 1)[0] + " =" in test_prompts for doc in corpus.calib[:300])
    path = write_jsonl(tmp_path / "t.jsonl", sums(20))
    task = get_corpus(str(path))
    assert task.calib == tuple(e.prompt + e.completion for e in load_examples(str(path), "train"))
    windows = calibration_windows(make_byte_tokenizer(), task, nsamples=4, seqlen=16, seed=0)
    assert windows.shape == (4, 16)


def test_the_shipped_squarehead_recipe_loads():
    from pathlib import Path

    from sparsefit.app.recipe import Recipe

    recipe = Recipe.load(Path(__file__).parent.parent / "recipes" / "squarehead-arithmetic.yaml")
    assert recipe.finetune["method"] == "full" and recipe.finetune["data"] == "arithmetic"
    assert recipe.prune["calib"] == "arithmetic" and recipe.recover["method"] == "squarehead"
    assert recipe.recover["data"] == "arithmetic" and recipe.eval["tasks"] == ["arithmetic"]
