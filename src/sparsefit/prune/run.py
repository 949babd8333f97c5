"""Prune a whole model block by block: the pruning settings and the walk through the one block driver."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsefit.distributed import check_windows
from sparsefit.errors import check
from sparsefit.models.adapters import weight_matrix
from sparsefit.progress import Bar, silent
from sparsefit.prune.owl import DEFAULT_M, check_block_sparsities, collect_outlier_ratios, owl_sparsities
from sparsefit.prune.pattern import parse_pattern
from sparsefit.prune.registry import PRUNERS
from sparsefit.prune.step import PruneStep
from sparsefit.prune.structured import (
    GQA,
    StructuredStep,
    WidthPlan,
    check_structured,
    finish_structured,
    structured_support,
)
from sparsefit.prune.structured import METHODS as STRUCTURED_METHODS
from sparsefit.walk.activations import Activations
from sparsefit.walk.blocks import InMemoryBlocks
from sparsefit.walk.checkpoint import BlockCheckpoint
from sparsefit.walk.device import resolve_device
from sparsefit.walk.driver import run_blocks
from sparsefit.walk.masks import model_layers
from sparsefit.walk.walker import Step

DEFAULT_SPARSITY = 0.5


@dataclass
class PruneConfig:
    """What to prune and on which calibration windows; the defaults are the CLI's (``sparsefit prune --help``)."""

    method: str = "wanda"
    # None: an N:M pattern's own share (2:4 removes 0.5, 1:4 0.75), else DEFAULT_SPARSITY; set in __post_init__.
    sparsity: float | None = None
    pattern: str = "unstructured"
    calib: str = "wiki"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    sparsegpt_update: bool = True  # False: SparseGPT masks only (what the EBFT release does)
    # OWL (Yin et al. 2023): per-block sparsities spread over 2λ by each block's outlier ratio, averaging to
    # ``sparsity``. None or 0: uniform (plain pruning). Typical λ 0.08 with M 5 (the reference's README).
    owl_lambda: float | None = None
    owl_m: float = DEFAULT_M
    # Structured pattern only: how heads go under grouped-query attention ("queries": the same number of query
    # heads from every KV group; "groups": whole KV groups), and an explicit number of query heads to keep.
    gqa: str = "queries"
    keep_heads: int | None = None

    def __post_init__(self) -> None:
        if self.sparsity is None:
            self.sparsity = parse_pattern(self.pattern).sparsity or DEFAULT_SPARSITY

    @property
    def slim(self) -> bool:
        """True for the structured pattern (heads and channels removed, the model gets smaller)."""
        return parse_pattern(self.pattern).slim

    @property
    def owl(self) -> bool:
        """True when OWL assigns each block its own sparsity."""
        return bool(self.owl_lambda)

    def validate(self) -> None:
        pattern = parse_pattern(self.pattern)
        if pattern.slim:
            check(self.method in STRUCTURED_METHODS, f"--pattern structured takes method "
                                                     f"{' or '.join(STRUCTURED_METHODS)}, not {self.method!r}")
        else:
            check(self.method in PRUNERS, f"unknown method {self.method!r}; choose one of {', '.join(PRUNERS)}")
            check(self.gqa == "queries" and self.keep_heads is None,
                  "--gqa and --keep-heads go with --pattern structured")  # fmt: skip
        check(self.gqa in GQA, f"gqa {self.gqa!r} is not one of {', '.join(GQA)}")
        if pattern.structured:  # N:M: the pattern decides how many weights go; a sparsity that disagrees is refused
            check(math.isclose(self.sparsity, pattern.sparsity), f"sparsity {self.sparsity} does not go with "
                  f"pattern {self.pattern}, which removes {pattern.sparsity:g} of the weights; leave the sparsity out")
        else:
            check(0.0 < self.sparsity < 1.0, f"sparsity {self.sparsity} is outside (0, 1); give a fraction such as "
                                             f"0.5 (0 removes nothing)")  # fmt: skip
        check(self.nsamples > 0, f"nsamples {self.nsamples} must be a positive number of windows")
        check_windows(self.nsamples)  # under torchrun: every rank needs a window
        check(self.seqlen > 0, f"seqlen {self.seqlen} must be a positive number of tokens")
        check(self.batch_size > 0, f"batch size {self.batch_size} must be positive")
        resolve_device(self.device)
        self._validate_owl()

    def _validate_owl(self) -> None:
        lam, m = self.owl_lambda, self.owl_m
        check(
            lam is None or (_is_number(lam) and lam >= 0),
            f"OWL lambda {lam!r} must be a number >= 0 such as 0.08 (0 or none: uniform sparsity)",
        )
        check(_is_number(m) and m > 0, f"OWL M {m!r} must be a positive number such as {DEFAULT_M:g}")
        if not self.owl:
            check(m == DEFAULT_M, f"OWL M {m:g} has no effect without an OWL lambda > 0; give --owl-lambda too")
            return
        # The reference's wanda_owl_structure gives each block its own N instead; we refuse (see prune/owl.py).
        check(
            not parse_pattern(self.pattern).structured and not self.slim,
            f"OWL gives each block its own unstructured sparsity and does not combine with pattern {self.pattern}; "
            f"use --pattern unstructured or drop --owl-lambda",
        )
        # The paper's range [S - λ, S + λ] must fit; the exact per-block values are checked after the pre-pass.
        check(
            0.0 <= self.sparsity - lam and self.sparsity + lam < 1.0,
            f"OWL lambda {lam:g} takes sparsity {self.sparsity:g} outside [0, 1) (block sparsities reach at least "
            f"S ± λ); use a smaller --owl-lambda",
        )

    def pruner_options(self) -> dict:
        return {"update_weights": self.sparsegpt_update} if self.method == "sparsegpt" else {}

    def label(self) -> str:
        owl = f" owl λ={self.owl_lambda:g}" if self.owl else ""
        if self.slim:
            return f"{self.method} structured {self.sparsity:g}"
        return f"{self.method} {self.sparsity if self.pattern == 'unstructured' else self.pattern}{owl}"

    def check_model(self, model: nn.Module) -> WidthPlan | None:
        """Every check that needs the model, before any work; the structured plan (None for other patterns)."""
        check_pattern_fits(model, self.pattern)
        if self.slim:
            return check_structured(model, self.method, self.sparsity, self.gqa, self.keep_heads)
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_pattern_fits(model: nn.Module, pattern_text: str) -> None:
    """Fail before any work when M does not divide some layer's input width."""
    pattern = parse_pattern(pattern_text)
    for layer in model_layers(model).values():
        pattern.validate_width(weight_matrix(layer).shape[1])


