"""Structured pruning of SmolLM2: smaller dense models, their perplexity pruned / +EBFT / +LoRA and CPU speed.

For each share S of decoder-block linear weights removed (default 10, 20, 26 and 35 %): ``sparsefit compare
--pattern structured`` (methods none, ebft, lora: the same calibration windows and the same token budget, EBFT
interleaved as its reference runs it). Then, once every comparison is done and in the same process, CPU tokens/s of
the dense model and of every sliced one, measured side by side: ``--repeats`` rounds, each timing every model once
in turn (prefill: one forward of ``--prompt-len`` tokens; decode: ``--new-tokens`` greedy steps with the KV
cache), after one untimed warm-up round; the best round counts. Parameter counts and safetensors file sizes come
from the saved checkpoints. Goal (issue 12): decode >= 1.25x dense at 26 % with EBFT closing at least half of the
log-perplexity gap.

Usage: ``.venv/bin/python bench/structured.py [--method flap|wanda] [--sparsities 0.1,0.2,0.26,0.35]``; writes
``bench/results/structured.json`` and ``.md`` atomically. Run it alone, above all during the speed phase (the log
says "measuring speed" ... "speed done"): other processes change the speeds.
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


def speed_round(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill of ``ids`` (filling the KV cache) and of ``new_tokens`` greedy decode steps with it."""
    with torch.no_grad():
        began = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - began
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        began = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - began


def speeds(models: dict, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Tokens/s of one sequence for every model, side by side: one warm-up round, then ``repeats`` rounds that each
    time every model once in turn; the best round of each model."""
    vocab = int(next(iter(models.values())).config.vocab_size)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
        speed_round(model, ids, new_tokens)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(speed_round(model, ids, new_tokens))
    return {name: {"prefill_tok_s": round(prompt_len / min(t[0] for t in rounds), 1),
                   "decode_tok_s": round(new_tokens / min(t[1] for t in rounds), 2)}
            for name, rounds in times.items()}  # fmt: skip


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
    result = {"model": args.model, "method": args.method, "gqa": args.gqa, "settings": vars(args),
              "dense": {"params": params(dense), "file_mb": file_mb(work / "dense")}, "rows": []}  # fmt: skip
    header = ["S asked", "S achieved", "heads / FFN", "params", "file MB", "ppl wiki: pruned / +EBFT / +LoRA",
              "ppl books: pruned / +EBFT / +LoRA", "EBFT log-gap closed (wiki, books)", "prefill tok/s (x dense)",
              "decode tok/s (x dense)"]  # fmt: skip

    def table() -> list[list]:
        dense_row = result["dense"]
        rows = [["dense", "0", "", f"{dense_row['params']:,}", dense_row["file_mb"], "", "", "",
                 dense_row.get("prefill_tok_s", ""), dense_row.get("decode_tok_s", "")]]  # fmt: skip
        for row in result["rows"]:
            methods = row["ppl"]

            def ppl(corpus: str, methods=methods) -> str:
                return " / ".join(f"{(methods.get(m) or {}).get(corpus, float('nan')):.2f}"
                                  for m in ("none", "ebft", "lora"))  # fmt: skip

            gap = row["gap_closed_log"].get("ebft") or {}
            speed = (f"{row['prefill_tok_s']} ({row['prefill_x']}x)", f"{row['decode_tok_s']} ({row['decode_x']}x)"
                     ) if "decode_x" in row else ("", "")  # fmt: skip
            rows.append([f"{row['sparsity']:.0%}", f"{row['achieved']:.1%}",
                         f"{row['kept']['heads']}/{row['dense_widths']['heads']}, {row['kept']['intermediate']}/"
                         f"{row['dense_widths']['intermediate']}", f"{row['params']:,}", row["file_mb"], ppl("wiki"),
                         ppl("books"), ", ".join(f"{gap.get(c) or float('nan'):.2f}" for c in ("wiki", "books")),
                         *speed])  # fmt: skip
        return rows

    def write() -> None:
        notes = (f"`{args.model}`, structured `{args.method}` (gqa {args.gqa}); calibration wiki {args.nsamples} x "
                 f"{args.seqlen}; EBFT and LoRA at the same budget (compare's default: 4 passes over the windows), "
                 f"EBFT interleaved; perplexity at {args.eval_seqlen} on the first {args.eval_max_tokens} test tokens; "
                 f"speed: one sequence on the CPU ({torch.get_num_threads()} threads), prefill of {args.prompt_len} "
                 f"tokens, {args.new_tokens} greedy decode steps with the KV cache, every model timed in turn in each "
                 f"of {args.repeats} rounds after a warm-up round, the best round. Dense ppl: "
                 f"{result.get('dense_ppl')}. Goal: decode >= 1.25x at 26 % and EBFT closing >= half of the "
                 f"log-perplexity gap.")  # fmt: skip
        write_results(args.name, result, header, table(), notes)

    for sparsity in sparsities:
        out = work / f"cmp-{sparsity:g}"
        cmp = run_compare(args.model, out, prune=args.method, sparsity=sparsity, pattern="structured", gqa=args.gqa,
                          methods="none,ebft,lora", nsamples=args.nsamples, seqlen=args.seqlen,
                          eval_seqlen=args.eval_seqlen, eval_max_tokens=args.eval_max_tokens, keep=True,
                          device="cpu", log=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
        result["dense_ppl"] = cmp["dense"]["ppl"]
        methods = cmp["methods"]
        st = cmp["settings"]["structured"]
        slim = load(str(out / "ebft")).model
        result["rows"].append({
            "sparsity": sparsity, "achieved": st["achieved"], "kept": st["kept"], "dense_widths": st["dense"],
            "params": params(slim), "file_mb": file_mb(out / "ebft"), "compensation": st.get("compensation_note"),
            "ppl": {m: methods[m].get("ppl") for m in methods},
            "gap_closed_log": {m: methods[m].get("gap_closed_log") for m in methods},
            "time_s": {m: methods[m].get("time_s") for m in methods},
        })  # fmt: skip
        del slim
        result["total_s"] = round(time.perf_counter() - began, 1)
        write()

    print("measuring speed", file=sys.stderr, flush=True)
    models = {"dense": dense, **{f"{row['sparsity']:g}": load(str(work / f"cmp-{row['sparsity']:g}" / "ebft")).model
                                 for row in result["rows"]}}  # fmt: skip
    measured = speeds(models, args.prompt_len, args.new_tokens, args.repeats)
    print("speed done", file=sys.stderr, flush=True)
    result["dense"].update(measured["dense"])
    for row in result["rows"]:
        row.update(measured[f"{row['sparsity']:g}"])
        row["prefill_x"] = round(row["prefill_tok_s"] / measured["dense"]["prefill_tok_s"], 3)
        row["decode_x"] = round(row["decode_tok_s"] / measured["dense"]["decode_tok_s"], 3)
    result["total_s"] = round(time.perf_counter() - began, 1)
    write()


if __name__ == "__main__":
    main()
