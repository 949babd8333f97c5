"""Shared test fixtures: tiny random models of every supported architecture and a byte tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

# `make test` runs the suite in two processes (pytest-xdist), one per core: each takes one thread, and so do the
# processes the tests start (OMP_NUM_THREADS), since threads spinning on a core the other process holds cost 10-100x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

pytest_plugins = ["pytester"]  # tests/test_suite_limit.py runs a suite of its own

VOCAB = 260  # 256 bytes + a few specials


def tiny_config(arch: str = "llama", layers: int = 2, hidden: int = 64):
    common = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if arch in ("llama", "mistral", "qwen2", "qwen3", "llama-untied"):  # llama-untied: an output layer of its own
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "llama-untied": LlamaConfig}[arch]  # fmt: skip
        return cls(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=arch != "llama-untied", **common,
        )
    if arch == "gemma3":
        return Gemma3TextConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            sliding_window=16, **common,
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=512, word_embed_proj_dim=hidden, **common,
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "opt", "gpt2"]


def make_tiny_model(arch: str = "llama", layers: int = 2, hidden: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, hidden), attn_implementation="eager")
    model.eval()
    model.config.use_cache = False
    return model


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 256 byte tokens plus bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture
def tiny_checkpoint(tmp_path, byte_tokenizer):
    """A saved tiny Llama folder (safetensors + tokenizer) that sparsefit.models.load accepts."""
    path = tmp_path / "tiny-llama"
    model = make_tiny_model("llama")
    model.save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning costs 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the per-test time limit ------------------------------------------------------------------------------
# No single test may take more than this (its setup, call and teardown together), so that the suite cannot grow
# back to half an hour one slow test at a time (issue 33). A measurement belongs in bench/, not in a test.
TEST_LIMIT_S = float(os.environ.get("SPARSEFIT_TEST_LIMIT_S", "60"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    spent = getattr(item, "_sparsefit_seconds", 0.0) + call.duration
    item._sparsefit_seconds = spent
    if report.when == "teardown" and spent > TEST_LIMIT_S and report.passed:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} took {spent:.1f} s, over the {TEST_LIMIT_S:g} s limit for one test"


# --- the order of the files ------------------------------------------------------------------------------------
def pytest_collection_modifyitems(session, config, items):
    """The files holding a real-model (``slow``) test first, in their order, then the rest: `--dist loadfile` deals
    files to the workers in this order, so the long files start at once and the short ones fill in beside them
    (last, a real-model file kept one worker busy for 1.5 minutes while the other was idle)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group is kept
