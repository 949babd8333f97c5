"""The streamed path of the jobs: a local safetensors folder is walked block by block, never loaded whole.

Opening reads only the config and the shards' headers (a meta-device skeleton); the checks here (memory budget,
free disk, sequence length) run before any expensive work; the output folder is written atomically from the
finished blocks, with the source's shard layout, and evaluated from its own shards.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsefit import distributed
from sparsefit.atomic import write_atomically, write_file_atomically
from sparsefit.errors import UsageError, check
from sparsefit.evaluate.perplexity import streamed_perplexity
from sparsefit.models.loading import check_seqlen, check_weights_fit, load_tokenizer
from sparsefit.progress import Bar, silent
from sparsefit.walk.activations import Activations
from sparsefit.walk.blocks import StreamedBlocks, skeleton
from sparsefit.walk.checkpoint import resumable
from sparsefit.walk.device import peak_gpu_mib
from sparsefit.walk.shards import ShardedCheckpoint

GiB = 1024**3
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": GiB, "gb": 1000**3, "gib": GiB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}  # fmt: skip
ACT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Memory one block needs, in multiples of its weights: pruning holds the block and, for methods that read the
# dense block (DSnoT, EBFT windows), its copy; training adds the gradients, AdamW's two moments and the start
# state a fit can go back to (EBFT keeps two), so about 7x.
PRUNE_FACTOR = 2
TRAIN_FACTOR = 7


def parse_size(text: str | int | None) -> int | None:
    """``"24GB"``, ``"512MiB"``, ``"3g"`` or a byte count -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"--max-memory {text!r} is not a size; give e.g. 24GB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def act_dtype(name: str, device: torch.device) -> torch.dtype:
    """The activations' dtype: ``auto`` is float32 on the CPU (bfloat16 is very slow there), bfloat16 on a GPU."""
    if name not in ACT_DTYPES:
        raise UsageError(f"--act-dtype {name!r} is not one of {', '.join(ACT_DTYPES)}")
    return ACT_DTYPES[name] or (torch.float32 if device.type == "cpu" else torch.bfloat16)


@dataclass
class Streamed:
    source: StreamedBlocks
    tokenizer: object
    folder: Path


def open_streamed(
    folder: Path, dtype: torch.dtype, trust_remote_code: bool = False, tokenizer: bool = True
) -> Streamed:
    """The skeleton and block source of ``folder`` (headers checked: every shard present, matching the index, and
    every tensor the config asks for stored with its shape, so that no block fails half-way through the walk)."""
    shards = ShardedCheckpoint(folder)
    model = skeleton(folder, dtype, trust_remote_code)
    check_weights_fit(folder, model, {name: info.shape for name, info in shards.tensors.items()}, complete=True)
    source = StreamedBlocks(model, shards, dtype)
    return Streamed(source, load_tokenizer(folder, trust_remote_code, required=tokenizer), folder)


def check_resources(
    source: StreamedBlocks, out: Path, *, max_memory: int | None, trains: bool, span: int, n_windows: int,
    seqlen: int, dtype: torch.dtype, seqlens: tuple[tuple[str, int], ...] = (),
) -> Activations:
    """Refuse, in one line and before any work, a window beyond the model's positions, a memory budget below one
    block's need, or an output that the disk cannot hold; return the activation store for the budget."""
    for what, value in seqlens:
        check_seqlen(source.model.config, value, what)
    block = max(source.block_bytes(i) for i in range(len(source)))
    need = block * (TRAIN_FACTOR if trains else PRUNE_FACTOR) * max(span, 1)
    hidden = source.model.config.get_text_config().hidden_size
    one_set = n_windows * seqlen * hidden * dtype.itemsize
    budget = None
    if max_memory is not None:
        check(max_memory >= need, f"--max-memory {size_text(max_memory)} is below one block's need "
                                  f"({size_text(need)}); give at least that")  # fmt: skip
        budget = max_memory - need
    # The finished blocks (the checkpoint), a few activation sets, then the output shards: all on this disk.
    disk = 2 * source.output_bytes() + 4 * one_set
    where = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    check(free >= disk, f"the run needs about {size_text(disk)} of free disk in {str(where)!r} "
                        f"(checkpoint, activations, output) and {size_text(free)} is free")  # fmt: skip
    return Activations(dtype, budget)


