"""Structured pruning of SmolLM2: smaller dense models, their perplexity pruned / +EBFT / +LoRA and CPU speed.

For each share S of decoder-block linear weights removed (default 10, 20, 26 and 35 %): ``sparsefit compare
--pattern structured`` (methods none, ebft, lora: the same calibration windows and the same token budget, EBFT
interleaved as its reference runs it), then, in the same process and one after another, CPU tokens/s of the dense
model and of the sliced one: prefill (one forward of ``--prompt-len`` tokens) and decode (``--new-tokens`` greedy
steps with the KV cache), the best of ``--repeats``. Parameter counts and safetensors file sizes come from the
saved checkpoints. Goal (issue 12): decode >= 1.25x dense at 26 % with EBFT closing at least half of the
log-perplexity gap.

Usage: ``.venv/bin/python bench/structured.py [--method flap|wanda] [--sparsities 0.1,0.2,0.26,0.35]``; writes
``bench/results/structured.json`` and ``.md`` atomically. Run it alone: other processes change the speeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402
from sparsefit.app.compare import run_compare  # noqa: E402
from sparsefit.models import load  # noqa: E402


def file_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 1)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def speed(model, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of one sequence: prefill (filling the KV cache) and greedy decode with it; best of ``repeats``
    after one untimed round (warm-up)."""
    model.eval()
    ids = torch.randint(0, int(model.config.vocab_size), (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prefill, decode = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):
            began = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill.append(time.perf_counter() - began)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            began = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode.append(time.perf_counter() - began)
    prefill, decode = prefill[1:], decode[1:]
    return {"prefill_tok_s": round(prompt_len / min(prefill), 1), "decode_tok_s": round(new_tokens / min(decode), 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="flap", choices=["flap", "wanda"])
    parser.add_argument("--gqa", default="queries", choices=["queries", "groups"])
    parser.add_argument("--sparsities", default="0.10,0.20,0.26,0.35")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-max-tokens", type=int, default=16384)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="structured")
    args = parser.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    began = time.perf_counter()
    dense = load(args.model).model
    work = Path(tempfile.mkdtemp(prefix="sparsefit-structured-"))
    dense.save_pretrained(work / "dense")
    dense_speed = speed(dense, args.prompt_len, args.new_tokens, args.repeats)
    result = {"model": args.model, "method": args.method, "gqa": args.gqa, "settings": vars(args),
              "dense": {"params": params(dense), "file_mb": file_mb(work / "dense"), **dense_speed}, "rows": []}
    header = ["S asked", "S achieved", "heads / FFN", "params", "file MB", "ppl wiki: pruned / +EBFT / +LoRA",
              "ppl books: pruned / +EBFT / +LoRA", "EBFT log-gap closed (wiki, books)", "prefill tok/s (x dense)",
              "decode tok/s (x dense)"]  # fmt: skip
    rows = [["dense", "0", "", f"{result['dense']['params']:,}", result["dense"]["file_mb"], "", "", "",
             dense_speed["prefill_tok_s"], dense_speed["decode_tok_s"]]]  # fmt: skip

    def write() -> None:
        notes = (f"`{args.model}`, structured `{args.method}` (gqa {args.gqa}); calibration wiki {args.nsamples} x "
                 f"{args.seqlen}; EBFT and LoRA at the same budget (compare's default: 4 passes over the windows), "
                 f"EBFT interleaved; perplexity at {args.eval_seqlen} on the first {args.eval_max_tokens} test tokens; "
                 f"speed: one sequence on the CPU ({torch.get_num_threads()} threads), prefill of {args.prompt_len} "
                 f"tokens, {args.new_tokens} greedy decode steps with the KV cache, best of {args.repeats}. Dense "
                 f"ppl: {result.get('dense_ppl')}. Goal: decode >= 1.25x at 26 % and EBFT closing >= half of the "
                 f"log-perplexity gap.")  # fmt: skip
        write_results(args.name, result, header, rows, notes)

    for sparsity in sparsities:
        out = work / f"cmp-{sparsity:g}"
        cmp = run_compare(args.model, out, prune=args.method, sparsity=sparsity, pattern="structured", gqa=args.gqa,
                          methods="none,ebft,lora", nsamples=args.nsamples, seqlen=args.seqlen,
                          eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_max_tokens, keep=True,
                          device="cpu", log=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
        result["dense_ppl"] = cmp["dense"]["ppl"]
        methods = cmp["methods"]
        slim = load(str(out / "ebft")).model
        st = cmp["settings"]["structured"]
        row = {"sparsity": sparsity, "achieved": st["achieved"], "kept": st["kept"], "params": params(slim),
               "file_mb": file_mb(out / "ebft"), "compensation": st.get("compensation_note"),
               "ppl": {m: methods[m].get("ppl") for m in methods},
               "gap_closed_log": {m: methods[m].get("gap_closed_log") for m in methods},
               "time_s": {m: methods[m].get("time_s") for m in methods},
               **speed(slim, args.prompt_len, args.new_tokens, args.repeats)}  # fmt: skip
        row["prefill_x"] = round(row["prefill_tok_s"] / dense_speed["prefill_tok_s"], 3)
        row["decode_x"] = round(row["decode_tok_s"] / dense_speed["decode_tok_s"], 3)
        result["rows"].append(row)

        def ppl(corpus: str, methods=methods) -> str:
            return " / ".join(f"{(methods[m].get('ppl') or {}).get(corpus, float('nan')):.2f}"
                              for m in ("none", "ebft", "lora"))  # fmt: skip

        gap = methods["ebft"].get("gap_closed_log") or {}
        rows.append([f"{sparsity:.0%}", f"{st['achieved']:.1%}",
                     f"{st['kept']['heads']}/{st['dense']['heads']}, {st['kept']['intermediate']}/"
                     f"{st['dense']['intermediate']}", f"{row['params']:,}", row["file_mb"], ppl("wiki"), ppl("books"),
                     ", ".join(f"{gap.get(c) or float('nan'):.2f}" for c in ("wiki", "books")),
                     f"{row['prefill_tok_s']} ({row['prefill_x']}x)",
                     f"{row['decode_tok_s']} ({row['decode_x']}x)"])  # fmt: skip
        result["total_s"] = round(time.perf_counter() - began, 1)
        write()


if __name__ == "__main__":
    main()
