"""Tile tables of a SegmentLayout for a flash-attention kernel (FlexAttention-style).

Every (query block, key block) tile of a sequence is empty, full or partial. Only
non-empty tiles are listed, so the kernel's cost follows the mask's density; only
partial tiles pay for the element mask (causal + bitset lookup). Classification is
conservative (a tile may be called partial when it is full, never the reverse) and is
computed at segment granularity from block x segment membership matrices: O(blocks *
segments) per sequence, never L x L.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mempo.segment_layout import SegmentLayout


@dataclass
class SegmentBlocks:
    """Non-empty tiles, listed by query block (rows) and by key block (columns).

    q_block_seq/q_block_index: [NQ] int32, sequence and local index of every query block
    row_ptr: [NQ+1] int32; row_kblock, row_partial: [nnz] int32 local key block, 1 = partial
    k_block_seq/k_block_index: [NK] int32; col_ptr: [NK+1]; col_qblock, col_partial: [nnz]
    """

    block_m: int
    block_n: int
    q_block_seq: Tensor
    q_block_index: Tensor
    row_ptr: Tensor
    row_kblock: Tensor
    row_partial: Tensor
    k_block_seq: Tensor
    k_block_index: Tensor
    col_ptr: Tensor
    col_qblock: Tensor
    col_partial: Tensor
    density: float  # visible tiles (full + partial) / causal tiles

    def to(self, device: torch.device | str) -> "SegmentBlocks":
        return SegmentBlocks(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()})


def _tile_kinds(seg_len: np.ndarray, vis: np.ndarray, bm: int, bn: int) -> np.ndarray:
    """-> [nq, nk] int8 tile kinds of one sequence: 0 empty, 1 full, 2 partial."""
    n = int(seg_len.sum())
    c = len(seg_len)
    local = np.repeat(np.arange(c), seg_len)
    tok = np.arange(n)
    nq, nk = -(-n // bm), -(-n // bn)
    in_q = np.zeros((nq, c), dtype=np.float32)
    in_q[tok // bm, local] = 1.0
    in_k = np.zeros((nk, c), dtype=np.float32)
    in_k[tok // bn, local] = 1.0
    visf = vis.astype(np.float32)
    some_visible = (in_q @ visf) > 0  # [nq, c]: some query segment of the block sees c
    some_hidden = (in_q @ (1.0 - visf)) > 0  # some query segment of the block does not
    nonempty = (some_visible.astype(np.float32) @ in_k.T) > 0
    notfull = (some_hidden.astype(np.float32) @ in_k.T) > 0
    q_first = np.arange(nq)[:, None] * bm
    q_last = np.minimum(q_first + bm, n) - 1
    k_first = np.arange(nk)[None, :] * bn
    k_last = np.minimum(k_first + bn, n) - 1
    causal_any = k_first <= q_last
    # full tiles skip all masking, so they must also be whole blocks (no ragged rows/cols)
    causal_all = (k_last <= q_first) & (q_first + bm <= n) & (k_first + bn <= n)
    kinds = np.where(nonempty & causal_any, 2, 0).astype(np.int8)
    kinds[(kinds == 2) & ~notfull & causal_all] = 1
    return kinds


def build_blocks(layout: SegmentLayout, block_m: int, block_n: int) -> SegmentBlocks:
    """Tile tables of `layout` (computed on the host from its metadata)."""
    cu = layout.cu_seqlens.cpu().numpy().astype(np.int64)
    seg_base = layout.segment_base.cpu().numpy()
    bounds = layout.segment_bounds.cpu().numpy().astype(np.int64)
    vis_all = layout.visible_segments().cpu().numpy()
    first_seg = np.flatnonzero(np.arange(len(seg_base)) == seg_base)
    last_seg = np.append(first_seg[1:], len(seg_base))
    qs, qi, rp, rk, rpart, ks, ki, cp, ck, cpart = ([] for _ in range(10))
    visible = causal = 0
    for b in range(len(cu) - 1):
        s0, s1 = first_seg[b], last_seg[b]
        seg_len = bounds[s0:s1, 1] - bounds[s0:s1, 0]
        kinds = _tile_kinds(seg_len, vis_all[s0:s1, : s1 - s0], block_m, block_n)
        nq, nk = kinds.shape
        qs.append(np.full(nq, b)); qi.append(np.arange(nq))
        r, c = np.nonzero(kinds)
        rp.append(np.bincount(r, minlength=nq)); rk.append(c); rpart.append(kinds[r, c] == 2)
        ks.append(np.full(nk, b)); ki.append(np.arange(nk))
        ct, rt = np.nonzero(kinds.T)
        cp.append(np.bincount(ct, minlength=nk)); ck.append(rt); cpart.append(kinds[rt, ct] == 2)
        n = int(cu[b + 1] - cu[b])
        visible += len(r)
        causal += int(((np.arange(nk)[None, :] * block_n) <= np.minimum(np.arange(nq)[:, None] * block_m + block_m, n) - 1).sum())

    def i32(parts) -> Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int32))

    def ptr(parts) -> Tensor:
        return torch.from_numpy(np.concatenate([[0], np.cumsum(np.concatenate(parts))]).astype(np.int32))

    return SegmentBlocks(block_m, block_n, i32(qs), i32(qi), ptr(rp), i32(rk), i32(rpart),
                         i32(ks), i32(ki), ptr(cp), i32(ck), i32(cpart), visible / max(causal, 1))


def layout_blocks(layout: SegmentLayout, block_m: int, block_n: int) -> SegmentBlocks:
    """build_blocks, cached on the layout and shipped to its device once."""
    key = (block_m, block_n, str(layout.device))
    if key not in layout._cache:
        layout._cache[key] = build_blocks(layout, block_m, block_n).to(layout.device)
    return layout._cache[key]
