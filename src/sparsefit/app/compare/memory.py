"""Peak memory of one recovery method, for ``sparsefit compare``.

On CUDA ``torch.cuda.max_memory_allocated`` during the method minus what was allocated before it; elsewhere a
thread samples this process's resident memory (``VmRSS``) every 10 ms and the peak above the level just before
the method is reported, after ``gc`` and ``malloc_trim`` returned freed memory to the system (so an earlier
method's freed memory is not silently reused by a later one). The model copy a method starts from is made before
that baseline: the number is the method's own working memory.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SAMPLE_S = 0.01


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def release_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed heap memory; give it back so the next baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the ``with`` body above the level at its start, in MiB (``peak_mb``); ``paused()`` excludes
    a part of it (LoRA's unmerged evaluation, which is not the method's own cost)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._peak = 0
        self._base = 0
        self._thread: threading.Thread | None = None

    @staticmethod
    def describe(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the method minus the allocation before it (MiB)"
        if _rss_bytes() is None:
            return "not measured (no /proc/self/status on this system)"
        return ("peak resident memory (VmRSS sampled every 10 ms) above the level just before the method, after gc "
                "and malloc_trim (MiB); the model copy the method starts from is not counted")  # fmt: skip

    def __enter__(self) -> PeakMemory:
        release_memory()
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self._peak = self._base
            return self
        base = _rss_bytes()
        if base is None:
            return self
        self._base = self._peak = base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            if not self._paused.is_set():
                self._peak = max(self._peak, _rss_bytes() or 0)

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            self._peak = max(self._peak, torch.cuda.max_memory_allocated())
        else:
            self._peak = max(self._peak, _rss_bytes() or 0)
            self._paused.set()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._paused.clear()

    def __exit__(self, *exc) -> bool:
        if self.cuda:
            torch.cuda.synchronize()
            self._peak = max(self._peak, torch.cuda.max_memory_allocated())
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
        else:
            return False
        self.peak_mb = round(max(0, self._peak - self._base) / 2**20, 1)
        return False
