"""What EBFT's `paper` setting means: the official fp16 path clips the *scaled* gradients (issue 9, item 7).

The reference (``lib/finetune.py``) calls ``scaler.scale(loss).backward()`` and then
``clip_grad_norm_(params, 1.0)`` before ``scaler.step`` without ``scaler.unscale_``: the clip sees gradients
multiplied by the loss scale S (GradScaler starts at 2**16 and, in 320 steps, never grows: its growth interval is
2000), so it clips the true gradient at max-norm 1 / S. sparsefit's ``paper`` preset clips the true (float32 or
bf16-autocast) gradient at 1.0. This benchmark runs both on the first blocks of SmolLM2 at Wanda 70 %, interleaved,
with the paper's hyper-parameters (lr 2e-4, batch 8, 10 epochs, weight decay 0.1, betas (0.9, 0.95)) on 32 x 256
calibration windows, in float32 on the CPU (overflow-skipped steps of a real fp16 run are not emulated), and
reports each block's reconstruction-error reduction and how far its weights moved.

    .venv/bin/python bench/ebft_clip.py [--blocks 4]

Writes bench/results/ebft_clip.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from common import write_results  # noqa: E402

LOSS_SCALE = 2.0**16  # torch.cuda.amp.GradScaler's init_scale


def run(loaded, calib, blocks: int, clip: float) -> list[dict]:
    from sparsefit.app.jobs import prune_interleaved
    from sparsefit.prune import PruneConfig
    from sparsefit.recover import get_method

    model = copy.deepcopy(loaded.model)
    del model.model.layers[blocks:]  # the first blocks only: their fits are what the two clips change
    model.config.num_hidden_layers = blocks
    ebft = get_method("ebft")
    config = ebft.configure({"preset": "paper", "clip": clip, "autocast": "none"}, calib.shape[0])
    prune = PruneConfig(sparsity=0.7, nsamples=calib.shape[0], seqlen=calib.shape[1], device="cpu")
    walked = prune_interleaved(model, calib, prune, ebft, config)
    rows = []
    for report in walked["blocks"]:
        fit = report["ebft"]
        rows.append({"block": report["block"], "initial_mse": fit["initial_loss"], "final_mse": fit["final_loss"],
                     "reduction": 1 - fit["final_loss"] / fit["initial_loss"],
                     "relative_move": fit["relative_change"], "steps": fit["steps"],
                     "time_s": fit["time_s"]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sparsefit.data import calibration_windows, get_corpus
    from sparsefit.models import load

    loaded = load(args.model)
    calib = calibration_windows(loaded.tokenizer, get_corpus("wiki"), args.nsamples, args.seqlen, 0)
    began = time.perf_counter()
    variants = {"sparsefit paper: clip 1.0": 1.0, "reference fp16 path: clip 1/2^16": 1.0 / LOSS_SCALE}
    results = {name: run(loaded, calib, args.blocks, clip) for name, clip in variants.items()}
    rows = []
    for name, blocks in results.items():
        for b in blocks:
            rows.append([name, b["block"], b["initial_mse"], b["final_mse"], f"{b['reduction']:.0%}",
                         b["relative_move"], round(b["time_s"], 1)])  # fmt: skip
    first, second = (results[name] for name in variants)
    ratio = [b["relative_move"] / a["relative_move"] for a, b in zip(first, second, strict=True)]
    notes = (
        f"SmolLM2-135M, Wanda 70 % interleaved with EBFT on its first {args.blocks} blocks; calibration `wiki` "
        f"{args.nsamples} x {args.seqlen}; EBFT `paper` (lr 2e-4, batch 8, 10 epochs, wd 0.1, betas (0.9, 0.95)), "
        f"float32, {args.threads} torch thread(s), torch {torch.__version__}; {time.perf_counter() - began:.0f} s in "
        "all. relative move = ||W_after - W_before|| / ||W_before|| of EBFT over the block's linear weights. "
        "The reference's clip of the scaled gradients moves the weights "
        + ", ".join(f"{r:.2f}x" for r in ratio) + " as far as a clip of the true gradients, block by block."
    )
    header = ["variant", "block", "initial MSE", "final MSE", "reduction", "relative move", "time s"]
    write_results("ebft_clip", {"args": vars(args), "results": results, "move_ratio": ratio}, header, rows, notes)


if __name__ == "__main__":
    main()
