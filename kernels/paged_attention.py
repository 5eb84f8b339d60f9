"""Paged attention over a block-table KV cache, one query token per program (Triton).

The rollout's decode step: every new token (a sampled token, or a token of a prefill chunk)
attends to the logical slots 0..limit of its row, which live in fixed-size blocks of one
pool, found through the row's block table. Varlen by construction: tokens are flat [N]
with their row and limit, no padding.

    q:           [N, Hq, D]             (rotated)
    k/v_cache:   [num_blocks, block_size, Hkv, D]   (one layer's plane of the pool)
    block_table: [rows, max_blocks] int32 (row b's logical block j -> physical block)
    tok_row:     [N] int   row of each token (index into block_table)
    tok_limit:   [N] int   last logical slot the token sees (its own, after the write)
    -> out [N, Hq, D] in q's dtype: softmax(q k^T * scale) v over the visible slots.

The plain PyTorch statement is `mempo.reference.paged_attention.paged_attention`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 32  # keys per inner step


@triton.jit
def _paged_attention_kernel(Q, K, V, O, BT, TOK_ROW, TOK_LIMIT, scale,
                            stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_ot, stride_oh, stride_bt,
                            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP  # GQA: query head h reads KV head h // GROUP
    row = tl.load(TOK_ROW + t).to(tl.int64)
    limit = tl.load(TOK_LIMIT + t)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + t * stride_qt + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, limit + 1, BLOCK_N):
        # -- where the keys are: logical slot -> (physical block, offset) ----------------
        s = start + tl.arange(0, BLOCK_N)
        ok = s <= limit
        blk = tl.load(BT + row * stride_bt + s // PAGE, mask=ok, other=0).to(tl.int64)
        base = blk * stride_kb + (s % PAGE) * stride_ks + kvh * stride_kh
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(K + base[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        # -- compute qk, online softmax ---------------------------------------------------
        qk = tl.sum(k * q[None, :], axis=1)
        qk = tl.where(ok, qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=0))
        p = tl.exp(qk - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + base[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    # epilogue
    out = acc / l_i
    tl.store(O + t * stride_ot + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d_ok)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, tok_row: Tensor,
                    tok_limit: Tensor, scale: float) -> Tensor:
    """See the module docstring. Every token must see at least its own slot (limit >= 0)."""
    n, hq, d = q.shape
    _, page, hkv, dk = k_cache.shape
    if dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [blocks, block_size, Hkv, {d}] alike, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if k_cache.stride(-1) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("k_cache and v_cache must be contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    if n == 0:
        return out
    table = block_table.contiguous()
    _paged_attention_kernel[(n, hq)](
        q, k_cache, v_cache, out, table, tok_row.contiguous(), tok_limit.contiguous(), float(scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), table.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), PAGE=page, BLOCK_N=BLOCK_N,
        num_warps=4)
    return out
