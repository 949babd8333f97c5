"""Structured pruning: remove whole attention heads and FFN channels, so every matrix gets smaller.

A channel of the FFN is a row of ``gate_proj`` and ``up_proj`` with the matching column of ``down_proj``; a head
is ``head_dim`` rows of ``q_proj`` with the matching columns of ``o_proj`` (and, when a whole KV group goes, its
rows of ``k_proj``/``v_proj``). Scores come from the inputs of ``o_proj`` and ``down_proj`` on the calibration
windows, as FLAP's code takes them (``CASIA-IVA-Lab/FLAP``, ``lib/prune.py`` at 9bbad71):

* ``flap``: the fluctuation metric "WIFV" (``lib/prune.py:16``): ``fluc_j * sum_i W_ij^2`` per input channel j,
  with ``fluc_j`` the variance of input channel j over the calibration tokens; per FFN channel as it is, per head
  its square summed over the head's ``head_dim`` channels (``lib/prune.py:336-338``). The removed channels are
  compensated by a bias on the output projection: ``b += W[:, removed] @ mean(x)[removed]``
  (``compress``, ``lib/prune.py:217`` and ``:248``).
* ``wanda``: FLAP's "wanda_sp" (``lib/prune.py:463-473``): ``mean_i |W_ij| * ||x_j||_2`` per input channel,
  summed per head; no bias.

Deliberate differences from FLAP, each for a stated reason:

* Same widths in every block (FLAP's default ``AL-AM`` gives every layer its own widths, ``lib/prune.py:368-394``):
  a plain Hugging Face config has one ``intermediate_size`` and one head count, and none of the supported
  architectures' configs takes per-layer widths. The counts follow FLAP's ``UL-UM`` rule (the same share of heads
  and of channels, ``lib/prune.py:339`` and ``:353``), rounded to the counts closest to the asked share of
  block parameters (:func:`plan_widths`); within a block the highest scores are kept, exactly that many (FLAP's
  ``metric >= thresh`` may keep more on ties).
* Sequential walk: each block is scored on the inputs of the already pruned earlier blocks (Wanda's order, the
  one block driver). FLAP's ``prune_flap`` scores every layer on the dense model's activations
  (``lib/prune.py:365``: "Use the original output as input to the next layer") and prunes at the end.
* ``fluc_j`` is the exact unbiased variance over all calibration tokens (float64 sums). FLAP's running update
  (``lib/layerwrapper.py:70-82``) sets it to 0 on the first window, so that window never counts; its
  ``old_baseline_inp`` is an alias of ``baseline_inp`` (updated in place), so each term is ``(x - new mean)^2``;
  and it sums over tokens but divides by windows: about ``seqlen`` times the variance, a constant factor per layer
  that leaves the ranking inside a layer alone (a test transcribes it and checks this).
* Grouped-query attention (FLAP's code is LLaMA-1 with ``head_dim`` 128 hard-coded): ``gqa="queries"`` removes
  the same number of query heads from every KV group (K/V unchanged); ``gqa="groups"`` removes whole KV groups,
  scored by the sum of their query heads' scores.
* The bias is added to any bias the layer already has (FLAP overwrites a zero bias it added itself), and only
  where the architecture's config can hold it (:data:`SUPPORT`); elsewhere FLAP runs without compensation and
  the report says so per block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from sparsefit.distributed import active, all_reduce_sum
from sparsefit.errors import check
from sparsefit.walk.hooks import layer_inputs
from sparsefit.walk.walker import BlockContext, BlockStep

METHODS = ("wanda", "flap")
GQA = ("queries", "groups")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSupport:
    """Where an architecture's config lets FLAP's compensation bias live.

    ``attention_bias``/``mlp_bias``: the config flag that gives ``o_proj``/``down_proj`` a bias, or None when the
    architecture has none. Either flag switches on the bias of every projection of its part (Llama's
    ``attention_bias`` covers q/k/v/o, ``mlp_bias`` gate/up/down): the ones FLAP does not need are set to zero.
    """

    attention_bias: str | None
    mlp_bias: str | None


# Per-layer widths: none of these configs has them (one intermediate_size, one head count for every block).
SUPPORT: dict[str, ArchSupport] = {
    "llama": ArchSupport("attention_bias", "mlp_bias"),
    "mistral": ArchSupport(None, None),  # every projection is bias=False in the modeling code
    "qwen2": ArchSupport(None, None),  # q/k/v always have a bias, o_proj and the MLP never
    "qwen3": ArchSupport("attention_bias", None),
    "gemma3_text": ArchSupport("attention_bias", None),
}


def structured_support(model: nn.Module) -> ArchSupport:
    """The architecture's :class:`ArchSupport`; one-line UsageError for an architecture without structured support."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check(model_type in SUPPORT, f"structured pruning does not support architecture {model_type!r}; supported: "
                                 f"{', '.join(SUPPORT)}")  # fmt: skip
    return SUPPORT[model_type]


