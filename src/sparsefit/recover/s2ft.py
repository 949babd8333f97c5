"""S²FT (Yang et al., arXiv 2412.06289) as a cheap recovery mode: train a few heads and FFN channels of the model.

"Select sparsely, compute densely": choose a share of the model's (block, attention head) pairs and of its
(block, FFN channel) pairs, at random over the whole model as the reference's ``finetune.py`` does
(``random.sample`` over ``num_heads x num_layers`` indices, ``int(total * ratio)`` of them), or the ones pruning
removed most from; then train only the submatrices they own in the coupled matrices: a head owns its rows of q
(and its key/value group's rows of k, v) and its columns of o; an FFN channel owns its rows of gate/up and its
column of down. The reference's scripts train the output side (``o_ratio 0.052``, ``d_ratio 0.02`` for
LLaMA-2 on commonsense), which is also the cheapest to backpropagate into; that is the default here. Its optimizer:
AdamW betas (0.9, 0.95), no weight decay, lr 2e-4, linear decay after 100 warm-up steps, batch 64 (the ``paper``
preset). Deliberate differences: one selection of heads serves every head-owned target of a block (the reference
draws q and v separately), and it trains on the calibration windows in the model's dtype (the reference: bf16).

The update lives in a separate small adapter (one dense ``delta`` per chosen submatrix): the layer's output gets
``x[..., cols] @ delta.T`` (or ``x @ delta.T`` added to the chosen output rows), the gathered columns being the
dense submatrix that the paper's co-permutation would make contiguous, with no change of the checkpoint layout.
``fuse`` writes ``W[sub] += delta`` in place, ``unfuse`` restores the exact original values. Masks are kept: the
delta is masked by the submatrix's keep mask, so a pruned weight stays exactly zero after fusing. Everything not
chosen is bit-identical afterwards. Needs llama-like blocks (``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsefit.atomic import write_file_atomically
from sparsefit.errors import UsageError, check
from sparsefit.models.adapters import get_adapter, weight_matrix
from sparsefit.recover.base import ModelMethod, RecoveryContext, read_adapter_file
from sparsefit.recover.lora import split_names
from sparsefit.recover.squarehead import SquareHeadConfig, squarehead_step_loss
from sparsefit.recover.training import (
    TrainConfig,
    causal_lm_loss,
    fit_model,
    frozen,
    loop_config,
    plan_steps,
)

# layer -> (module inside the block, "rows" or "cols" of the (out, in) weight, unit that owns the slice)
TARGETS: dict[str, tuple[str, str, str]] = {
    "q_proj": ("self_attn", "rows", "head"),
    "k_proj": ("self_attn", "rows", "kv_head"),
    "v_proj": ("self_attn", "rows", "kv_head"),
    "o_proj": ("self_attn", "cols", "head"),
    "gate_proj": ("mlp", "rows", "channel"),
    "up_proj": ("mlp", "rows", "channel"),
    "down_proj": ("mlp", "cols", "channel"),
}
SELECT = ("random", "score")
ADAPTER_FORMAT = "sparsefit-s2ft-1"  # the adapter file's metadata "format"
ADAPTER_FILE = "s2ft_adapter.safetensors"
LOSSES = ("ce", "squarehead")


@dataclass
class S2FTConfig(TrainConfig):
    heads: float = 0.052  # share of the model's (block, head) pairs chosen (the reference's o_ratio)
    channels: float = 0.02  # share of the model's (block, FFN channel) pairs chosen (its d_ratio)
    targets: tuple[str, ...] = ("o_proj", "down_proj")
    select: str = "random"  # random (the paper), or score: the heads/channels that pruning removed most from
    loss: str = "ce"  # ce (the paper trains on its task loss, like the LoRA baseline) or squarehead (distillation)

    def validate(self, name: str = "s2ft", n_windows: int | None = None) -> None:
        check(0 <= self.heads <= 1, f"s2ft heads {self.heads} must be a share of the model's heads in [0, 1]")
        check(0 <= self.channels <= 1, f"s2ft channels {self.channels} must be a share of the FFN channels in [0, 1]")
        unknown = [t for t in self.targets if t not in TARGETS]
        listed = ", ".join(unknown) or "none"
        accepted = ", ".join(TARGETS)
        check(not unknown and len(self.targets) > 0, f"s2ft targets {listed} not accepted; use some of {accepted}")
        check(self.select in SELECT, f"s2ft select {self.select!r} is not one of {', '.join(SELECT)}")
        check(self.loss in LOSSES, f"s2ft loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        loop_config(self).validate(name, n_windows)

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


PRESETS: dict[str, S2FTConfig] = {
    # The reference's LLaMA-2 commonsense script: lr 2e-4, linear after 100 warm-up steps, betas (0.9, 0.95),
    # batch 16 x 4 GPUs, 3 epochs; o_proj columns of 5.2 % of the heads, down_proj columns of 2 % of the channels.
    "paper": S2FTConfig(lr=2e-4, batch_size=64, micro_batch=8, epochs=3, beta2=0.95, warmup_steps=100),
    # A CPU budget of a few thousand tokens: many small steps and a far larger rate. Measured on SmolLM2, Wanda
    # 70 %, wiki calibration 16 x 128, 32 steps of 2 windows (wiki ppl at 512 on 4 k tokens; dense 17.5, pruned
    # 792): lr 2e-4 -> 535, 2e-3 -> 239, 1e-2 -> 188, 3e-2 -> 226.
    # (Measured with one head and 3 % of the channels per block; the shares below choose about as many.)
    "cpu": S2FTConfig(lr=1e-2, batch_size=2, epochs=4, heads=0.125, channels=0.03),
}


@dataclass(frozen=True)
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    channels: int


def llama_geometry(model: nn.Module) -> Geometry:
    """Head counts and sizes of a llama-like model; UsageError naming what is missing otherwise."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    blocks = get_adapter(model).get_blocks(model)
    need = [f"{module}.{name}" for name, (module, _, _) in TARGETS.items()]
    for block in blocks:
        missing = [path for path in need if not isinstance(_get(block, path), nn.Linear)]
        if missing:
            raise UsageError(
                f"s2ft supports llama-like blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); this "
                f"{model_type} model has no {', '.join(missing)}"
            )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    first = blocks[0]
    if first.self_attn.o_proj.in_features != heads * head_dim or heads % kv_heads:
        raise UsageError(f"s2ft cannot read the head layout of this {model_type} model "
                         f"({heads} heads x {head_dim}, {kv_heads} key/value heads)")  # fmt: skip
    return Geometry(heads, kv_heads, head_dim, first.mlp.down_proj.in_features)


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def unit_slices(units: list[int], unit: str, geometry: Geometry) -> torch.Tensor:
    """The rows/columns (sorted LongTensor) that the chosen heads or channels own in a matrix of ``unit``."""
    if unit == "channel":
        return torch.tensor(sorted(units), dtype=torch.long)
    if unit == "kv_head":
        units = sorted({h // (geometry.heads // geometry.kv_heads) for h in units})
    index = [h * geometry.head_dim + d for h in sorted(units) for d in range(geometry.head_dim)]
    return torch.tensor(index, dtype=torch.long)


class S2Delta:
    """The trainable dense submatrix of one layer: rows or columns ``index`` of its (out, in) weight."""

    def __init__(self, layer: nn.Linear, index: torch.Tensor, axis: str, keep: torch.Tensor) -> None:
        self.layer, self.axis = layer, axis
        weight = weight_matrix(layer)
        dim = 0 if axis == "rows" else 1
        self.index = index.to(weight.device)
        # The submatrix's keep mask and original values, shaped like the delta: (k, in) rows or (out, k) columns.
        self.keep = keep.to(weight.device).index_select(dim, self.index)
        self.original = weight.index_select(dim, self.index).clone()
        self.delta = nn.Parameter(torch.zeros_like(self.original))
        self.fused = False
        self.handle = layer.register_forward_hook(self._hook)

    def masked(self) -> torch.Tensor:
        # masked_fill, not a product: a negative delta times 0 would be -0.0 (equal, but not the same bits).
        return self.delta.masked_fill(~self.keep, 0)

    def _hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        delta = self.masked().to(x.dtype)
        if self.axis == "cols":
            return out + F.linear(x.index_select(-1, self.index), delta)
        return out.index_add(-1, self.index, F.linear(x, delta))

    @torch.no_grad()
    def fuse(self) -> None:
        """Write the update into the layer's weight and stop adding it in the forward."""
        if self.fused:
            return
        weight = weight_matrix(self.layer)
        dim = 0 if self.axis == "rows" else 1
        weight.index_copy_(dim, self.index, self.original + self.masked().to(weight.dtype))
        self.handle.remove()
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore the layer's exact original weights and add the update in the forward again."""
        if not self.fused:
            return
        weight = weight_matrix(self.layer)
        weight.index_copy_(0 if self.axis == "rows" else 1, self.index, self.original)
        self.handle = self.layer.register_forward_hook(self._hook)
        self.fused = False

    def remove(self) -> None:
        if not self.fused:
            self.handle.remove()

    @property
    def trainable(self) -> int:
        return int(self.keep.sum())


class S2Adapter:
    """Every chosen submatrix of a model; ``fuse``/``unfuse`` all of them together."""

    def __init__(self, deltas: dict[str, S2Delta], selection: list[dict]) -> None:
        self.deltas = deltas
        self.selection = selection

    def parameters(self) -> list[nn.Parameter]:
        return [d.delta for d in self.deltas.values()]

    def fuse(self) -> None:
        for delta in self.deltas.values():
            delta.fuse()

    def unfuse(self) -> None:
        for delta in self.deltas.values():
            delta.unfuse()

    def remove(self) -> None:
        for delta in self.deltas.values():
            delta.remove()

    @property
    def trainable(self) -> int:
        return sum(d.trainable for d in self.deltas.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the adapter file holds: each layer's masked delta and the rows/columns it owns."""
        out: dict[str, torch.Tensor] = {}
        for name, delta in self.deltas.items():
            out[f"{name}.delta"] = delta.masked().detach().cpu().contiguous()
            out[f"{name}.index"] = delta.index.cpu().contiguous()
        return out

    def metadata(self) -> dict[str, str]:
        axes = {name: delta.axis for name, delta in self.deltas.items()}
        return {"format": ADAPTER_FORMAT, "axes": json.dumps(axes), "selection": json.dumps(self.selection)}

    def to_bytes(self) -> bytes:
        """The adapter alone, as a safetensors file: a few MB beside a base of hundreds."""
        from safetensors.torch import save

        return save(self.tensors(), metadata=self.metadata())

    def save(self, path: str | Path) -> None:
        write_file_atomically(path, self.to_bytes())

    @classmethod
    def load(cls, model: nn.Module, path: str | Path) -> S2Adapter:
        """The adapter saved at ``path``, attached (unfused) to ``model``, a base of the same shapes; ``fuse()``
        writes it into the weights, ``unfuse()`` restores them exactly. Another adapter can be loaded once this one
        is unfused and removed: the base is never reloaded."""
        where = str(path)
        meta, tensors = read_adapter_file(path, "s2ft", ADAPTER_FORMAT)
        axes, deltas = json.loads(meta["axes"]), {}
        for name, axis in axes.items():
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise UsageError(f"s2ft adapter {where!r} names layer {name!r}, which this model lacks") from None
            index, values = tensors[f"{name}.index"], tensors[f"{name}.delta"]
            weight = weight_matrix(layer)
            want = (len(index), weight.shape[1]) if axis == "rows" else (weight.shape[0], len(index))
            if tuple(values.shape) != want or int(index.max()) >= weight.shape[0 if axis == "rows" else 1]:
                raise UsageError(f"s2ft adapter {where!r} does not fit layer {name!r} of this model "
                                 f"(delta {tuple(values.shape)}, the layer's slice {want})")  # fmt: skip
            delta = S2Delta(layer, index, axis, weight != 0)
            with torch.no_grad():
                delta.delta.copy_(values.to(delta.delta.dtype))
            deltas[name] = delta
        return cls(deltas, json.loads(meta.get("selection", "[]")))


def _damage(block: nn.Module, teacher_block: nn.Module, path: str, axis: str) -> torch.Tensor:
    """Per row/column of ``path``: squared weight mass pruning removed (dense minus sparse), float32."""
    dense, sparse = weight_matrix(_get(teacher_block, path)), weight_matrix(_get(block, path))
    gap = (dense.float().cpu() - sparse.float().cpu()).square()  # the teacher may sit on another device
    return gap.sum(dim=1 if axis == "rows" else 0)


def _unit_scores(config: S2FTConfig, geometry: Geometry, block: nn.Module, teacher_block: nn.Module):
    """(per-head, per-channel) weight mass that pruning removed from ``block``'s targets."""
    head_score = torch.zeros(geometry.heads)
    channel_score = torch.zeros(geometry.channels)
    for name in config.targets:
        module, axis, unit = TARGETS[name]
        damage = _damage(block, teacher_block, f"{module}.{name}", axis).cpu()
        if unit == "channel":
            channel_score += damage
        elif unit == "head":
            head_score += damage.reshape(geometry.heads, geometry.head_dim).sum(dim=1)
        else:  # a key/value head's damage counts for every query head of its group
            per_kv = damage.reshape(geometry.kv_heads, geometry.head_dim).sum(dim=1)
            head_score += per_kv.repeat_interleave(geometry.heads // geometry.kv_heads)
    return head_score, channel_score


def choose_units(
    config: S2FTConfig, geometry: Geometry, rng: random.Random, blocks: nn.ModuleList,
    teacher_blocks: nn.ModuleList | None,
) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """(heads, channels) chosen in each block, over the whole model: ``int(total * share)`` (block, unit) pairs,
    at random (the reference) or the ones pruning damaged most."""
    n = len(blocks)
    n_heads = int(geometry.heads * n * config.heads)
    n_channels = int(geometry.channels * n * config.channels)
    if config.select == "random" or teacher_blocks is None:
        heads = sorted(rng.sample(range(geometry.heads * n), n_heads))
        channels = sorted(rng.sample(range(geometry.channels * n), n_channels))
    else:
        scores = [_unit_scores(config, geometry, block, teacher) for block, teacher in zip(blocks, teacher_blocks,
                                                                                           strict=True)]  # fmt: skip
        head_scores = torch.cat([h for h, _ in scores])
        channel_scores = torch.cat([c for _, c in scores])
        heads = sorted(torch.argsort(head_scores, descending=True, stable=True)[:n_heads].tolist())
        channels = sorted(torch.argsort(channel_scores, descending=True, stable=True)[:n_channels].tolist())
    return [([h % geometry.heads for h in heads if h // geometry.heads == i],
             [c % geometry.channels for c in channels if c // geometry.channels == i]) for i in range(n)]  # fmt: skip


def attach(model: nn.Module, config: S2FTConfig, seed: int, teacher: nn.Module | None = None) -> S2Adapter:
    """Choose the heads/channels over the whole model and attach their (zero) deltas to ``model``."""
    geometry = llama_geometry(model)
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    teacher_blocks = get_adapter(teacher).get_blocks(teacher) if teacher is not None else None
    chosen = choose_units(config, geometry, random.Random(seed), blocks, teacher_blocks)
    deltas: dict[str, S2Delta] = {}
    selection = []
    for index, (block, (heads, channels)) in enumerate(zip(blocks, chosen, strict=True)):
        selection.append({"block": index, "heads": heads, "channels": channels})
        for name in config.targets:
            module, axis, unit = TARGETS[name]
            units = channels if unit == "channel" else heads
            if not units:
                continue
            layer = _get(block, f"{module}.{name}")
            keep = weight_matrix(layer) != 0
            deltas[f"{adapter.blocks}.{index}.{module}.{name}"] = S2Delta(
                layer, unit_slices(units, unit, geometry), axis, keep
            )
    return S2Adapter(deltas, selection)


class S2FT(ModelMethod):
    name = "s2ft"
    trains = True
    presets = PRESETS
    writes = (ADAPTER_FILE,)

    def normalize(self, options: dict) -> dict:
        return split_names(options, "targets", self.name, "o_proj,down_proj")

    def supports(self, pattern) -> str | None:
        if pattern.slim:
            return "s2ft trains chosen heads/channels under the pruning masks; a structured model has none (use ebft)"
        return None

    def check_model(self, model: nn.Module, config: S2FTConfig) -> str | None:
        try:
            llama_geometry(model)
        except UsageError as exc:
            return str(exc)
        return None

    def fit(self, ctx: RecoveryContext, config: S2FTConfig) -> dict:
        n_windows, seqlen = ctx.calib_ids.shape
        model, teacher = ctx.model, ctx.teacher
        steps = plan_steps(ctx.budget_tokens, n_windows, seqlen, config.batch_size, config.epochs)
        model.to(ctx.device)  # first: the deltas are created beside the weights they belong to
        s2 = attach(model, config, config.seed, teacher if config.select == "score" else None)
        check(s2.deltas != {}, "s2ft chose nothing to train; raise heads or channels")
        if config.loss == "squarehead":
            distill = SquareHeadConfig()

            def loss_fn(ids):
                return squarehead_step_loss(model, teacher, ids, distill)
        else:

            def loss_fn(ids):
                return causal_lm_loss(model, ids)

        if config.loss == "squarehead":
            teacher.to(ctx.device)
        try:
            with frozen(model, teacher), ctx.progress(self.name, steps) as update:
                log = fit_model(model, s2.parameters(), loss_fn, ctx.calib_ids, config, steps=steps, device=ctx.device,
                                progress=update, checkpoint=ctx.fit_checkpoint)  # fmt: skip
            s2.fuse()
        finally:
            s2.remove()
            model.to("cpu")
            teacher.to("cpu")
        return {
            "config": config.to_dict(),
            "selection": s2.selection,
            "fit": log,
            "adapter_params": sum(d.delta.numel() for d in s2.deltas.values()),
            "trainable_params": s2.trainable,
            "fused": True,
            "adapter_file": s2.to_bytes(),  # written beside the fused model (artifacts), or alone (--adapter-only)
        }

    def artifacts(self, report: dict) -> dict[str, bytes]:
        return {ADAPTER_FILE: report["adapter_file"]} if "adapter_file" in report else {}
