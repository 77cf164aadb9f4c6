"""Resident memory of this process: current, and the peak over a block of code.

torch's CPU allocations are invisible to tracemalloc, so these read the kernel's own figures
(/proc/self/statm, VmHWM in /proc/self/status). Used by the eval stage per model and by the benchmarks.
"""

from __future__ import annotations

import resource
import threading


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def release_free_memory() -> None:
    """Give freed heap back to the system (glibc ``malloc_trim``) so the next model's resident memory
    is not hidden inside what the previous model left behind."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory above the level at entry: the kernel's high-water mark, reset at entry
    (Linux ``clear_refs``), with 5 ms sampling as a fallback (torch's CPU allocations are invisible to
    tracemalloc). Freed memory is returned to the system first, so models measured one after another
    in a process each show their own weights and activations."""

    def __enter__(self):
        release_free_memory()
        self.base = self.peak = rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        if self.hwm:
            with open("/proc/self/status") as f:
                self.peak = max(self.peak, int(next(x for x in f if x.startswith("VmHWM:")).split()[1]) / 1024)
        self.mb = round(self.peak - self.base, 1)
