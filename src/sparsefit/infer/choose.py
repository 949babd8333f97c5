"""``kernels="auto"``: the sparse layer only where it decodes faster than the dense matmul, measured on this machine.

Layers are grouped by (shape, density to 5 %, values, threads). A group not yet in the table is timed once at
batch 1 (decoding), sparse against dense, one pass over its layers (up to 96 MiB of dense weights) at a time, with
the caches flushed before each pass: in decoding every weight comes from memory once per token, and a layer timed
again and again from the cache would flatter whichever path reads more bytes. The ratio sparse / dense is cached
in ``$SPARSEFIT_HOME/kernels/choices.json`` under this CPU's name and the kernel's instruction set, and the
sparse layer is used where it is below 1.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sparsefit.atomic import home, write_file_atomically
from sparsefit.infer import kernel as compiled
from sparsefit.infer import layout

MEASURE_BYTES = 96 << 20  # dense bytes of a group's layers one timed pass goes through, at most
FLUSH_BYTES = 128 << 20  # read before each pass: more than a last-level cache
REPEATS = 5


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_path() -> Path:
    return home() / "kernels" / "choices.json"


def read_table() -> dict[str, float]:
    try:
        data = json.loads(table_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)} if isinstance(data, dict) else {}


def shape_density(layer: nn.Module) -> tuple[int, int, float]:
    """``(out, in, share of weights kept)`` of a dense block linear or a :class:`SparseLinear`."""
    from sparsefit.infer.sparse_linear import SparseLinear
    from sparsefit.models.adapters import weight_matrix

    if isinstance(layer, SparseLinear):
        kept = layer.values.numel() - layout.PAD
        return layer.out_features, layer.in_features, kept / (layer.out_features * layer.in_features)
    weight = weight_matrix(layer)
    return weight.shape[0], weight.shape[1], float((weight != 0).float().mean())


def group_key(out: int, inp: int, density: float, values: str, threads: int) -> str:
    lib = compiled.kernel()
    isa = lib.isa_name if lib else "none"
    return f"{_cpu_name()}|{isa}|threads={threads}|{values}|{out}x{inp}|density={round(density * 20) / 20:.2f}"


@torch.no_grad()
def measure(layers: list[nn.Module], values: str, threads: int) -> float:
    """Seconds of the sparse layers over seconds of the dense matmuls, one token each, through the group."""
    from sparsefit.infer.sparse_linear import SparseLinear
    from sparsefit.models.adapters import weight_matrix

    pairs = []
    budget = MEASURE_BYTES
    for layer in layers:
        if isinstance(layer, SparseLinear):
            sparse, dense = layer, layer.dense_weight()
        else:
            dense = weight_matrix(layer).detach().float()
            sparse = SparseLinear.from_weight(dense, None, values)
        pairs.append((sparse, dense.contiguous()))
        budget -= dense.numel() * 4
        if budget <= 0:
            break
    x = torch.randn(1, pairs[0][1].shape[1])
    flush = torch.ones(FLUSH_BYTES // 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def best(run: Callable[[SparseLinear, torch.Tensor], torch.Tensor]) -> float:
            times = []
            for _ in range(REPEATS + 1):  # the first pass warms up
                flush.add_(1.0)  # evicts the group's weights: they come from memory, as in decoding
                began = time.perf_counter()
                for sparse, dense in pairs:
                    run(sparse, dense)
                times.append(time.perf_counter() - began)
            return min(times[1:])

        dense_s = best(lambda sparse, dense: nn.functional.linear(x, dense))
        sparse_s = best(lambda sparse, dense: sparse(x))
    finally:
        torch.set_num_threads(before)
    return sparse_s / dense_s


def choose_sparse(layers: dict[str, nn.Module], values: str, threads: int, table: dict[str, float] | None = None,
                  timer: Callable[[list[nn.Module], str, int], float] = measure) -> dict[str, bool]:  # fmt: skip
    """``{name: use the sparse layer}``: True where the table (or a new measurement) says sparse is faster."""
    cached = read_table() if table is None else table
    groups: dict[str, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(group_key(*shape_density(layer), values, threads), []).append(name)
    measured = {}
    for key, names in groups.items():
        if key not in cached:
            measured[key] = timer([layers[name] for name in names], values, threads)
    if measured and table is None:
        write_file_atomically(table_path(), json.dumps({**read_table(), **measured}, indent=1, sort_keys=True))
    ratios = {**cached, **measured}
    return {name: ratios[key] < 1.0 for key, names in groups.items() for name in names}
