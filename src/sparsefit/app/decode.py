"""``sparsefit generate``: greedy text from a sparse model with its speed and weight memory, or against dense."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sparsefit.errors import UsageError
from sparsefit.infer import kernel as compiled
from sparsefit.infer.generate import check_request, greedy, same_tokens
from sparsefit.infer.load import (
    SEMI_STRUCTURED_VALUES,
    check_choice,
    default_values,
    load,
    pruned_layers,
    sparsify,
    weight_bytes,
)
from sparsefit.infer.sparse_linear import SparseLinear

MIB = 1 << 20


def _tokenizer_and_config(path: str):
    from transformers import AutoConfig

    from sparsefit.models.loading import load_tokenizer, resolve

    folder = resolve(path) or Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UsageError(f"{str(path)!r} is not a model folder (no config.json); give a run folder, an export or a "
                         "built-in model name")  # fmt: skip
    return load_tokenizer(folder), AutoConfig.from_pretrained(folder)


def _timed(model, input_ids: torch.Tensor, max_new_tokens: int):
    input_ids = input_ids.to(next(model.parameters()).device)
    greedy(model, input_ids, min(2, max_new_tokens))  # warm-up: first-call allocations, the kernel's tables
    return greedy(model, input_ids, max_new_tokens)


def _to_kernels(model, kernels: str, values: str, threads: int) -> dict:
    """Put a dense model's pruned layers on ``kernels`` in place: ``{layer: "sparse" | "dense"}``."""
    if kernels != "2:4":
        return sparsify(model, kernels, values, threads)
    from sparsefit.export.semi_structured import to_semi_structured

    to_semi_structured(model)
    return dict.fromkeys(pruned_layers(model), "sparse")


def generate_text(path: str | os.PathLike, prompt: str, max_new_tokens: int = 32, kernels: str = "auto",
                  values: str | None = None, threads: int | None = None,
                  compare_dense: bool = False) -> dict:  # fmt: skip
    """Generate greedily from ``path``'s model; with ``compare_dense``, time the dense model first, then the same
    model with its pruned layers on the sparse kernel (one process, in turn), and compare speed and tokens."""
    values = values or default_values(kernels)
    check_choice(kernels, values)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads} must be >= 1")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")
    tokenizer, config = _tokenizer_and_config(str(path))
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    check_request(config, input_ids.shape[1], max_new_tokens)
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    result: dict = {"kernels": kernels, "values": values, "threads": threads, "prompt_tokens": input_ids.shape[1],
                    "max_new_tokens": max_new_tokens}  # fmt: skip
    if compare_dense:
        model = load(path, kernels="dense")
        if kernels == "2:4":
            model = model.to("cuda", SEMI_STRUCTURED_VALUES[values])
        dense = _timed(model, input_ids, max_new_tokens)
        result["dense"] = {"tokens_per_s": dense.decode_tokens_per_s,
                           "prefill_tokens_per_s": dense.prefill_tokens_per_s(input_ids.shape[1])}  # fmt: skip
        dense_bytes = weight_bytes(model)
        layers = _to_kernels(model, kernels, values, threads)
    else:
        model = load(path, kernels=kernels, values=values, threads=threads)
        layers = {name: "sparse" if isinstance(m, SparseLinear) or kernels == "2:4" else "dense"
                  for name, m in pruned_layers(model).items()}  # fmt: skip
        dense_bytes = weight_bytes(model, as_dense=True)
    run = _timed(model, input_ids, max_new_tokens)
    result.update(
        text=tokenizer.decode(torch.cat([input_ids[0], run.tokens[0].cpu()]), skip_special_tokens=True),
        tokens_per_s=run.decode_tokens_per_s,
        prefill_tokens_per_s=run.prefill_tokens_per_s(input_ids.shape[1]),
        layers={kind: sum(v == kind for v in layers.values()) for kind in ("sparse", "dense")},
        isa=compiled.kernel().isa_name if compiled.kernel() else None,
        # 2:4's weights are torch's own sparse tensors: their bytes are not counted here
        weights_mib={"sparse": weight_bytes(model) / MIB if kernels != "2:4" else None, "dense": dense_bytes / MIB},
    )
    if compiled.problem() and kernels == "auto":
        result["warning"] = f"dense kernels: {compiled.problem()}"
    elif compiled.kernel() and compiled.kernel().warning:
        result["warning"] = compiled.kernel().warning
    if compare_dense:
        result["speedup"] = run.decode_tokens_per_s / result["dense"]["tokens_per_s"]
        result["same_tokens"] = same_tokens(run.tokens, dense.tokens)
    return result
