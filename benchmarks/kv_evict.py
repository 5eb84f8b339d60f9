"""KV-cache eviction: mempo._C's in-place compaction (CUDA kernel / C++) vs the PyTorch
PyTorch gather-and-copy a user would write (mempo.ops.kv_evict's own fallback, `_evict_torch`), on
one cache of every layer.

    python benchmarks/kv_evict.py                       # CPU: 8 layers, batch 4, 2k tokens, < 30 s
    python benchmarks/kv_evict.py --device cuda         # 28 layers, 4 KV heads, 128 dim, 8k tokens, batch 16, bf16

What is evicted, per sequence (MemPO's fold of old turns into memory): the prompt
[0, T/16) stays in place, the next half of the cache is dropped, the rest [9T/16, T) moves
left. So half the cache is evicted and 7/16 of it is moved; GB/s counts the bytes the move
must read and write (2 x 7/16 x cache size), and on CUDA the fraction of --peak-gbs.
Times are medians over repeats after warm-up (the same eviction re-run on the same buffer:
the bytes moved are the same each time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mempo._native import native_error, native_ops
from mempo.host import describe_device
from mempo.ops.kv_evict import _evict_torch as evict_gather  # the fallback: index gather + copy back
from mempo.ops.kv_evict import evict_segments

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, default=None, help="default 28 on cuda, 8 on cpu")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=None, help="T_max; default 8192 on cuda, 2048 on cpu")
    p.add_argument("--batch", type=int, default=None, help="default 16 on cuda, 4 on cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-gbs", type=float, default=3000.0, help="memory bandwidth to compare with (H100: ~3000)")
    p.add_argument("--json", default=None, help="also write the numbers to this path")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.layers = args.layers or (28 if cuda else 8)
    args.tokens = args.tokens or (8192 if cuda else 2048)
    args.batch = args.batch or (16 if cuda else 4)
    return args


def median_seconds(fn, device: str, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = native_ops()
    if native is None:
        raise SystemExit(f"mempo._C unavailable ({native_error()}): pip install --no-build-isolation -e .")
    if args.device == "cuda" and not native.has_cuda:
        raise SystemExit("mempo._C was built without CUDA (needs a CUDA build of torch and nvcc)")
    dtype, t = DTYPES[args.dtype], args.tokens
    shape = (2 * args.layers, args.batch, args.kv_heads, t, args.head_dim)
    cache = torch.empty(shape, dtype=dtype, device=args.device).normal_()
    keep = torch.tensor([[0, t // 16], [t // 16 + t // 2, t]], device=args.device)
    keep_ranges = keep.expand(args.batch, 2, 2).contiguous()
    moved_bytes = cache.numel() * cache.element_size() * (t - t // 16 - t // 2) / t

    methods = {"mempo._C": lambda: evict_segments(cache, keep_ranges),
               "torch gather+copy": lambda: evict_gather(cache, keep_ranges)}
    rows = []
    for name, fn in methods.items():
        sec = median_seconds(fn, args.device, args.warmup, args.repeats)
        gbs = 2 * moved_bytes / sec / 1e9
        rows.append({"method": name, "time_s": sec, "gb_per_s": gbs,
                     "peak_fraction": gbs / args.peak_gbs if args.device == "cuda" else None})

    device = describe_device(args.device) + ("" if args.device == "cuda" else f" ({torch.get_num_threads()} threads)")
    print(f"device: {device} | torch {torch.__version__} | cache [planes={shape[0]}, B={shape[1]}, "
          f"H_kv={shape[2]}, T={shape[3]}, D={shape[4]}] {args.dtype} = "
          f"{cache.numel() * cache.element_size() / 2**30:.2f} GiB | keep 1/2, move 7/16 | median of {args.repeats}")
    base = rows[1]["time_s"]
    peak_col = f"{'of peak':>10}" if args.device == "cuda" else ""
    print(f"{'method':<20}{'ms':>10}{'vs torch':>10}{'GB/s':>10}" + peak_col)
    for r in rows:
        line = f"{r['method']:<20}{r['time_s'] * 1e3:>10.2f}{base / r['time_s']:>9.2f}x{r['gb_per_s']:>10.1f}"
        if r["peak_fraction"] is not None:
            line += f"{r['peak_fraction']:>10.1%}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "shape": shape, "dtype": args.dtype,
                       "cache_gib": cache.numel() * cache.element_size() / 2**30, "peak_gbs": args.peak_gbs,
                       "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
