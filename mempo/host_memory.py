"""Memory of this process for benchmarks: host RSS and its peak since a reset, and the peak a
step adds (CUDA allocated memory, or host RSS)."""
from __future__ import annotations

import os
import resource
from collections.abc import Callable


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the next peak covers what follows alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak RSS since the last `reset_peak_rss` (VmHWM; elsewhere the process's lifetime peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_peak_bytes(step: Callable[[], object], cuda: bool) -> int:
    """Rise of peak memory over the start while `step()` runs: CUDA allocated memory, or on the
    CPU the peak RSS (VmHWM, reset just before)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = rss_bytes()
    reset_peak_rss()
    step()
    return peak_rss_bytes() - base
