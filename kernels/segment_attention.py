"""Segment-visibility flash attention (FlashAttention-2 style) over packed varlen tokens.

q: [L, Hq, D], k/v: [L, Hkv, D] (GQA: Hq % Hkv == 0). A program owns one query block (or
key block in dK/dV) of one sequence and walks only the non-empty tiles listed in
`SegmentBlocks`; the element mask (causal + bitset bit of the key's segment in the query
segment's row) is applied on partial tiles only. Softmax runs in base 2 (the scale is
folded into qk_scale = scale * log2(e)); LSE is stored in base 2 for the backward.
Accumulation is float32. Backward: dK/dV per key block (looping over the query heads of
its KV group, so no atomics), dQ per query block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)  # finite running max: a row with no key in a tile must not produce inf - inf


@triton.jit
def _tile_mask(q_off, k_off, seq_len, q_seg, k_seg, seg_base, bits, W):
    """[BM, BN] bool: causal, in range, and key segment's bit set in the query segment's row."""
    k_local = k_seg - seg_base
    word = tl.load(bits + q_seg[:, None] * W + (k_local // 32)[None, :])
    bit = (word >> (k_local % 32)[None, :]) & 1
    ok = (k_off[None, :] <= q_off[:, None]) & (k_off < seq_len)[None, :] & (q_off < seq_len)[:, None]
    return ok & (bit != 0)


@triton.jit
def _sequence(blk_seq, pid, cu_seqlens, token_segment, segment_base):
    """(first token, length, global index of the first segment) of block pid's sequence."""
    seq = tl.load(blk_seq + pid)
    start = tl.load(cu_seqlens + seq)
    return start, tl.load(cu_seqlens + seq + 1) - start, tl.load(segment_base + tl.load(token_segment + start))


@triton.jit
def _load_rows(ptr, start, off, valid, stride_t, head_offset, d, d_valid):
    """[len(off), BLOCK_D] rows start + off of one head (zeros outside the sequence / head dim)."""
    return tl.load(ptr + (start + off)[:, None] * stride_t + head_offset + d[None, :],
                   mask=valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, value, start, off, valid, stride_t, head_offset, d, d_valid):
    tl.store(ptr + (start + off)[:, None] * stride_t + head_offset + d[None, :], value.to(ptr.dtype.element_ty),
             mask=valid[:, None] & d_valid[None, :])


