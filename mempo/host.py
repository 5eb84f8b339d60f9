"""What a benchmark ran on and what it used: the device's description (the CPU's model, not
just "x86_64": one default run takes 0.7 s a warm-start step on one 2-core host and 1.1 s on
another, and lands on other numbers, benchmarks/RESULTS.md), host RSS and its peak since a
reset, and the peak a step adds (CUDA allocated memory, or host RSS). Imports no torch."""
from __future__ import annotations

import os
import platform
import resource
from collections.abc import Callable

# /proc/cpuinfo flags worth naming: the vector units CPU kernels dispatch to (AMX runs bf16 matmuls)
ISA_FLAGS = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("amx_tile", "AMX"))


def cpu_description(cpuinfo: str | None = None) -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, AVX-512 AVX-512 BF16 AMX': the model name and flags
    from /proc/cpuinfo (`cpuinfo`: its text, for tests), the cores this process may use."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)  # the last CPU's
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("model name") or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = set(fields.get("flags", "").split())
    isa = " ".join(name for flag, name in ISA_FLAGS if flag in flags)
    return f"{model}, {cores} cores" + (f", {isa}" if isa else "")


def describe_device(device: str = "cpu") -> str:
    """The device a benchmark or run measured on: the GPU's name for 'cuda'/'cuda:N' (plus the
    host CPU), else `cpu_description()`."""
    if str(device).startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (host: {cpu_description()})"
    return cpu_description()


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
