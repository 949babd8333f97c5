"""The compiled sparse linear kernel (``csrc/sparse_gemm.c``): built at first use, loaded with ctypes.

A plain C file compiled by the system's C compiler in about a second, not a torch ``cpp_extension``: it needs no
torch headers and no ninja, so it builds where torch's wheels do not ship them, and a failed build costs nothing.
It links OpenMP when the compiler has it; under torch (whose wheels load ``libgomp.so.1`` first) the loader hands
it torch's own runtime, so the kernel's threads are torch's. The library is cached under
``$SPARSEFIT_HOME/kernels/<hash of the source, compiler and flags>``; where no compiler is present,
:func:`problem` says why and callers fall back to dense.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

from sparsefit.atomic import home
from sparsefit.export.masks import pack_bits
from sparsefit.infer.layout import VALUE_KINDS, row_starts, stored_values

SOURCE = Path(__file__).with_name("csrc") / "sparse_gemm.c"
_FLAGS = (["-O3", "-fPIC", "-shared", "-std=c99"], ["-fopenmp"])  # base flags, then OpenMP when the compiler has it


class Kernel:
    """The loaded library and what it was built with."""

    def __init__(self, path: Path, threaded: bool) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.sf_isa.restype = ctypes.c_int
        self.lib.sf_sparse_linear.restype = None
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.sf_sparse_linear.argtypes = [p, p, c_int, p, p, p, p, p, i64, i64, i64, c_int, c_int]
        self.lib.sf_unpack.restype = None
        self.lib.sf_unpack.argtypes = [p, p, c_int, p, p, p, i64, i64, c_int, c_int]
        self.isa = int(self.lib.sf_isa())  # lowered by _verified_isa when a vector path disagrees with the scalar one
        self.threaded = threaded
        self.path = path
        self.warning: str | None = None

    @property
    def isa_name(self) -> str:
        return ISA_NAMES.get(self.isa, "portable")


ISA_NAMES = {3: "avx512", 2: "avx2", 0: "portable"}


def _verified_isa(lib: Kernel) -> tuple[int, str | None]:
    """The best instruction-set path that agrees with the scalar one on random layers of every value type.

    Never put a result at risk: a vector path that this CPU or compiler gets wrong (a path the project's own
    machines cannot run, AVX-512 among them) is dropped for the next one down, with a warning.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 208, generator=generator)
    weight[torch.rand(weight.shape, generator=generator) < 0.6] = 0
    x = torch.randn(5, 208, generator=generator)
    bias = torch.randn(37, generator=generator)
    bitmask = pack_bits(weight != 0)
    row_start = row_starts(bitmask, weight.shape[1])
    layers = [(*stored_values(weight[weight != 0], row_start, kind), kind) for kind in VALUE_KINDS]
    for isa in [i for i in sorted(ISA_NAMES, reverse=True) if 0 < i <= lib.isa]:
        agree = True
        for values, scales, _kind in layers:
            for rows in (1, 5):
                args = (x[:rows], bitmask, values, row_start, scales, bias, 37)
                want = _call(lib, *args, threads=1, isa=0)
                got = _call(lib, *args, threads=1, isa=isa)
                agree &= bool(((got - want).abs().max() <= 1e-5 * want.abs().max()).item())
        if agree:
            return isa, None if isa == lib.isa else f"the {ISA_NAMES[lib.isa]} sparse kernel disagreed with the " \
                f"scalar one on this CPU; using {ISA_NAMES[isa]}"
    return 0, "no vector sparse kernel agreed with the scalar one on this CPU; using the slow portable one"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str, flags: list[str], target: Path) -> tuple[bool, str]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            return False, (done.stderr.strip().splitlines() or [f"{compiler} exit {done.returncode}"])[-1]
        os.replace(out, target)  # atomic: a racing build of the same key writes the same file
    return True, ""


@cache
def _load() -> tuple[Kernel | None, str | None]:
    if os.environ.get("SPARSEFIT_NO_KERNEL"):
        return None, "SPARSEFIT_NO_KERNEL is set"
    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"the sparse kernel is built for Linux and macOS, not {sys.platform}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang) on PATH to build the sparse kernel"
    source = SOURCE.read_bytes()
    errors = []
    for threaded in (True, False):
        flags = _FLAGS[0] + (_FLAGS[1] if threaded else [])
        key = hashlib.sha256(source + compiler.encode() + " ".join(flags).encode()).hexdigest()[:16]
        target = home() / "kernels" / f"sparse_gemm-{key}.so"
        if not target.exists():
            ok, error = _build(compiler, flags, target)
            if not ok:
                errors.append(error)
                continue
        try:
            lib = Kernel(target, threaded)
        except OSError as error:
            errors.append(str(error))
            continue
        lib.isa, lib.warning = _verified_isa(lib)
        return lib, None
    return None, f"the sparse kernel did not build with {compiler}: {errors[-1]}"


def kernel() -> Kernel | None:
    return _load()[0]


def problem() -> str | None:
    """Why the sparse kernel cannot run here, or None when it can."""
    return _load()[1]


def sparse_linear(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, row_start: torch.Tensor,
                  scales: torch.Tensor | None, bias: torch.Tensor | None, out_features: int,
                  threads: int | None = None, isa: int | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ W.T + bias`` for x ``[..., in]`` float32 with W as (bitmask, packed values, row starts).

    ``values`` is float32, bfloat16 or int8 (with per-row float32 ``scales``), and carries :data:`PAD` entries past
    its last kept value. ``isa`` forces a lower path than the verified best (tests): 2 AVX2, 0 the scalar one.
    """
    lib = kernel()
    if lib is None:
        raise RuntimeError(problem())
    return _call(lib, x, mask, values, row_start, scales, bias, out_features, threads,
                 lib.isa if isa is None else min(isa, lib.isa))  # fmt: skip


def unpack(mask: torch.Tensor, values: torch.Tensor, row_start: torch.Tensor, scales: torch.Tensor | None,
           shape: tuple[int, int], threads: int | None = None, isa: int | None = None) -> torch.Tensor:  # fmt: skip
    """The weight as a dense float32 ``[out, in]`` matrix (bf16 and int8 values dequantized)."""
    lib = kernel()
    if lib is None:
        raise RuntimeError(problem())
    dense = torch.empty(shape, dtype=torch.float32)
    lib.lib.sf_unpack(
        mask.data_ptr(), values.data_ptr(), KINDS[values.dtype], row_start.data_ptr(),
        scales.data_ptr() if scales is not None else None, dense.data_ptr(), shape[0], shape[1],
        lib.isa if isa is None else min(isa, lib.isa), threads if threads is not None else torch.get_num_threads(),
    )  # fmt: skip
    return dense


KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # the kernel's value kinds by dtype


def _call(lib: Kernel, x, mask, values, row_start, scales, bias, out_features, threads, isa) -> torch.Tensor:
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features).contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=torch.float32)
    kind = KINDS[values.dtype]
    lib.lib.sf_sparse_linear(
        mask.data_ptr(), values.data_ptr(), kind, row_start.data_ptr(),
        scales.data_ptr() if scales is not None else None, x2.data_ptr(),
        bias.data_ptr() if bias is not None else None, y.data_ptr(),
        out_features, in_features, x2.shape[0], isa, threads if threads is not None else torch.get_num_threads(),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)
