"""Architecture adapters: where a causal LM keeps its decoder blocks, embeddings and final norm.

sparsefit never copies modeling files; it only needs to know these few attribute paths. GPT-2's
``Conv1D`` stores its weight as (in, out); :func:`weight_matrix` hides that so every method sees
(out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsefit.errors import UsageError


@dataclass(frozen=True)
class Adapter:
    model_type: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # token (and position) embeddings, never pruned
    final_norm: str | None
    rotary: str | None = None  # model-level rotary embedding, when the architecture has one

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def get_embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(path) for path in self.embeddings]

    def get_final_norm(self, model: nn.Module) -> nn.Module | None:
        return model.get_submodule(self.final_norm) if self.final_norm else None


_LLAMA_LIKE = dict(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    rotary="model.rotary_emb",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", **_LLAMA_LIKE),
    "mistral": Adapter("mistral", **_LLAMA_LIKE),
    "qwen2": Adapter("qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter("qwen3", **_LLAMA_LIKE),
    "gemma3_text": Adapter("gemma3_text", **_LLAMA_LIKE),
    "opt": Adapter(
        "opt",
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
    ),
    "gpt2": Adapter(
        "gpt2", blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"), final_norm="transformer.ln_f"
    ),
}


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s architecture, or a clear error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UsageError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): a linear layer with its weight stored transposed.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of one decoder block, by their name inside the block, in module order."""
    return {name: module for name, module in block.named_modules() if name and is_prunable(module)}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view that shares storage with it."""
    return module.weight.data.t() if _is_conv1d(module) else module.weight.data


def weight_orientation(module: nn.Module) -> str:
    """``"out_in"`` for nn.Linear, ``"in_out"`` for GPT-2's Conv1D."""
    return "in_out" if _is_conv1d(module) else "out_in"
