"""Perplexity by the WikiText-2 protocol, checked against plain transformers computations."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefit.errors import UsageError
from sparsefit.evaluate import PerplexityResult, perplexity

VOCAB = 260


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads made these tests 20× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def stream():
    return torch.randint(0, VOCAB, (1, 1000), generator=torch.Generator().manual_seed(0))


def hf_perplexity(model, stream: torch.Tensor, seqlen: int) -> float:
    """Independent computation: transformers' own shifted loss per window, then exp of the mean."""
    windows = stream[0].numel() // seqlen
    losses = []
    with torch.no_grad():
        for w in range(windows):
            ids = stream[:, w * seqlen : (w + 1) * seqlen]
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_matches_transformers_loss(tiny_llama, stream):
    result = perplexity(tiny_llama, stream, seqlen=128)
    assert (result.windows, result.tokens, result.seqlen) == (7, 896, 128)  # 104 leftover tokens dropped
    expected = hf_perplexity(tiny_llama, stream, 128)
    assert result.value == pytest.approx(expected, rel=1e-5)
    assert 200 < result.value < 320  # a random model on random tokens: about the vocabulary size


def test_batches_and_progress_do_not_change_the_number(tiny_llama, stream):
    calls = []
    one = perplexity(tiny_llama, stream, seqlen=128)
    batched = perplexity(tiny_llama, stream[0], seqlen=128, batch_size=3, progress=lambda d, t: calls.append((d, t)))
    assert batched.value == pytest.approx(one.value, rel=1e-5)
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(stream):
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    for p in model.parameters():
        p.data.zero_()  # zero embeddings -> zero hidden states -> zero logits -> uniform predictions
    assert perplexity(model, stream, seqlen=64).value == pytest.approx(VOCAB, rel=1e-5)


def test_max_tokens_limits_the_windows(tiny_llama, stream):
    limited = perplexity(tiny_llama, stream, seqlen=128, max_tokens=300)
    assert (limited.windows, limited.tokens) == (2, 256)
    assert limited.value == pytest.approx(hf_perplexity(tiny_llama, stream[:, :256], 128), rel=1e-5)
    assert limited.value != pytest.approx(perplexity(tiny_llama, stream, seqlen=128).value, rel=1e-5)
    assert limited.to_dict() == {"value": limited.value, "seqlen": 128, "tokens": 256, "windows": 2}
    assert isinstance(limited, PerplexityResult)


def test_bad_arguments(tiny_llama, stream):
    with pytest.raises(UsageError, match="max_tokens 100 is smaller than seqlen 128"):
        perplexity(tiny_llama, stream, seqlen=128, max_tokens=100)
    with pytest.raises(UsageError, match="seqlen 0 is not accepted"):
        perplexity(tiny_llama, stream, seqlen=0)
    with pytest.raises(UsageError, match="batch_size -1 is not accepted"):
        perplexity(tiny_llama, stream, seqlen=64, batch_size=-1)
    with pytest.raises(UsageError, match=r"seqlen 2000 is longer than the evaluation text \(1000 tokens\)"):
        perplexity(tiny_llama, stream, seqlen=2000)
    with pytest.raises(UsageError, match=r"seqlen 1000 is longer than the model's context \(512 positions\)"):
        perplexity(tiny_llama, stream, seqlen=1000)
    with pytest.raises(UsageError, match="token stream of shape"):
        perplexity(tiny_llama, stream.float(), seqlen=64)


def test_a_prefix_starts_every_window_and_is_not_scored(tiny_llama, stream):
    from sparsefit.evaluate.perplexity import eval_windows

    bos = 256
    with_bos = torch.cat([torch.tensor([[bos]]), stream], dim=1)  # as a BOS-adding tokenizer returns the text
    windows = eval_windows(with_bos, 128, prefix=[bos])
    assert windows.shape == (7, 128) and (windows[:, 0] == bos).all()
    assert torch.equal(windows[:, 1:].reshape(-1), stream[0, : 7 * 127])  # the stream's own BOS is dropped
    result = perplexity(tiny_llama, with_bos, seqlen=128, prefix=[bos])
    assert (result.windows, result.tokens, result.seqlen) == (7, 7 * 127, 128)
    # Independent: transformers' loss on each [bos] + 127 tokens window predicts exactly those 127 tokens.
    losses = [tiny_llama(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result.value == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.value != pytest.approx(perplexity(tiny_llama, stream, seqlen=128).value, rel=1e-3)
    limited = perplexity(tiny_llama, with_bos, seqlen=128, max_tokens=300, prefix=[bos])
    assert (limited.windows, limited.tokens) == (2, 254)  # max_tokens counts text tokens, not the prefix
    two = eval_windows(stream, 64, prefix=[bos, 257])  # a stream without the prefix loses nothing
    assert torch.equal(two[:, 2:].reshape(-1), stream[0, : two.shape[0] * 62])
    with pytest.raises(UsageError, match="seqlen 2 leaves no room after the 2-token window prefix"):
        perplexity(tiny_llama, stream, seqlen=2, prefix=[bos, bos])
    with pytest.raises(UsageError, match=r"window prefix \[-1\] is not accepted"):
        perplexity(tiny_llama, stream, seqlen=64, prefix=[-1])


def test_leaves_the_model_as_it_was(tiny_llama, stream):
    tiny_llama.train()
    perplexity(tiny_llama, stream, seqlen=256, device="cpu")
    assert tiny_llama.training
    assert next(tiny_llama.parameters()).device.type == "cpu"