def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    config: PruneConfig,
    *,
    steps_before: Sequence[Step] = (),
    recover_steps: Sequence[Step] = (),
    keep_dense_outputs: bool | None = None,
    checkpoint: BlockCheckpoint | None = None,
    resume: bool = False,
    progress: Bar = silent,
    source: InMemoryBlocks | None = None,
    activations: Activations | None = None,
) -> dict:
    """Prune ``model`` in place with ``config`` on calibration windows ``calib_ids`` (N, L).

    ``steps_before`` run on each block before it is pruned (the teacher step: dense-path targets, a copy
    of the dense block); ``recover_steps`` right after (interleaved recovery, the EBFT order). The prune
    step keeps the dense outputs as targets when ``keep_dense_outputs`` (default: when there are recover
    steps). Returns the driver's result: per-block reports and timings; with OWL also ``"owl"``: the outlier
    ratios and the sparsities of every block (which the block reports carry too). ``source`` and ``activations``:
    where the blocks and the activation sets live (:func:`sparsefit.walk.run_blocks`).
    """
    config.validate()
    plan = config.check_model(model)
    device = resolve_device(config.device)
    if plan is not None:
        check(not resume, "--resume does not continue a structured prune (the saved blocks are smaller than the "
                          "model's); run it again")  # fmt: skip
        return _prune_structured(model, calib_ids, config, plan, steps_before, recover_steps, keep_dense_outputs,
                                 checkpoint, device, progress)  # fmt: skip
    sparsity: float | list[float] = config.sparsity
    owl_steps: list[Step] = []
    owl = None
    if config.owl:
        # OWL's pre-pass: a walk over the still dense model (before any checkpoint restores pruned blocks).
        began = time.perf_counter()
        ratios = collect_outlier_ratios(model, calib_ids, config.owl_m, device=device,
                                        batch_size=config.batch_size, progress=progress, source=source,
                                        activations=activations)  # fmt: skip
        sparsity = owl_sparsities(ratios, config.sparsity, config.owl_lambda)
        check_block_sparsities(sparsity, config.owl_lambda)
        owl = {
            "lambda": config.owl_lambda, "m": config.owl_m, "outlier_ratios": ratios, "sparsities": sparsity,
            "mean_sparsity": sum(sparsity) / len(sparsity), "prepass_s": round(time.perf_counter() - began, 3),
        }  # fmt: skip

        def record_ratio(ctx) -> None:
            ctx.report["outlier_ratio"] = ratios[ctx.index]

        owl_steps = [record_ratio]
    step = PruneStep(
        config.method,
        sparsity,
        parse_pattern(config.pattern),
        options=config.pruner_options(),
        keep_dense_outputs=bool(recover_steps) if keep_dense_outputs is None else keep_dense_outputs,
    )
    walked = run_blocks(
        model, calib_ids, [*owl_steps, *steps_before, step, *recover_steps], device=device,
        batch_size=config.batch_size, checkpoint=checkpoint, resume=resume, progress=progress, label=config.label(),
        source=source, activations=activations,
    )  # fmt: skip
    if owl is not None:
        walked["owl"] = owl
    return walked


def _prune_structured(model, calib_ids, config, plan, steps_before, recover_steps, keep_dense_outputs, checkpoint,
                      device, progress) -> dict:  # fmt: skip
    """The structured walk: each block scored on its (already pruned) inputs, sliced, then recovered."""
    step = StructuredStep(config.method, plan, structured_support(model),
                          keep_dense_outputs=bool(recover_steps) if keep_dense_outputs is None else keep_dense_outputs)
    walked = run_blocks(
        model, calib_ids, [*steps_before, step, *recover_steps], device=device, batch_size=config.batch_size,
        checkpoint=checkpoint, resume=False, progress=progress, label=config.label(),
    )  # fmt: skip
    walked["structured"] = finish_structured(model, plan, step)
    return walked


__all__ = ["PruneConfig", "check_pattern_fits", "prune_model"]
