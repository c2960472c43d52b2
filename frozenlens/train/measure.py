"""Peak memory and wall time of a block of work, on CPU or GPU."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so growth shows in the RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Measure:
    """Context manager: wall time and peak memory added by the enclosed work.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` above the start; on
    CPU a thread samples the resident set size every few milliseconds and the
    peak above the start is reported (``peak_mb``). ``cpu_seconds`` is the CPU time of
    the whole process (all threads, user + system): unlike wall time it barely moves
    when other programs share the machine, so benchmarks on shared CPUs compare it too.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._peak = 0
        self._start_bytes = 0

    def __enter__(self) -> "Measure":
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self._start_bytes = self._peak = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss_bytes())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, current_rss_bytes())
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._cpu0
        self.peak_mb = max(peak - self._start_bytes, 0) / 2**20
