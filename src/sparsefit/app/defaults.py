"""The one home of sparsefit's defaults: the CLI's options, recipes and ``compare`` all read them from here.

Each recovery method's presets live in its own file (``PRESETS``); the preset a method runs with when none
is named is ``auto``: ``cpu`` on a CPU, ``paper`` on a GPU (``RecoveryMethod.preset_for``).
"""

from __future__ import annotations

from dataclasses import replace

from sparsefit.prune.run import PruneConfig
from sparsefit.recover.base import AUTO

# `sparsefit prune` / `recover`: Wanda 50 %, 128 x 512-token windows of the built-in `wiki` corpus.
PRUNE = PruneConfig()
# `compare`: 64 x 128-token windows, so the whole job fits in minutes on 2 cores.
# At the same 8 k tokens, 64 x 128 recovered more than 32 x 256 (bench/quality.py: +9 points of the gap at 70 %).
QUICK = replace(PRUNE, nsamples=64, seqlen=128)
# `sparsefit run` (make run): the same 8 k tokens as 16 x 512-token windows drawn half from `wiki`, half from `books`,
# the two corpora it evaluates on. Calibrated on `wiki` 64 x 128, recovery closed 41 % of the log-perplexity gap on
# wiki and 12 % on books at 1,024 tokens; on the mix, 38 % / 34 %; on the mix in windows of 512, 40 % / 40 % (issue 33).
RUN = replace(PRUNE, calib="wiki+books", nsamples=16, seqlen=512)
RECOVER_METHOD = "ebft"
# ... recovered with EBFT's `quick` preset, one window a step for 3 epochs (42 steps per block): 39 % / 39 % in a
# 5-minute job on 2 cores; 2 epochs give 35 % / 35 % in 4.4 minutes, 4 epochs 40 % / 40 % in about 7 (docs/ebft.md).
RUN_RECOVER = {"method": RECOVER_METHOD, "preset": "quick", "batch_size": 1, "epochs": 3}

PRESET = AUTO  # cpu on a CPU; on a GPU the method's gpu preset, else paper

EVAL_CORPORA = ("wiki", "books")
EVAL_SEQLEN = 1024
RUN_EVAL_MAX_TOKENS = 4096  # `run`: the first 4,096 test tokens of each corpus
COMPARE_EVAL_MAX_TOKENS = 8192

COMPARE_METHODS = ("none", "dsnot", "ebft", "squarehead", "lora", "s2ft")
COMPARE_EPOCHS = 4  # compare's default budget: this many passes over the calibration windows, for every method


# `sparsefit finetune`: one pass over the task's training examples in batches of 8, each at most 256 tokens (over
# the method's preset when none is named; a named preset keeps its own epochs and batch).
FINETUNE_EPOCHS = 1
FINETUNE_BATCH = 8
FINETUNE_MAX_LENGTH = 256
# ... and each method's rate on a task, where it differs from its recovery preset's. Measured on SmolLM2, arithmetic,
# 100 steps of 8 (bench/finetune.py, exact match on 200 test questions; base 0.135): full 3e-5 -> 0.445, 1e-4 ->
# 0.26, 3e-4 -> 0.07; S²FT 3e-4 -> 0.35, 1e-3 -> 0.44, 3e-3 -> 0.435, its recovery rate 1e-2 -> 0.0; LoRA keeps its
# 3e-3 (0.47; 1e-3 -> 0.43). SquareHead takes full fine-tuning's rate, not its recovery table (the reference's rate
# for the student's sparsity x 4), which is 4-10x the rate at which this model's task tuning holds: SparseGPT 50 %
# from the tuned teacher (0.445) 3e-5 -> 0.480, 1.2e-4 (its table) -> 0.460; 70 % 3e-5 -> 0.405, 1e-4 -> 0.385,
# 3.2e-4 (its table) -> 0.210 (cross-entropy at 3e-5: 0.475 / 0.410).
FINETUNE_LR = {"full": 3e-5, "s2ft": 1e-3, "squarehead": 3e-5}
# A whole-model fit (finetune, recover with squarehead / lora / s2ft / full) saves its state for --resume this often,
# and when interrupted between two steps. Full fine-tuning of SmolLM2 saves 1.6 GB (weights and AdamW's moments).
FIT_CHECKPOINT_EVERY_S = 300.0


def calibration(config: PruneConfig) -> dict:
    """The calibration part of a prune config, as recorded in run.json."""
    return {"calib": config.calib, "nsamples": config.nsamples, "seqlen": config.seqlen, "seed": config.seed}

# The model-level guard (app/guard.py): the held-out windows drawn after the calibration windows, and what happens
# when recovery made the model worse on them: fall back to the pruned model (also "warn", or "off").
GUARD = "fallback"
GUARD_TOKENS = 4096  # about 12 s of SmolLM2 forward on 2 cores, per model measured
GUARD_MIN_WINDOWS = 2
GUARD_SEQLEN = EVAL_SEQLEN  # the guard's windows are as long as the evaluation's (within the model's positions)
GUARD_OVERLAP = 32  # a longer guard window sharing this many consecutive tokens with a calibration window is redrawn
GUARD_BATCH_TOKENS = 2048  # tokens per forward of the guard