@dataclass(frozen=True)
class Widths:
    """The widths of one decoder block (the same in every block)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def attention_params(self) -> int:
        return self.hidden * self.head_dim * 2 * (self.heads + self.kv_heads)

    @property
    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        """Linear weights of one block (biases and norms left out)."""
        return self.attention_params + self.mlp_params


def model_widths(config) -> Widths:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Widths(config.hidden_size, heads, kv, head_dim, config.intermediate_size)


@dataclass(frozen=True)
class WidthPlan:
    dense: Widths
    kept: Widths
    gqa: str
    sparsity: float  # asked: share of the blocks' linear weights to remove
    achieved: float  # what these counts remove

    def to_dict(self) -> dict:
        return {"dense": asdict(self.dense), "kept": asdict(self.kept), "gqa": self.gqa, "sparsity": self.sparsity,
                "achieved": self.achieved}  # fmt: skip


def plan_widths(dense: Widths, sparsity: float, gqa: str = "queries", heads: int | None = None) -> WidthPlan:
    """The kept head and channel counts whose removed share of block weights is closest to ``sparsity``.

    Heads go in units GQA can split evenly (``queries``: one query head from every KV group; ``groups``: one
    whole KV group); the number of units removed is the one closest to ``sparsity`` of them (FLAP's UL-UM: the
    same share of heads as of the whole), or ``heads`` query heads are kept when given. The FFN channels then make
    up the rest of the asked share. UsageError when the result leaves no head or no channel, or when ``heads``
    cannot be split evenly over the KV groups.
    """
    check(gqa in GQA, f"gqa {gqa!r} is not one of {', '.join(GQA)}")
    check(dense.heads % dense.kv_heads == 0,
          f"{dense.heads} query heads cannot be split evenly over {dense.kv_heads} KV heads")  # fmt: skip
    group = dense.heads // dense.kv_heads
    units = group if gqa == "queries" else dense.kv_heads
    per_unit = dense.hidden * dense.head_dim * (2 * dense.kv_heads if gqa == "queries" else 2 * group + 2)
    if heads is None:
        removed = int(sparsity * units + 0.5)
    else:
        step = dense.kv_heads if gqa == "queries" else group
        check(isinstance(heads, int) and 0 < heads <= dense.heads and heads % step == 0,
              f"keep-heads {heads} cannot be split evenly under GQA ({dense.heads} query heads in {dense.kv_heads} KV "
              f"groups, gqa {gqa}): give a multiple of {step} from {step} to {dense.heads}")  # fmt: skip
        removed = units - heads // step
    check(removed < units, f"structured sparsity {sparsity:g} leaves no attention head ({dense.heads} heads in "
                           f"{dense.kv_heads} KV groups); give a smaller --sparsity")  # fmt: skip
    channel = 3 * dense.hidden
    channels = max(0, int((sparsity * dense.params - removed * per_unit) / channel + 0.5))
    check(channels < dense.intermediate, f"structured sparsity {sparsity:g} leaves no FFN channel (of "
                                         f"{dense.intermediate}); give a smaller --sparsity")  # fmt: skip
    if gqa == "queries":
        kept = replace(dense, heads=dense.heads - removed * dense.kv_heads, intermediate=dense.intermediate - channels)
    else:
        kept = replace(dense, heads=dense.heads - removed * group, kv_heads=dense.kv_heads - removed,
                       intermediate=dense.intermediate - channels)  # fmt: skip
    return WidthPlan(dense, kept, gqa, sparsity, 1.0 - kept.params / dense.params)


# ------------------------------------------------------------------------------------------------ scores


class InputStats:
    """Per input channel: token count, sum and sum of squares (float64), for the mean, variance and norm."""

    def __init__(self, width: int) -> None:
        self.tokens = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sumsq = torch.zeros(width, dtype=torch.float64)

    def add(self, inp: torch.Tensor) -> None:
        x = inp.detach().reshape(-1, inp.shape[-1]).double().cpu()
        self.tokens += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.square().sum(0)

    def reduce(self) -> None:
        """Sum over the ranks (under torchrun each holds some of the windows)."""
        if active():
            tokens = torch.tensor([float(self.tokens)], dtype=torch.float64)
            all_reduce_sum(self.sum, self.sumsq, tokens)
            self.tokens = int(tokens.item())

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance over every calibration token: FLAP's ``fluc_inp``, exactly (see the module doc)."""
        return ((self.sumsq - self.sum.square() / self.tokens) / max(self.tokens - 1, 1)).clamp_min(0)


