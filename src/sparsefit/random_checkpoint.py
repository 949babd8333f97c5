"""Random-weight models of a real architecture written to local safetensors shards, for scale tests and benchmarks.

Written one tensor at a time (never the whole model in memory), with the index file of a sharded checkpoint, so a
model far bigger than memory can be made on any machine without a hub.

Tooling, not part of a job: it sits above ``walk/`` (it writes through walk's shard writer) and nothing in the
package imports it. It used to live in ``models/``, below ``walk/``, where that import closed a models <-> walk
cycle (``tests/test_layers.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_llama(
    folder: Path, *, layers: int, hidden: int, intermediate: int, heads: int, vocab: int,
    kv_heads: int | None = None, tie_embeddings: bool = False, blocks_per_shard: int = 4,
    max_positions: int = 4096, dtype: torch.dtype = torch.float32, seed: int = 0,
) -> int:  # fmt: skip
    """A Llama with N(0, 0.02) linear and embedding weights and unit norms in ``folder`` (created), as shards of
    ``blocks_per_shard`` blocks (the embeddings, final norm and head in the first); returns the bytes written."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsefit.walk.shards import write_index, write_shard

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings)  # fmt: skip
    with init_empty_weights():
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    if tie_embeddings:
        shapes.pop("lm_head.weight")  # tied to the input embedding, as save_pretrained writes it
    folder = Path(folder)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        block = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        shards.setdefault(f"model-{block // blocks_per_shard + 1:05d}.safetensors", []).append(name)

    def tensor(name: str) -> torch.Tensor:
        value = torch.ones(shapes[name]) if "norm" in name else torch.randn(shapes[name], generator=generator) * 0.02
        return value.to(dtype)

    weight_map, total = {}, 0
    for shard, names in shards.items():
        total += write_shard(folder / shard, [(name, dtype, shapes[name], lambda n=name: tensor(n)) for name in names])
        weight_map.update(dict.fromkeys(names, shard))
    write_index(folder / "model.safetensors.index.json", weight_map, total)
    config.save_pretrained(folder)
    return total
