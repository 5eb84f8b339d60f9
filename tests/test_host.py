"""mempo.host: the device description every benchmark header and the trainer's log print, and
this process's memory readings."""
import os
import platform

import pytest

from mempo.host import cpu_description, describe_device, peak_rss_bytes, reset_peak_rss

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


def test_cpu_description_names_the_model_cores_and_vector_units(monkeypatch):
    # the cores this process may use (taskset, cgroups), not the machine's count
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    assert cpu_description(CPUINFO) == "Intel(R) Xeon(R) Processor, 3 cores, AVX-512 AVX-512 BF16 AMX"
    epyc = "model name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert cpu_description(epyc) == "AMD EPYC 9R14 96-Core Processor, 3 cores, AVX-512 AVX-512 BF16"
    # no /proc/cpuinfo (macOS) or no model line: what platform knows, never an empty name
    assert cpu_description("") == f"{platform.processor() or platform.machine()}, 3 cores"


@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="Linux /proc/cpuinfo")
def test_describe_device_reads_this_host():
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    text = describe_device("cpu")
    assert text == cpu_description()
    if model:
        assert text.startswith(f"{model}, {len(os.sched_getaffinity(0))} cores")


def test_peak_rss_follows_an_allocation():
    reset_peak_rss()
    before = peak_rss_bytes()
    block = bytearray(64 << 20)  # 64 MiB, touched
    block[::4096] = b"x" * len(block[::4096])
    assert peak_rss_bytes() >= before + (48 << 20)
    del block