def flap_channel_scores(fluc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """WIFV per input channel of ``weight`` (out, in): ``fluc_j * sum_i W_ij^2`` (FLAP ``lib/prune.py:16``)."""
    return fluc.double() * weight.detach().double().square().sum(0)


def flap_head_scores(fluc: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per head of ``o_proj``: WIFV squared, summed over the head's channels (FLAP ``lib/prune.py:336-338``)."""
    return flap_channel_scores(fluc, weight).square().reshape(-1, head_dim).sum(1)


def wanda_channel_scores(sq_norm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Wanda per input channel, averaged over output rows: ``mean_i |W_ij| * ||x_j||`` (FLAP ``lib/prune.py:463``,
    ``:472``). ``sq_norm`` may be a sum or a mean of squares: a constant factor never changes the choice."""
    return (weight.detach().double().abs() * sq_norm.double().sqrt().reshape(1, -1)).mean(0)


def wanda_head_scores(sq_norm: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Wanda per head: the channel scores summed over the head's channels (FLAP ``lib/prune.py:467``)."""
    return wanda_channel_scores(sq_norm, weight).reshape(-1, head_dim).sum(1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending (ties: the lower index stays)."""
    return torch.argsort(-scores, stable=True)[:k].sort().values


def choose_heads(head_scores: torch.Tensor, dense: Widths, kept: Widths, gqa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads kept, KV heads kept), ascending, so that query head ``h`` still reads KV head ``h // group``."""
    group = dense.heads // dense.kv_heads
    by_group = head_scores.reshape(dense.kv_heads, group)
    if gqa == "queries":
        per_group = kept.heads // dense.kv_heads
        q = torch.cat([g * group + _top(by_group[g], per_group) for g in range(dense.kv_heads)])
        return q, torch.arange(dense.kv_heads)
    kv = _top(by_group.sum(1), kept.kv_heads)
    return (kv.reshape(-1, 1) * group + torch.arange(group)).reshape(-1), kv


def choose_channels(channel_scores: torch.Tensor, keep: int) -> torch.Tensor:
    return _top(channel_scores, keep)


def compensation(weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's bias: the removed input channels' mean contribution, ``W[:, removed] @ mean[removed]``."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    return (weight.detach().double().cpu()[:, removed] @ mean.double()[removed]).to(weight.dtype)


# ------------------------------------------------------------------------------------------------ slicing


def _sliced(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            bias: bool = False, extra_bias: torch.Tensor | None = None) -> nn.Linear:  # fmt: skip
    """A new nn.Linear of the kept ``rows`` (outputs) and ``cols`` (inputs); a bias when the layer has one or
    ``bias`` (zeros), plus ``extra_bias``."""
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    has_bias = layer.bias is not None or bias or extra_bias is not None
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if has_bias:
            value = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            if layer.bias is not None:
                old = layer.bias.detach()
                value += old[rows.to(old.device)] if rows is not None else old
            if extra_bias is not None:
                value += extra_bias.to(value.device, value.dtype)
            new.bias.copy_(value)
    new.requires_grad_(layer.weight.requires_grad)
    return new


def slice_block(block: nn.Module, dense: Widths, q_heads: torch.Tensor, kv_heads: torch.Tensor,
                channels: torch.Tensor, *, attn_bias: torch.Tensor | None = None, mlp_bias: torch.Tensor | None = None,
                attn_biases: bool = False, mlp_biases: bool = False) -> None:  # fmt: skip
    """Replace the block's projections by smaller ones in place: the kept query heads, KV heads and FFN channels.

    ``attn_bias``/``mlp_bias``: added to ``o_proj``/``down_proj``'s bias (FLAP's compensation). ``attn_biases``/
    ``mlp_biases``: every projection of that part gets a bias (zeros where it had none), as the config flag that
    holds the compensation demands.
    """
    attn, mlp = block.self_attn, block.mlp
    d = dense.head_dim

    def rows_of(heads: torch.Tensor) -> torch.Tensor:
        return (heads.reshape(-1, 1) * d + torch.arange(d)).reshape(-1)

    q_rows, kv_rows = rows_of(q_heads), rows_of(kv_heads)
    attn.q_proj = _sliced(attn.q_proj, rows=q_rows, bias=attn_biases)
    attn.k_proj = _sliced(attn.k_proj, rows=kv_rows, bias=attn_biases)
    attn.v_proj = _sliced(attn.v_proj, rows=kv_rows, bias=attn_biases)
    attn.o_proj = _sliced(attn.o_proj, cols=q_rows, bias=attn_biases, extra_bias=attn_bias)
    attn.num_key_value_groups = len(q_heads) // len(kv_heads)  # read by repeat_kv in every attention kernel
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(kv_heads))):
        if hasattr(attn, name):
            setattr(attn, name, value)
    mlp.gate_proj = _sliced(mlp.gate_proj, rows=channels, bias=mlp_biases)
    mlp.up_proj = _sliced(mlp.up_proj, rows=channels, bias=mlp_biases)
    mlp.down_proj = _sliced(mlp.down_proj, cols=channels, bias=mlp_biases, extra_bias=mlp_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def set_config_widths(config, kept: Widths, *, attention_bias: bool = False, mlp_bias: bool = False) -> None:
    """The Hugging Face config of the sliced model: fewer heads, a smaller FFN, ``head_dim`` written explicitly
    (``hidden_size / num_attention_heads`` no longer gives it), and the bias flags that hold FLAP's compensation."""
    config.num_attention_heads = kept.heads
    config.num_key_value_heads = kept.kv_heads
    config.head_dim = kept.head_dim
    config.intermediate_size = kept.intermediate
    support = SUPPORT[config.model_type]
    if attention_bias:
        setattr(config, support.attention_bias, True)
    if mlp_bias:
        setattr(config, support.mlp_bias, True)


def block_linear_params(model: nn.Module) -> int:
    """Linear weights of every decoder block."""
    from sparsefit.walk.masks import model_layers  # one home for "the block layers"

    return sum(layer.weight.numel() for layer in model_layers(model).values())


# ------------------------------------------------------------------------------------------------ the step


@dataclass
class StructuredStep(BlockStep):
    """Score one block's heads and channels on its inputs, slice it to the plan's widths, compensate (FLAP).

    The statistics pass is the dense block on the (pruned model's) inputs: its outputs are the reconstruction
    target that EBFT trains the sliced block towards (``keep_dense_outputs``). ``ctx.masks`` become all-ones
    masks of the sliced layers: every remaining weight trains.
    """

    method: str
    plan: WidthPlan
    support: ArchSupport
    keep_dense_outputs: bool = False

    @property
    def compensates(self) -> tuple[bool, bool]:
        """(attention, mlp): where FLAP's bias goes; wanda_sp never adds one (``lib/prune.py:470``, ``:475``)."""
        flap = self.method == "flap"
        return flap and self.support.attention_bias is not None, flap and self.support.mlp_bias is not None

    def __call__(self, ctx: BlockContext) -> None:
        block, dense, kept = ctx.block, self.plan.dense, self.plan.kept
        layers = {"o": block.self_attn.o_proj, "down": block.mlp.down_proj}
        stats = {name: InputStats(layer.weight.shape[1]) for name, layer in layers.items()}
        with layer_inputs(layers, lambda name, inp: stats[name].add(inp)):
            outputs = ctx.run_all()
        for input_stats in stats.values():
            input_stats.reduce()
        if self.keep_dense_outputs:
            ctx.dense_outputs = outputs
        o_w, down_w = layers["o"].weight.detach().cpu(), layers["down"].weight.detach().cpu()
        if self.method == "flap":
            heads = flap_head_scores(stats["o"].variance, o_w, dense.head_dim)
            channel_scores = flap_channel_scores(stats["down"].variance, down_w)
        else:
            heads = wanda_head_scores(stats["o"].sumsq, o_w, dense.head_dim)
            channel_scores = wanda_channel_scores(stats["down"].sumsq, down_w)
        q_heads, kv_heads = choose_heads(heads, dense, kept, self.plan.gqa)
        channels = choose_channels(channel_scores, kept.intermediate)
        attn_comp, mlp_comp = self.compensates
        q_cols = (q_heads.reshape(-1, 1) * dense.head_dim + torch.arange(dense.head_dim)).reshape(-1)
        attn_bias = compensation(o_w, stats["o"].mean, q_cols) if attn_comp else None
        mlp_bias = compensation(down_w, stats["down"].mean, channels) if mlp_comp else None
        slice_block(block, dense, q_heads, kv_heads, channels, attn_bias=attn_bias, mlp_bias=mlp_bias,
                    attn_biases=attn_comp, mlp_biases=mlp_comp)  # fmt: skip
        from sparsefit.models.adapters import prunable_layers

        ctx.masks = {name: torch.ones_like(layer.weight, dtype=torch.bool)
                     for name, layer in prunable_layers(block).items()}  # fmt: skip
        ctx.report["structured"] = {
            "heads_kept": q_heads.tolist(), "kv_heads_kept": kv_heads.tolist(), "channels_kept": len(channels),
            "compensation": {"attention": attn_comp, "mlp": mlp_comp},
        }  # fmt: skip
        ctx.note(f"kept {len(q_heads)}/{dense.heads} heads, {len(channels)}/{dense.intermediate} channels")


def check_structured(model: nn.Module, method: str, sparsity: float, gqa: str = "queries",
                     heads: int | None = None) -> WidthPlan:  # fmt: skip
    """Every check of a structured prune on ``model``, before any work: the plan it will follow."""
    check(method in METHODS, f"structured pruning takes method {' or '.join(METHODS)}, not {method!r}")
    structured_support(model)
    return plan_widths(model_widths(model.config), sparsity, gqa, heads)


def finish_structured(model: nn.Module, plan: WidthPlan, step: StructuredStep) -> dict:
    """Write the new widths into the model's config and record what was done on the model (``sparsefit_structured``,
    read by the sparsity report). Returns that record."""
    attn_comp, mlp_comp = step.compensates
    set_config_widths(model.config, plan.kept, attention_bias=attn_comp, mlp_bias=mlp_comp)
    record = {
        **plan.to_dict(), "method": step.method,
        "compensation": {"attention": attn_comp, "mlp": mlp_comp},
        "compensation_note": _compensation_note(step),
        "dense_block_params": plan.dense.params * len(_blocks(model)),
        "kept_block_params": block_linear_params(model),
    }  # fmt: skip
    model.sparsefit_structured = record
    return record


def _blocks(model: nn.Module) -> nn.ModuleList:
    from sparsefit.models.adapters import get_adapter

    return get_adapter(model).get_blocks(model)


def _compensation_note(step: StructuredStep) -> str:
    if step.method != "flap":
        return "wanda: no bias (as FLAP's wanda_sp)"
    attn, mlp = step.compensates
    if attn and mlp:
        return "FLAP's bias on o_proj and down_proj (q/k/v and gate/up biases are zero: the config flags cover them)"
    if attn:
        return ("FLAP's bias on o_proj only (q/k/v biases zero); this architecture's MLP cannot hold a bias, so the "
                "FFN channels are removed without compensation")  # fmt: skip
    return "this architecture cannot hold a bias on o_proj or down_proj: FLAP's scores without its compensation"


def attach_structured(model: nn.Module, dense: nn.Module) -> dict:
    """The structured record of a sliced ``model`` loaded from disk, measured against its ``dense`` source."""
    record = dict(getattr(model, "sparsefit_structured", None) or {})
    dense_params, kept_params = block_linear_params(dense), block_linear_params(model)
    record.update(dense_block_params=dense_params, kept_block_params=kept_params,
                  achieved=1.0 - kept_params / dense_params, kept=asdict(model_widths(model.config)),
                  dense=asdict(model_widths(dense.config)))  # fmt: skip
    model.sparsefit_structured = record
    return record


__all__ = [
    "GQA", "METHODS", "SUPPORT", "ArchSupport", "InputStats", "StructuredStep", "WidthPlan", "Widths",
    "attach_structured", "block_linear_params", "check_structured", "choose_channels", "choose_heads",
    "compensation", "finish_structured", "flap_channel_scores", "flap_head_scores", "model_widths", "plan_widths",
    "set_config_widths", "slice_block", "structured_support", "wanda_channel_scores", "wanda_head_scores",
]  # fmt: skip