def save_streamed_run(
    out: Path,
    streamed: Streamed,
    make_run: Callable[[dict], tuple[dict, dict, dict[str, bytes]]],
    *,
    overwrite: bool = False,
    corpora: list = (),
    eval_seqlen: int = 1024,
    eval_max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    activations: Activations | None = None,
    timings: dict | None = None,
    progress: Bar = silent,
) -> Path:
    """Write the run folder atomically: the output shards from the finished blocks (the source's layout and
    index), config, tokenizer; then perplexity on ``corpora`` from those shards; then ``make_run(results)`` gives
    ``(run.json, sparsity.json, extra files)``.

    Under torchrun rank 0 writes the folder (its run.json without the perplexities), every rank evaluates its share
    of the test windows from the written shards, and rank 0 then writes run.json again, atomically, with them.
    A write the file system fails (no space left) is one line, and the finished blocks stay for ``--resume``.
    """
    import time

    from sparsefit.data import test_stream, window_prefix

    source = streamed.source

    def write_model(tmp: Path) -> None:
        source.write_model(tmp)
        source.model.config.save_pretrained(tmp)
        generation = getattr(source.model, "generation_config", None)
        if generation is not None and source.model.can_generate():
            generation.save_pretrained(tmp)
        if streamed.tokenizer is not None:
            streamed.tokenizer.save_pretrained(tmp)

    def evaluate(folder: Path) -> dict:
        results: dict = {}
        if corpora:
            began = time.perf_counter()
            written = StreamedBlocks(source.model, ShardedCheckpoint(folder), source.dtype)
            results["ppl"] = {}
            for corpus in corpora:
                stream = test_stream(streamed.tokenizer, corpus)
                with progress(f"ppl {corpus.name} @ {eval_seqlen}", len(source)) as update:
                    res = streamed_perplexity(written, stream, seqlen=eval_seqlen, max_tokens=eval_max_tokens,
                                              max_windows=corpus.max_windows, device=device, activations=activations,
                                              prefix=window_prefix(streamed.tokenizer),
                                              progress=lambda done, total: update(done=done, total=total))  # fmt: skip
                results["ppl"][corpus.name] = res.to_dict()
            if timings is not None:
                timings["eval_s"] = round(time.perf_counter() - began, 3)
        return results

    def write_records(folder: Path, results: dict, write: Callable[[Path, bytes], object]) -> None:
        run, sparsity, extra = make_run(results)
        peak = peak_gpu_mib()
        if peak is not None:  # every command on CUDA reports its peak GPU memory
            run = {**run, "memory": {**run.get("memory", {}), "peak_gpu_mib": peak}}
        write(folder / "sparsity.json", json.dumps(sparsity, indent=2).encode())
        for name, data in extra.items():
            write(folder / name, data)
        write(folder / "run.json", json.dumps(run, indent=2, default=str).encode())  # last: the folder is complete

    if not distributed.active():

        def writer(tmp: Path) -> None:
            write_model(tmp)
            write_records(tmp, evaluate(tmp), Path.write_bytes)

        with resumable(out):
            return write_atomically(out, writer, overwrite=overwrite)

    def first(tmp: Path) -> None:
        write_model(tmp)
        write_records(tmp, {}, Path.write_bytes)

    with resumable(out):
        distributed.on_main(lambda: write_atomically(out, first, overwrite=overwrite), "writing the run folder")
    results = evaluate(Path(out))
    if results:
        distributed.on_main(lambda: write_records(Path(out), results, write_file_atomically), "writing run.json")
    return Path(out)
