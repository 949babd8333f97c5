"""Greedy decoding with its timing: prefill and per-token decode measured apart, tokens/s and weight memory."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn

from sparsefit.errors import UsageError


@dataclass
class Decoded:
    tokens: torch.Tensor  # [batch, new tokens]
    prefill_s: float
    decode_s: float  # the new tokens after the first (the first comes from the prefill)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * steps / self.decode_s if steps and self.decode_s > 0 else float("nan")

    def prefill_tokens_per_s(self, prompt_tokens: int) -> float:
        return self.tokens.shape[0] * prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")


def check_request(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """The request fits the model: at least one new token, the prompt and the new tokens within its positions."""
    from sparsefit.models.loading import context_length

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")
    if prompt_tokens < 1:
        raise UsageError("the prompt is empty after tokenizing; give some text")
    limit = context_length(config)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise UsageError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceed the "
                         f"model's {limit} positions; shorten the prompt or generate fewer tokens")  # fmt: skip


@torch.no_grad()
def greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> Decoded:
    """``max_new_tokens`` greedy tokens after ``input_ids`` ``[batch, length]`` (every row the same length), with
    the KV cache, as ``model.generate(do_sample=False)`` picks them; no stop at the end-of-text token, so that
    every run times the same number of steps."""
    # transformers 5 names the KV cache `cache`; 4.x `past_key_values`.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    began = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    prefill_s = time.perf_counter() - began
    tokens = [token]
    began = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=token, use_cache=True, **{key: out[key]})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    sync()
    return Decoded(torch.cat(tokens, dim=1), prefill_s, time.perf_counter() - began)


def same_tokens(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading greedy tokens agree (per row, summed): after the first difference the two continue from
    different text, so later agreement means nothing."""
    total = 0
    for row_a, row_b in zip(a, b, strict=True):
        differ = (row_a != row_b).nonzero()
        total += int(differ[0]) if differ.numel() else row_a.numel()
    return total
