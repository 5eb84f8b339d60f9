"""Paged attention in plain PyTorch: the statement of `mempo.kernels.paged_attention`, its
test reference and the CPU rollout path's ground truth (one token at a time, no padding)."""
from __future__ import annotations

import torch
from torch import Tensor


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, tok_row: Tensor,
                    tok_limit: Tensor, scale: float) -> Tensor:
    """q [N, Hq, D]; k/v_cache [blocks, block_size, Hkv, D]; block_table [rows, max_blocks];
    tok_row, tok_limit [N] -> [N, Hq, D]: token t attends to its row's logical slots
    0..tok_limit[t], found through block_table (computed in q's dtype)."""
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        slots = torch.arange(int(tok_limit[t]) + 1, device=q.device)
        blocks = block_table[int(tok_row[t])].long()[slots // page]
        k = k_cache[blocks, slots % page].to(q.dtype).repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v_cache[blocks, slots % page].to(q.dtype).repeat_interleave(group, dim=1)
        weights = (torch.einsum("hd,shd->hs", q[t], k) * scale).softmax(-1)
        out[t] = torch.einsum("hs,shd->hd", weights, v)
    return out