@triton.jit
def _segments(token_segment, start, off, valid, seg_base):
    """Global segment of tokens start + off (the sequence's first segment outside it)."""
    return tl.where(valid, tl.load(token_segment + start + off, mask=valid, other=0), seg_base)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, cu_seqlens, token_segment, segment_base, bits, W,
                qb_seq, qb_index, row_ptr, row_kblock, row_partial,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                L, qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    start, seq_len, seg_base = _sequence(qb_seq, pid, cu_seqlens, token_segment, segment_base)
    q_off = tl.load(qb_index + pid) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_valid = q_off < seq_len
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = _load_rows(Q, start, q_off, q_valid, stride_qt, h * stride_qh, d, d_valid)
    q_seg = _segments(token_segment, start, q_off, q_valid, seg_base)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(tl.load(row_ptr + pid), tl.load(row_ptr + pid + 1)):
        k_off = tl.load(row_kblock + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_valid = k_off < seq_len
        k = _load_rows(K, start, k_off, k_valid, stride_kt, kvh * stride_kh, d, d_valid)
        v = _load_rows(V, start, k_off, k_valid, stride_vt, kvh * stride_vh, d, d_valid)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if tl.load(row_partial + t) != 0:
            k_seg = _segments(token_segment, start, k_off, k_valid, seg_base)
            s = tl.where(_tile_mask(q_off, k_off, seq_len, q_seg, k_seg, seg_base, bits, W), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    _store_rows(O, out, start, q_off, q_valid, stride_ot, h * stride_oh, d, d_valid)
    tl.store(LSE + h * L + start + q_off, m_i + tl.log2(l_safe), mask=q_valid)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, cu_seqlens, token_segment, segment_base, bits, W,
                     kb_seq, kb_index, col_ptr, col_qblock, col_partial,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     L, qk_scale, scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    start, seq_len, seg_base = _sequence(kb_seq, pid, cu_seqlens, token_segment, segment_base)
    k_off = tl.load(kb_index + pid) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_valid = k_off < seq_len
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    k = _load_rows(K, start, k_off, k_valid, stride_kt, kvh * stride_kh, d, d_valid)
    v = _load_rows(V, start, k_off, k_valid, stride_vt, kvh * stride_vh, d, d_valid)
    k_seg = _segments(token_segment, start, k_off, k_valid, seg_base)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    t0 = tl.load(col_ptr + pid)
    t1 = tl.load(col_ptr + pid + 1)
    for g in range(GROUP):
        h = kvh * GROUP + g
        for t in range(t0, t1):
            q_off = tl.load(col_qblock + t) * BLOCK_M + tl.arange(0, BLOCK_M)
            q_valid = q_off < seq_len
            q = _load_rows(Q, start, q_off, q_valid, stride_qt, h * stride_qh, d, d_valid)
            do = _load_rows(DO, start, q_off, q_valid, stride_dot, h * stride_doh, d, d_valid)
            lse = tl.load(LSE + h * L + start + q_off, mask=q_valid, other=0.0)
            delta = tl.load(DELTA + h * L + start + q_off, mask=q_valid, other=0.0)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            if tl.load(col_partial + t) != 0:
                q_seg = _segments(token_segment, start, q_off, q_valid, seg_base)
                p = tl.where(_tile_mask(q_off, k_off, seq_len, q_seg, k_seg, seg_base, bits, W), p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_rows(DK, dk * scale, start, k_off, k_valid, stride_dkt, kvh * stride_dkh, d, d_valid)
    _store_rows(DV, dv, start, k_off, k_valid, stride_dvt, kvh * stride_dvh, d, d_valid)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, cu_seqlens, token_segment, segment_base, bits, W,
                   qb_seq, qb_index, row_ptr, row_kblock, row_partial,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh,
                   L, qk_scale, scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    start, seq_len, seg_base = _sequence(qb_seq, pid, cu_seqlens, token_segment, segment_base)
    q_off = tl.load(qb_index + pid) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_valid = q_off < seq_len
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = _load_rows(Q, start, q_off, q_valid, stride_qt, h * stride_qh, d, d_valid)
    do = _load_rows(DO, start, q_off, q_valid, stride_dot, h * stride_doh, d, d_valid)
    lse = tl.load(LSE + h * L + start + q_off, mask=q_valid, other=0.0)
    delta = tl.load(DELTA + h * L + start + q_off, mask=q_valid, other=0.0)
    q_seg = _segments(token_segment, start, q_off, q_valid, seg_base)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(tl.load(row_ptr + pid), tl.load(row_ptr + pid + 1)):
        k_off = tl.load(row_kblock + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_valid = k_off < seq_len
        k = _load_rows(K, start, k_off, k_valid, stride_kt, kvh * stride_kh, d, d_valid)
        v = _load_rows(V, start, k_off, k_valid, stride_vt, kvh * stride_vh, d, d_valid)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if tl.load(row_partial + t) != 0:
            k_seg = _segments(token_segment, start, k_off, k_valid, seg_base)
            p = tl.where(_tile_mask(q_off, k_off, seq_len, q_seg, k_seg, seg_base, bits, W), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ, dq * scale, start, q_off, q_valid, stride_dqt, h * stride_dqh, d, d_valid)


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: exact products (the default tf32 would cost ~3 digits); 16-bit: default
    return "ieee" if dtype == torch.float32 else None


def _warps(block_m: int, block_n: int) -> dict:
    if block_m * block_n >= 128 * 64:
        return {"num_warps": 8, "num_stages": 2}
    return {"num_warps": 4, "num_stages": 2}


def segment_attention_fwd(q: Tensor, k: Tensor, v: Tensor, layout, blocks, scale: float) -> tuple[Tensor, Tensor]:
    """-> (out [L, Hq, D] in q's dtype, lse [Hq, L] float32 base-2 log-sum-exp)."""
    L, hq, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((hq, L), device=q.device, dtype=torch.float32)
    grid = (int(blocks.q_block_seq.shape[0]), hq)
    _fwd_kernel[grid](q, k, v, out, lse, layout.cu_seqlens, layout.token_segment, layout.segment_base,
                      layout.visible_bits, layout.visible_bits.shape[1],
                      blocks.q_block_seq, blocks.q_block_index, blocks.row_ptr, blocks.row_kblock, blocks.row_partial,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), L, scale * LOG2E,
                      GROUP=hq // k.shape[1], HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                      BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PRECISION=_precision(q.dtype),
                      **_warps(blocks.block_m, blocks.block_n))
    return out, lse


def segment_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          layout, blocks, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv) shaped and typed like q, k, v."""
    L, hq, dim = q.shape
    hkv = k.shape[1]
    do = do.contiguous()
    delta = (do.float() * out.float()).sum(-1).t().contiguous()  # [Hq, L]: rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = dict(GROUP=hq // hkv, HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
                BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PRECISION=_precision(q.dtype),
                **_warps(blocks.block_m, blocks.block_n))
    common = (layout.cu_seqlens, layout.token_segment, layout.segment_base, layout.visible_bits,
              layout.visible_bits.shape[1])
    _bwd_dkdv_kernel[(int(blocks.k_block_seq.shape[0]), hkv)](
        q, k, v, do, dk, dv, lse, delta, *common,
        blocks.k_block_seq, blocks.k_block_index, blocks.col_ptr, blocks.col_qblock, blocks.col_partial,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        L, scale * LOG2E, scale, **meta)
    _bwd_dq_kernel[(int(blocks.q_block_seq.shape[0]), hq)](
        q, k, v, do, dq, lse, delta, *common,
        blocks.q_block_seq, blocks.q_block_index, blocks.row_ptr, blocks.row_kblock, blocks.row_partial,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        L, scale * LOG2E, scale, **meta)
    return dq, dk, dv
