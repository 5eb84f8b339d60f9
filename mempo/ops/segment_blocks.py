"""Tile tables of a SegmentLayout for a flash-attention kernel (FlexAttention-style).

Every (query block, key block) tile of a sequence is empty, full or partial. Only
non-empty tiles are listed, so the kernel's cost follows the mask's density; only
partial tiles pay for the element mask (causal + bitset lookup). Classification is
conservative (a tile may be called partial when it is full, never the reverse) and is
computed at segment granularity from block x segment membership matrices: O(blocks *
segments) per sequence, never L x L, all sequences in one batched pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mempo.ops.segment_layout import SegmentLayout


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

    def to(self, device: torch.device | str) -> SegmentBlocks:
        return SegmentBlocks(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()})


def build_blocks(layout: SegmentLayout, block_m: int, block_n: int) -> SegmentBlocks:
    """Tile tables of `layout` (computed on the host from its metadata).

    All sequences at once, padded to the largest: per sequence, block x segment membership
    matrices (from the segments' block ranges, not token by token) times the segment
    visibility table say which tiles hold some visible pair (non-empty) and which hold some
    hidden one (not full). Batched [B, blocks, segments] matmuls: no per-sequence loop."""
    layout = layout.host()  # host metadata: no device sync
    cu = layout.cu_seqlens.cpu().numpy().astype(np.int64)
    bounds = layout.segment_bounds.cpu().numpy().astype(np.int64)
    seg_base = layout.segment_base.cpu().numpy().astype(np.int64)
    vis_rows = layout.visible_segments().cpu().numpy()  # [S, bits] over local segments
    num_seqs = len(cu) - 1
    n = np.diff(cu)  # [B] tokens per sequence
    first_seg = np.flatnonzero(np.arange(len(seg_base)) == seg_base)
    seq_of_seg = np.repeat(np.arange(num_seqs), np.diff(np.append(first_seg, len(seg_base))))
    local = np.arange(len(seg_base)) - seg_base
    c_max = int(local.max()) + 1
    starts = bounds[:, 0] - cu[seq_of_seg]
    ends = bounds[:, 1] - cu[seq_of_seg]
    nq, nk = -(-n // block_m), -(-n // block_n)
    vis = np.zeros((num_seqs, c_max, c_max), dtype=np.float32)
    vis[seq_of_seg, local] = vis_rows[:, :c_max]
    in_q = _membership(seq_of_seg, local, starts, ends, block_m, (num_seqs, int(nq.max()), c_max))
    in_k = _membership(seq_of_seg, local, starts, ends, block_n, (num_seqs, int(nk.max()), c_max))
    some_visible = (in_q @ vis) > 0  # [B, NQ, C]: some query segment of the block sees segment c
    some_hidden = (in_q @ (1.0 - vis)) > 0  # some query segment of the block does not
    in_k_t = in_k.transpose(0, 2, 1)
    nonempty = (some_visible.astype(np.float32) @ in_k_t) > 0  # [B, NQ, NK]
    notfull = (some_hidden.astype(np.float32) @ in_k_t) > 0
    seq_n = n[:, None, None]
    q_first = np.arange(in_q.shape[1])[None, :, None] * block_m
    k_first = np.arange(in_k.shape[1])[None, None, :] * block_n
    q_last = np.minimum(q_first + block_m, seq_n) - 1
    k_last = np.minimum(k_first + block_n, seq_n) - 1
    causal_any = (k_first <= q_last) & (q_first < seq_n) & (k_first < seq_n)
    # full tiles skip all masking, so they must also be whole blocks (no ragged rows/cols)
    causal_all = (k_last <= q_first) & (q_first + block_m <= seq_n) & (k_first + block_n <= seq_n)
    kinds = np.where(nonempty & causal_any, 2, 0).astype(np.int8)
    kinds[(kinds == 2) & ~notfull & causal_all] = 1

    q_offset = np.cumsum(nq) - nq
    k_offset = np.cumsum(nk) - nk
    b, qi, ki = np.nonzero(kinds)  # row-major: by (sequence, query block), then key block
    row_ptr = np.bincount(q_offset[b] + qi, minlength=int(nq.sum()))
    bt, kt, qt = np.nonzero(kinds.transpose(0, 2, 1))  # by (sequence, key block), then query block
    col_ptr = np.bincount(k_offset[bt] + kt, minlength=int(nk.sum()))

    def i32(x) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.int32))

    def ptr(counts) -> Tensor:
        return i32(np.concatenate([[0], np.cumsum(counts)]))

    def local_index(counts) -> np.ndarray:
        return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)

    return SegmentBlocks(block_m, block_n,
                         i32(np.repeat(np.arange(num_seqs), nq)), i32(local_index(nq)), ptr(row_ptr), i32(ki),
                         i32(kinds[b, qi, ki] == 2),
                         i32(np.repeat(np.arange(num_seqs), nk)), i32(local_index(nk)), ptr(col_ptr), i32(qt),
                         i32(kinds[bt, qt, kt] == 2),
                         len(b) / max(int(causal_any.sum()), 1))


def _membership(seq: np.ndarray, local: np.ndarray, starts: np.ndarray, ends: np.ndarray, block: int,
                shape: tuple[int, int, int]) -> np.ndarray:
    """-> [B, blocks, C] float32, 1 where local segment c of sequence b has a token in the
    block; from the segments' block ranges (O(segments + blocks)), not token by token."""
    out = np.zeros(shape, dtype=np.float32)
    keep = np.flatnonzero(ends > starts)
    first, last = starts[keep] // block, (ends[keep] - 1) // block
    counts = last - first + 1
    blocks = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    out[np.repeat(seq[keep], counts), blocks, np.repeat(local[keep], counts)] = 1.0
    return out


def layout_blocks(layout: SegmentLayout, block_m: int, block_n: int) -> SegmentBlocks:
    """build_blocks, cached on the layout and shipped to its device once."""
    key = (block_m, block_n, str(layout.device))
    if key not in layout._cache:
        layout._cache[key] = build_blocks(layout, block_m, block_n).to(layout.device)
    return layout._cache[key]
