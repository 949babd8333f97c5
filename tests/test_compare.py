import json
import math
import random

import pytest
import torch

from sparsefit.app.compare import parse_methods, run_compare
from sparsefit.app.reports import gap_closed
from sparsefit.errors import UsageError
from sparsefit.recover.squarehead import SquareHead

WORDS = ("the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea where ships sailed "
         "under bright stars and old towns kept their stories").split()  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    # Tiny models gain nothing from threads; token caches go to the test's folder, not the user's home.
    monkeypatch.setenv("SPARSEFIT_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(40)]
    path = tmp_path / "tiny.txt"
    path.write_text("\n\n".join(paragraphs))
    return str(path)


def compare(checkpoint, corpus, out, **overrides):
    settings = dict(
        prune="wanda", sparsity=0.5, methods="none,dsnot,ebft,squarehead,lora,s2ft", nsamples=4, seqlen=32,
        budget=4 * 32 * 2, calib=corpus, corpora=[corpus], eval_seqlen=64, eval_max_tokens=256, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    return run_compare(str(checkpoint), out, **settings)


def test_gap_closed_linear_and_log():
    assert gap_closed(10.0, 30.0, 20.0) == pytest.approx(0.5)
    assert gap_closed(10.0, 30.0, 10.0) == pytest.approx(1.0)
    assert gap_closed(10.0, 30.0, 40.0) == pytest.approx(-0.5)
    assert gap_closed(10.0, 10.0, 10.0) is None
    assert gap_closed(10.0, 0.0, 7.0) is None  # no log of 0: not a perplexity
    assert gap_closed(10.0, 1000.0, 100.0, log=True) == pytest.approx(0.5)
    assert gap_closed(10.0, 1000.0, 100.0, log=True) < gap_closed(10.0, 1000.0, 100.0)


def test_bad_method_lists_fail_with_one_line_before_any_work(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    import sparsefit.models

    def no_load(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(sparsefit.models, "load", no_load)
    out = tmp_path / "out"
    for methods, message in [("", "is empty"), ("none,magic", "'magic' is not known"), ("lora,lora", "twice")]:
        with pytest.raises(UsageError, match=message) as info:
            compare(tiny_checkpoint, corpus, out, methods=methods)
        assert "\n" not in str(info.value)
    monkeypatch.setattr(SquareHead, "supports", lambda self, pattern: "no N:M here")
    with pytest.raises(UsageError, match="squarehead cannot recover a 2:4 model: no N:M here"):
        compare(tiny_checkpoint, corpus, out, methods="none,squarehead", pattern="2:4")
    with pytest.raises(UsageError, match="lora does not accept option"):
        compare(tiny_checkpoint, corpus, out, methods="lora", method_options={"lora": {"rank": 4}})
    assert not out.exists()
    assert parse_methods(" none , dsnot ") == ["none", "dsnot"]


def test_compare_end_to_end_with_a_failing_method(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    def boom(self, ctx, config=None):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(SquareHead, "run", boom)
    out = tmp_path / "cmp"
    result = compare(tiny_checkpoint, corpus, out)
    data = json.loads((out / "compare.json").read_text())
    assert data == result
    assert set(data["methods"]) == {"none", "dsnot", "ebft", "squarehead", "lora", "s2ft"}
    assert set(data["dense"]["ppl"]) == {corpus}
    failed = data["methods"]["squarehead"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom"
    for name in ("none", "dsnot", "ebft", "lora", "s2ft"):
        entry = data["methods"][name]
        assert entry["status"] == "ok", (name, entry.get("error"))
        for key in ("ppl", "gap_closed", "gap_closed_log", "time_s", "peak_mem_mb", "trainable_params", "sparsity"):
            assert key in entry, (name, key)
        assert math.isfinite(entry["ppl"][corpus]) and entry["ppl"][corpus] > 1
        assert entry["sparsity"] == pytest.approx(data["methods"]["none"]["sparsity"])
        if name in ("dsnot", "ebft"):  # interleaved (the default): they prune with their own walk
            assert entry["mode"] == "interleaved" and entry["masks_kept"] is None
        else:
            assert entry["masks_kept"] is True
    assert data["methods"]["none"]["gap_closed"][corpus] == pytest.approx(0.0)
    assert data["methods"]["none"]["sparsity"] == pytest.approx(0.5)
    assert data["methods"]["dsnot"]["trainable_params"] == 0
    assert data["methods"]["lora"]["unmerged"]["ppl"][corpus] > 1
    assert data["settings"]["budget_tokens"] == 256 and data["settings"]["eval_max_tokens"] == 256
    assert "VmRSS" in data["settings"]["peak_mem"] or "cuda" in data["settings"]["peak_mem"]
    md = (out / "compare.md").read_text()
    assert "| squarehead | failed |" in md and "squarehead failed: RuntimeError: boom" in md
    assert "windows of 64 tokens" in md
    page = (out / "compare.html").read_text()
    assert page.count("<svg") == 2 and "<table>" in page and "http" not in page.replace("http://www.w3.org", "")
    with pytest.raises(UsageError, match="exists and is not empty"):
        compare(tiny_checkpoint, corpus, out, methods="none")


def test_compare_both_modes_reports_interleaved_of_record_and_two_step_beside_it(tiny_checkpoint, corpus, tmp_path):
    data = compare(tiny_checkpoint, corpus, tmp_path / "cmp", methods="none,ebft", mode="both")
    assert list(data["methods"]) == ["none", "ebft", "ebft two-step"]
    assert data["methods"]["ebft"]["mode"] == "interleaved" and data["methods"]["ebft"]["masks_kept"] is None
    assert data["methods"]["ebft two-step"]["mode"] == "two-step"
    assert data["methods"]["ebft two-step"]["masks_kept"] is True
    # Interleaved EBFT walks pruning again with its own inputs: its own masks, the same sparsity.
    assert data["methods"]["ebft"]["sparsity"] == pytest.approx(data["methods"]["none"]["sparsity"])
