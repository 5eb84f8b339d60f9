"""Segment attention benchmark: mempo vs FlexAttention vs per-sequence causal vs dense-mask SDPA.

MemPO-like packed batch: trajectories of a 512-token prompt and 8-16 turns (think,
information, memory); every turn sees the prompt, the previous memory and its own
segments. Prints a table (device, shapes, dtype, threads, density, mask build time, fwd and
fwd+bwd times, ratio to mempo, (q, k) pairs) and optionally writes --json.

    python benchmarks/attention.py                 # CPU, small shape, torch fallback
    python benchmarks/attention.py --device cuda   # headline: 16k tokens, 32 heads, dim 128, bf16

Rows:
  mempo             segment visibility from the layout (Triton kernel on CUDA, per-sequence
                    masked SDPA on the CPU)
  flex_attention    torch's FlexAttention, block mask built from the same layout
  causal varlen     plain causal attention within each packed sequence: flash-attn's
                    flash_attn_varlen_func on CUDA when importable, else SDPA per sequence.
                    It is not MemPO's mask (it also sees dropped segments): the cost of the
                    standard packed-causal kernel a trainer without segment masks would run.
  sdpa dense mask   SDPA with the [L, L] boolean mask of the layout (computes all L^2 pairs)
"pairs": the (q, k) pairs each method evaluates: mempo and flex those its mask keeps,
causal varlen each sequence's causal triangle, dense SDPA all L^2 (it masks after computing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from mempo.host import describe_device
from mempo.ops.segment_attention import GPU_BLOCKS, segment_attention, sequence_masks
from mempo.ops.segment_blocks import layout_blocks
from mempo.ops.segment_layout import Segment, SegmentLayout


def mempo_trajectory(rng: np.random.Generator, tokens: int, prompt: int = 512) -> list[Segment]:
    turns = int(rng.integers(8, 17))
    per_turn = max(3, (tokens - prompt) // turns)
    segs, start = [Segment("prompt", 0, 0, prompt)], prompt
    for turn in range(1, turns + 1):
        cuts = np.sort(rng.integers(1, per_turn, size=2))
        for kind, n in zip(("think", "information", "memory"), (cuts[0], cuts[1] - cuts[0], per_turn - cuts[1])):
            segs.append(Segment(kind, turn, start, start + int(n)))
            start += int(n)
    turn_start = {s.step: s.start for s in reversed(segs) if s.kind == "think"}
    memory_start = {s.step: s.start for s in segs if s.kind == "memory"}
    for s in segs[1:]:
        if s.kind == "memory":  # replaced when the next memory closes
            s.dropped_at = memory_start.get(s.step + 1, start) if s.step < turns else None
        elif s.step < turns:  # a turn's think/information vanish when the next turn begins
            s.dropped_at = turn_start[s.step + 1]
    for s in segs:
        if s.dropped_at == start:
            s.dropped_at = None
    return segs


def batch_trajectories(rng: np.random.Generator, total: int, per_trajectory: int) -> list[list[Segment]]:
    trajs, n = [], 0
    while n < total:
        t = mempo_trajectory(rng, min(per_trajectory, max(total - n, 600)), prompt=min(512, per_trajectory // 4))
        trajs.append(t)
        n += t[-1].end
    return trajs


def visible_pairs(layout: SegmentLayout) -> tuple[int, int]:
    """(visible (q, k) pairs, causal pairs within the sequences), counted at segment
    granularity (no L x L)."""
    vis = layout.visible_segments().cpu().numpy()
    bounds = layout.segment_bounds.cpu().numpy().astype(np.int64)
    base = layout.segment_base.cpu().numpy()
    n = bounds[:, 1] - bounds[:, 0]
    visible = 0
    for a in range(len(n)):
        b0 = base[a]
        earlier = np.arange(b0, a)
        visible += int(n[a] * n[earlier][vis[a, earlier - b0]].sum() + n[a] * (n[a] + 1) // 2)
    cu = layout.cu_seqlens.cpu().numpy().astype(np.int64)
    lengths = np.diff(cu)
    return visible, int((lengths * (lengths + 1) // 2).sum())


def causal_varlen_method(layout: SegmentLayout, hq: int, hkv: int, device: str, dtype: torch.dtype):
    """-> (name, attention fn on [L, H, D]): causal attention within each packed sequence.
    flash-attn's varlen kernel (one launch for all sequences) where it can run, else one
    SDPA call per sequence (the flash / efficient SDPA backends on CUDA)."""
    cu = layout.cu_seqlens.to(device=device, dtype=torch.int32)
    bounds = layout.cu_seqlens.tolist()  # host copy, read once here
    max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if device == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            pass
        else:
            def varlen(q, k, v):  # GQA natively: k, v with hkv heads
                return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
            return "causal varlen (flash-attn)", varlen

    def per_sequence(q, k, v):
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                               v[a:b].transpose(0, 1), is_causal=True, enable_gqa=hq != hkv)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)
    return "causal varlen (sdpa per sequence)", per_sequence


def timed(fn, device: str, repeats: int) -> float:
    """median seconds of fn() over repeats (after two warm-up calls)."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def fwd_and_bwd(attn, q, k, v, device: str, repeats: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            attn(q.detach(), k.detach(), v.detach())

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        attn(q, k, v).backward(grad)

    grad = torch.randn_like(q)
    t_fwd = timed(fwd, device, repeats)
    try:
        return t_fwd, timed(fwd_bwd, device, repeats)
    except (NotImplementedError, RuntimeError) as e:  # FlexAttention has no CPU backward
        print(f"note: no backward: {str(e).splitlines()[0][:100]}")
        return t_fwd, float("nan")


