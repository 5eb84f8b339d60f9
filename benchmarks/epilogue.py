"""The CPU chunk epilogue: mempo._C (C++/OpenMP, one sweep each) vs the PyTorch statement
of the same contract (mempo/ops/epilogue.py), on one chunk of logits.

    python benchmarks/epilogue.py                  # C=256 rows, V=32000, float32, < 30 s
    python benchmarks/epilogue.py --rows 512 --vocab 151936 --temperature 0.7 --json out.json

Rows: row_stats with and without entropy, write_logit_grad_ with and without entropy, and
"chunk" = stats + grad, what one chunk of linear_policy_loss's forward+backward costs beyond
its GEMMs. Times are medians over repeats after warm-up. The C++ path allocates only its [C]
outputs; the PyTorch path allocates several [C, V] temporaries per call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mempo._native import native_error, native_ops
from mempo.host import describe_device
from mempo.ops import epilogue


def median_seconds(fn, setup, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        setup()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256, help="C: rows in a chunk")
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (both paths use it)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the numbers to this path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = native_ops()
    if native is None:
        raise SystemExit(f"mempo._C unavailable ({native_error()}): pip install --no-build-isolation -e .")

    torch.manual_seed(0)
    c, v, inv_t = args.rows, args.vocab, 1.0 / args.temperature
    logits = torch.randn(c, v) * 4
    targets = torch.randint(0, v, (c,))
    g_lp, g_ent = torch.randn(c), torch.randn(c)
    lse, _, mean_z = native.row_stats(logits, targets, inv_t, True)
    buf = torch.empty_like(logits)

    def refill():  # the grad sweep overwrites its input: start each repeat from the logits
        buf.copy_(logits)

    def nothing():
        pass

    def one_chunk(ops, g_ent):  # stats of the chunk, then its gradient in place
        lse_c, _, mean_z_c = ops.row_stats(buf, targets, inv_t, g_ent is not None)
        ops.write_logit_grad_(buf, targets, inv_t, lse_c, g_lp, g_ent, mean_z_c)

    cases = {}
    for name, ops in (("c++", native), ("torch", epilogue)):
        for ent in (False, True):
            ge, mz = (g_ent, mean_z) if ent else (None, None)
            tag = "+entropy" if ent else ""
            cases[(f"row_stats{tag}", name)] = (
                lambda ops=ops, ent=ent: ops.row_stats(logits, targets, inv_t, ent), nothing)
            cases[(f"write_logit_grad_{tag}", name)] = (
                lambda ops=ops, ge=ge, mz=mz: ops.write_logit_grad_(buf, targets, inv_t, lse, g_lp, ge, mz), refill)
            cases[(f"chunk{tag}", name)] = (lambda ops=ops, ge=ge: one_chunk(ops, ge), refill)

    results = {key: median_seconds(fn, setup, args.warmup, args.repeats) for key, (fn, setup) in cases.items()}
    gbytes = c * v * 4 / 1e9
    print(f"device: {describe_device()} ({torch.get_num_threads()} threads) | torch {torch.__version__} | "
          f"C={c} V={v} float32 | T={args.temperature} | median of {args.repeats}")
    print(f"{'op':<26}{'torch ms':>10}{'c++ ms':>10}{'speedup':>9}{'c++ GB/s':>10}")
    rows = []
    for op in dict.fromkeys(k[0] for k in results):
        t_torch, t_cpp = results[(op, "torch")], results[(op, "c++")]
        passes = 1 if op.startswith("row_stats") else 2 if op.startswith("write") else 3  # reads+writes of [C, V]
        print(f"{op:<26}{t_torch * 1e3:>10.2f}{t_cpp * 1e3:>10.2f}{t_torch / t_cpp:>8.2f}x"
              f"{passes * gbytes / t_cpp:>10.1f}")
        rows.append({"op": op, "torch_s": t_torch, "cpp_s": t_cpp, "speedup": t_torch / t_cpp})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": c, "vocab": v, "threads": torch.get_num_threads(), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
