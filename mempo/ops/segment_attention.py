"""segment_attention: packed varlen GQA attention under segment visibility (SegmentLayout).

CUDA -> the Triton flash kernel in `mempo.kernels.segment_attention` (skips invisible
tiles); CPU -> per-sequence SDPA with a boolean mask built from the same metadata (an
[L_s, L_s] mask per sequence is fine off the GPU fast path). `backend=` forces one, so
tests run the Triton kernel on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from mempo.ops.segment_blocks import layout_blocks
from mempo.ops.segment_layout import SegmentLayout

BACKENDS = ("auto", "triton", "torch")
GPU_BLOCKS = (128, 64)  # forward BLOCK_M, BLOCK_N for H100-class GPUs
GPU_BWD_BLOCKS = (64, 64)  # backward: smaller tiles, as dK/dV and dQ hold more live tiles
INTERPRETER_BLOCKS = (16, 16)  # tl.dot's minimum; keeps interpreter runs short
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SegmentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, scale: float,
                blocks: tuple[int, int], bwd_blocks: tuple[int, int]) -> Tensor:
        from mempo.kernels.segment_attention import segment_attention_fwd

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = segment_attention_fwd(q, k, v, layout, layout_blocks(layout, *blocks), scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.bwd_blocks, ctx.scale = layout, bwd_blocks, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        from mempo.kernels.segment_attention import segment_attention_bwd

        q, k, v, out, lse = ctx.saved_tensors
        tiles = layout_blocks(ctx.layout, *ctx.bwd_blocks)
        dq, dk, dv = segment_attention_bwd(dout, q, k, v, out, lse, ctx.layout, tiles, ctx.scale)
        return dq, dk, dv, None, None, None, None


def sequence_masks(layout: SegmentLayout) -> list[tuple[int, int, Tensor]]:
    """(start, end, [L_s, L_s] bool visibility) per packed sequence (CPU fallback, O(L_s^2)).
    Built once per layout and cached on it: every layer's attention, forward and backward,
    reuses the same masks."""
    if "sequence_masks" not in layout._cache:
        vis = layout.visible_segments()
        cu = layout.cu_seqlens.tolist()
        base_of = layout.segment_base.tolist()
        out = []
        for t0, t1 in zip(cu[:-1], cu[1:]):
            seg = layout.token_segment[t0:t1].long()
            base = base_of[int(seg[0])]
            local = seg - base
            n_seg = int(local.max()) + 1
            causal = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=seg.device).tril_()
            out.append((t0, t1, vis[base:base + n_seg, :n_seg][local][:, local] & causal))
        layout._cache["sequence_masks"] = out
    return layout._cache["sequence_masks"]


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, scale: float) -> Tensor:
    # SDPA adds its mask (-inf) to the scores and multiplies p = 0 by v, so a NaN/inf key or
    # value would reach rows that never see it. Such tokens are zeroed and the rows that do
    # see one are set to NaN afterwards, as the Triton kernel and the reference behave.
    # The common case pays one sum over k and v (a non-finite element makes it non-finite; a
    # finite overflow only sends it down the exact per-token check) and a host check.
    any_bad = not bool(torch.isfinite(k.sum(dtype=torch.float32) + v.sum(dtype=torch.float32)))
    if any_bad:
        bad = ~(torch.isfinite(k).flatten(1).all(1) & torch.isfinite(v).flatten(1).all(1))
        k, v = (torch.where(bad[:, None, None], torch.zeros_like(t), t) for t in (k, v))
    outs = []
    for t0, t1, mask in sequence_masks(layout):
        o = F.scaled_dot_product_attention(q[t0:t1].transpose(0, 1), k[t0:t1].transpose(0, 1),
                                           v[t0:t1].transpose(0, 1), attn_mask=mask, scale=scale,
                                           enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1)
        if any_bad:
            sees_bad = (mask & bad[None, t0:t1]).any(1)
            o = torch.where(sees_bad[:, None, None], torch.full_like(o, float("nan")), o)
        outs.append(o)
    return torch.cat(outs, dim=0)


def _check(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [L, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}.dtype must be one of {DTYPES}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must be [L, Hkv, D] matching q [L, Hq, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if layout.num_tokens != q.shape[0]:
        raise ValueError(f"layout has {layout.num_tokens} tokens, q has {q.shape[0]}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device}, q on {q.device}: call layout.to(device) once")


def segment_attention(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, scale: float | None = None,
                      backend: str = "auto", block_sizes: tuple[int, int] | None = None) -> Tensor:
    """Attention where token i sees key j iff layout says so (causal + segment visibility).

    q: [L, Hq, D], k/v: [L, Hkv, D] packed (no padding), Hq % Hkv == 0 -> [L, Hq, D].
    scale: softmax scale (default D ** -0.5). backend: "auto" (CUDA -> "triton", else
    "torch"), "triton" or "torch". block_sizes: (BLOCK_M, BLOCK_N) of the Triton kernel,
    forward and backward (default: GPU_BLOCKS / GPU_BWD_BLOCKS on CUDA, 16 x 16 otherwise).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(q, k, v, layout)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "torch":
        return _torch_attention(q, k, v, layout, scale)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got q on {q.device} (use backend='torch' or 'auto'; "
                         f"tests run the kernel on the CPU with TRITON_INTERPRET=1 set before triton is imported)")
    if q.dtype == torch.float64:
        raise ValueError("q.dtype float64 is not supported by the triton backend; use backend='torch'")
    if q.shape[2] > 256:
        raise ValueError(f"head_dim must be <= 256 for the triton backend, got {q.shape[2]}")
    fwd_blocks = bwd_blocks = INTERPRETER_BLOCKS
    if block_sizes is not None:
        fwd_blocks = bwd_blocks = tuple(block_sizes)
    elif q.is_cuda:
        fwd_blocks, bwd_blocks = GPU_BLOCKS, GPU_BWD_BLOCKS
    for b in fwd_blocks:
        if b < 16 or b & (b - 1):
            raise ValueError(f"block_sizes must be powers of two >= 16, got {block_sizes}")
    return SegmentAttentionFunction.apply(q, k, v, layout, scale, fwd_blocks, bwd_blocks)