def flex_method(layout: SegmentLayout, hq: int, hkv: int, device: str):
    """-> (attention fn on [L, H, D], block mask build seconds) or a str saying why not."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return f"FlexAttention unavailable ({e})"
    seg = layout.token_segment.long()
    base = layout.segment_base.long()[seg]
    local = seg - base
    bits = layout.visible_bits.long() & 0xFFFFFFFF

    def mask_mod(b, h, qi, ki):
        word = bits[seg[qi], local[ki] // 32]
        return (base[qi] == base[ki]) & (ki <= qi) & (((word >> (local[ki] % 32)) & 1) == 1)

    L = layout.num_tokens
    try:
        t = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        build = time.perf_counter() - t
        compiled = torch.compile(flex_attention, dynamic=False)

        def attn(q, k, v):
            o = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         block_mask=block_mask, enable_gqa=hq != hkv)
            return o[0].transpose(0, 1)
        return attn, build
    except Exception as e:  # noqa: BLE001 - report any backend failure as a skipped row
        return f"FlexAttention failed on {device}: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tokens", type=int, default=None, help="packed tokens (default: cuda 16384, cpu 2048)")
    p.add_argument("--trajectory-tokens", type=int, default=None, help="(default: cuda 4096, cpu 1024)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: cuda 32, cpu 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = heads)")
    p.add_argument("--dim", type=int, default=None, help="head dim (default: cuda 128, cpu 64)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default: cuda 10, cpu 2)")
    p.add_argument("--skip-flex", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the numbers to this path (rewritten after each row)")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    tokens = a.tokens or (16384 if cuda else 2048)
    hq = a.heads or (32 if cuda else 4)
    hkv = a.kv_heads or hq
    dim = a.dim or (128 if cuda else 64)
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    repeats = a.repeats or (10 if cuda else 2)
    rng = np.random.default_rng(a.seed)
    trajs = batch_trajectories(rng, tokens, a.trajectory_tokens or (4096 if cuda else 1024))

    # host-side builds: median of 5 after a warm-up (the first numpy calls of a process are slow)
    layout_times, table_times = [], []
    for _ in range(6):
        t = time.perf_counter()
        layout = SegmentLayout.from_segments(trajs)
        layout_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        layout = layout.to(a.device)
        blocks = layout_blocks(layout, *GPU_BLOCKS)  # what the Triton kernel reads
        if cuda:
            torch.cuda.synchronize()
        table_times.append(time.perf_counter() - t)
    build_layout, build_blocks = statistics.median(layout_times[1:]), statistics.median(table_times[1:])
    build_masks = 0.0
    if not cuda:  # what the CPU path reads instead: per-sequence masks, built once for all layers
        t = time.perf_counter()
        sequence_masks(layout)
        build_masks = time.perf_counter() - t
    L = layout.num_tokens
    visible, causal = visible_pairs(layout)
    density = visible / causal
    device_name = describe_device(a.device) + ("" if cuda else f" ({torch.get_num_threads()} threads)")
    print(f"device={device_name} torch {torch.__version__} tokens={L} trajectories={len(trajs)} "
          f"heads={hq}/{hkv} dim={dim} dtype={str(dtype).removeprefix('torch.')}")
    print(f"mask density {density:.3f} (tiles {blocks.density:.3f} at {GPU_BLOCKS[0]}x{GPU_BLOCKS[1]}); "
          f"layout build {build_layout * 1e3:.3f} ms ({build_layout / len(trajs) * 1e6:.0f} us/trajectory), "
          f"tile tables + copy {build_blocks * 1e3:.3f} ms"
          + (f", CPU masks {build_masks * 1e3:.1f} ms" if not cuda else ""))

    q = torch.randn(L, hq, dim, device=a.device, dtype=dtype, requires_grad=True)
    k = torch.randn(L, hkv, dim, device=a.device, dtype=dtype, requires_grad=True)
    v = torch.randn(L, hkv, dim, device=a.device, dtype=dtype, requires_grad=True)

    t = time.perf_counter()
    dense = layout.dense_mask()
    build_dense = time.perf_counter() - t

    def sdpa_dense(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=dense, enable_gqa=hq != hkv)
        return o.transpose(0, 1)

    # (name, fn, mask build seconds, (q, k) pairs evaluated)
    methods = [("mempo " + ("triton" if cuda else "torch"), lambda q, k, v: segment_attention(q, k, v, layout),
                build_layout + (build_blocks if cuda else build_masks), visible)]
    if not a.skip_flex:
        flex = flex_method(layout, hq, hkv, a.device)
        if isinstance(flex, str):
            print("note:", flex)
        else:
            methods.append(("flex_attention", flex[0], build_layout + flex[1], visible))
    varlen_name, varlen = causal_varlen_method(layout, hq, hkv, a.device, dtype)
    methods += [(varlen_name, varlen, 0.0, causal),
                ("sdpa dense mask", sdpa_dense, build_layout + build_dense, L * L)]
    rows, failed = [], []
    report = {"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "tokens": L, "trajectories": len(trajs), "heads": hq, "kv_heads": hkv,
              "dim": dim, "dtype": str(dtype).removeprefix("torch."), "density": density,
              "visible_pairs": visible, "causal_pairs": causal, "tile_density": blocks.density,
              "layout_build_ms": build_layout * 1e3, "block_table_ms": build_blocks * 1e3,
              "cpu_masks_ms": build_masks * 1e3, "rows": rows, "failed": failed}
    for name, fn, build, pairs in methods:
        try:
            fwd, fwd_bwd = fwd_and_bwd(fn, q, k, v, a.device, repeats)
        except Exception as e:  # noqa: BLE001 - one failing baseline must not hide the others
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            print(f"note: {name} failed: {reason}")
            failed.append({"method": name, "reason": reason})
            continue
        rows.append({"method": name, "mask_build_ms": build * 1e3, "fwd_ms": fwd * 1e3,
                     "fwd_bwd_ms": fwd_bwd * 1e3, "pairs": pairs})
        if a.json:  # after every row: a later timeout keeps what was measured
            _write_json(a.json, report)
    base = rows[0] if rows and rows[0]["method"].startswith("mempo") else None
    print(f"{'method':<34}{'pairs (M)':>10}{'pairs x':>9}{'mask build ms':>14}{'fwd ms':>10}{'fwd+bwd ms':>12}"
          f"{'fwd x':>8}{'fwd+bwd x':>11}")
    for r in rows:
        r["pairs_ratio"] = r["pairs"] / visible
        r["fwd_ratio"] = r["fwd_ms"] / base["fwd_ms"] if base else None
        r["fwd_bwd_ratio"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"] if base else None
        ratios = (f"{r['fwd_ratio']:>8.2f}{r['fwd_bwd_ratio']:>11.2f}" if base else f"{'-':>8}{'-':>11}")
        print(f"{r['method']:<34}{r['pairs'] / 1e6:>10.1f}{r['pairs_ratio']:>9.2f}{r['mask_build_ms']:>14.3f}"
              f"{r['fwd_ms']:>10.2f}{r['fwd_bwd_ms']:>12.2f}" + ratios)
    print("(x = time / mempo's time; > 1 means mempo is faster. pairs x = (q, k) pairs evaluated / the pairs "
          "MemPO's mask keeps)")
    if a.json:
        _write_json(a.json, report)
    return 1 if failed else 0


def _write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
