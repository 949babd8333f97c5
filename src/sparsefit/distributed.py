"""torch.distributed for every stage: ``torchrun --nproc-per-node N -m sparsefit ...``, data parallel over windows.

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``): NCCL on CUDA, gloo on the CPU. Without torchrun (``WORLD_SIZE`` unset or 1) every function here
is a no-op and sparsefit runs as one process, exactly as before.

The split is the natural one for block-wise methods: every rank holds the current block and a share of the
windows (calibration or test), so activation memory per rank falls with N. Window ``g`` of ``n`` lives on rank
``g % N`` at local position ``g // N`` (:class:`WindowShard`). Statistics are sums and are all-reduced before any
choice is made; training steps follow one process's global batch order, each rank computing the loss of the
windows of the batch it holds, and gradients are all-reduced (sum), so every rank takes the same step.

Every collective has a timeout (``SPARSEFIT_DIST_TIMEOUT`` seconds, default 1800): a rank that dies makes the
others stop with one line (:class:`DistributedError`), not hang. Rank 0 alone writes outputs (:func:`on_main`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from sparsefit.errors import UsageError, first_line

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped, or it timed out. The CLI prints it on one line, exit 1."""


def launched() -> bool:
    """True when torchrun (or a user) asked for more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise UsageError(f"WORLD_SIZE {os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def timeout_s() -> float:
    text = os.environ.get("SPARSEFIT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"SPARSEFIT_DIST_TIMEOUT {text!r} must be a positive number of seconds, such as 1800")
    return value


def init() -> bool:
    """Join the process group torchrun describes (once); True when running distributed."""
    if not launched():
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} without {', '.join(missing)}: start sparsefit "
                         f"with torchrun --nproc-per-node N -m sparsefit ...")  # fmt: skip
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
        # The first collective proves every rank arrived (init alone does not wait for all of them with gloo).
        dist.barrier()
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {os.environ['RANK']}: could not join the {os.environ['WORLD_SIZE']} "
                               f"processes ({first_line(exc, 200)})") from None  # fmt: skip
    return True


def finish() -> None:
    """Leave the process group (at the end of a command)."""
    if active():
        import torch.distributed as dist

        dist.destroy_process_group()


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def _collective(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as exc:  # gloo/NCCL errors, timeouts included (DistBackendError is a RuntimeError)
        raise DistributedError(f"rank {rank()}: {what} failed; another rank stopped or did not answer within "
                               f"{timeout_s():g} s ({first_line(exc, 200)})") from None  # fmt: skip


def _backend_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (flattened into one buffer per dtype: one call each)."""
    if not active() or not tensors:
        return
    import torch.distributed as dist

    device = _backend_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        _collective("all-reduce", lambda flat=flat: dist.all_reduce(flat))
        offset = 0
        for tensor in group:
            n = tensor.numel()
            tensor.copy_(flat[offset : offset + n].view_as(tensor))
            offset += n


def sum_values(*values: float) -> list[float]:
    """Python numbers summed over the ranks (float64)."""
    if not active():
        return [float(v) for v in values]
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_sum(buffer)
    return buffer.tolist()


def barrier(what: str = "barrier") -> None:
    if active():
        import torch.distributed as dist

        _collective(what, dist.barrier)


def broadcast(value: T, what: str = "broadcast") -> T:
    """Rank 0's ``value`` (any picklable object made by sparsefit itself, never read from a file) on every rank."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def all_gather(value: T, what: str = "gathering results") -> list[T]:
    """Every rank's ``value`` (objects made by sparsefit itself), in rank order."""
    if not active():
        return [value]
    import torch.distributed as dist

    values: list = [None] * world_size()
    _collective(what, lambda: dist.all_gather_object(values, value))
    return values


def on_main(fn: Callable[[], T], what: str = "writing") -> T | None:
    """Run ``fn`` on rank 0 alone (writes), then let every rank continue; rank 0's error is raised on every rank."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # told to the other ranks, then raised here as it was
            error = exc
    failure = broadcast(None if error is None else (isinstance(error, UsageError), first_line(error, 200)), what)
    if error is not None:
        raise error
    if failure is not None:
        usage, message = failure
        raise (UsageError(message) if usage else DistributedError(f"rank 0 failed while {what}: {message}"))
    return result


def check_same(settings: object, what: str = "arguments") -> None:
    """One line on every rank when the ranks were started with different ``settings`` (e.g. their argv)."""
    if not active():
        return
    import torch.distributed as dist

    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * world_size()
    _collective(f"comparing {what}", lambda: dist.all_gather_object(digests, digest))
    others = [r for r, d in enumerate(digests) if d != digests[0]]
    if others:
        raise UsageError(f"rank {others[0]} was started with other {what} than rank 0; give every rank the same "
                         f"command line")  # fmt: skip


def check_windows(n: int, what: str = "calibration windows") -> None:
    """Every rank needs at least one window."""
    world = world_size()
    if n < world:
        raise UsageError(f"{n} {what} cannot be shared by {world} processes; give at least {world} "
                         f"(--nsamples) or start fewer processes")  # fmt: skip


@dataclass(frozen=True)
class WindowShard:
    """Which of ``total`` windows this rank holds: global window ``g`` is rank ``g % world``'s, at ``g // world``.

    Strided rather than contiguous, so that any range of windows (a batch, the held-out tail) is spread over the
    ranks as evenly as it can be.
    """

    total: int
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, total: int) -> WindowShard:
        """This process's share of ``total`` windows."""
        check_windows(total)
        return cls(total, rank(), world_size())

    @classmethod
    def of_local(cls, n_local: int) -> WindowShard:
        """The shard a rank holding ``n_local`` windows is part of (the total is summed over the ranks)."""
        if not active():
            return cls(n_local)
        total = int(sum_values(n_local)[0])
        shard = cls(total, rank(), world_size())
        if shard.count(0, total) != n_local:
            raise RuntimeError(f"rank {rank()} holds {n_local} of {total} windows; the strided split gives "
                               f"{shard.count(0, total)}")  # fmt: skip
        return shard

    @classmethod
    def spread(cls, total: int) -> WindowShard:
        """This process's share of ``total`` windows, where a rank may hold none (evaluation)."""
        return cls(total, rank(), world_size())

    @property
    def single(self) -> bool:
        return self.world == 1

    def take(self, windows):
        """This rank's windows of all ``total`` windows (a tensor, dim 0, or a list)."""
        return windows if self.single else windows[self.rank :: self.world]

    def join(self, parts: list[list]) -> list:
        """Every rank's list of per-window results (``all_gather`` of its ``take``) back in global order."""
        return [parts[g % self.world][g // self.world] for g in range(self.total)]

    def count(self, start: int, stop: int) -> int:
        """How many of the global windows ``start .. stop - 1`` this rank holds."""
        first = start + (self.rank - start) % self.world
        return max(0, (stop - first + self.world - 1) // self.world)

    def local(self, index: torch.Tensor) -> torch.Tensor:
        """The local positions of the windows of global ``index`` that this rank holds (in ``index``'s order)."""
        if self.single:
            return index
        return index[index % self.world == self.rank] // self.world

    def local_range(self, start: int, stop: int) -> torch.Tensor:
        """Local positions of this rank's windows among global ``start .. stop - 1``."""
        return self.local(torch.arange(start, stop))
