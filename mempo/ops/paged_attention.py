"""Paged attention for the rollout: new tokens attend over each row's live keys in a paged
KV pool, addressed through per-row block tables (`mempo.rollout.kv_cache.PagedKVCache`).

    paged_attention(q [N, Hq, D], k_cache / v_cache [blocks, block_size, Hkv, D], w: CacheWrite)
        -> [N, Hq, D];  token i of row r sees the row's logical slots 0..w.tok_limit[i]

The tokens of one forward are flat (varlen: rows' chunks back to back, no padding).
Backends, chosen per call:
  - CUDA, flash-attn installed, a pure decode step (one token per row) and a pool block size
    that flash-attn's paged kernel takes (a multiple of 256): `flash_attn_with_kvcache` with
    the block table;
  - CUDA (or any device under TRITON_INTERPRET=1): the Triton kernel
    `mempo.kernels.paged_attention` (one query token per program, through the block table);
  - CPU: gather the rows' live keys through the block table, then SDPA with a mask.
Everything a forward needs (write slots, visibility) is computed on the device from the
device block table and one small int tensor per forward (`CacheWrite.build`).
The plain statement for tests is `mempo.reference.paged_attention`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

FLASH_PAGE_MULTIPLE = 256  # flash-attn 2's paged KV needs page_block_size % 256 == 0
# "auto" picks by device as above; tests set "triton" to run the kernel (interpreted) on CPU tensors
BACKEND = "auto"


@dataclass
class CacheWrite:
    """Where one forward's new tokens go and what they see, shared by all layers.

    rows: [b] cache rows; first: [b] logical slot of each row's first new token; counts: [b];
    tok_row: [N] batch index of each new token; tok_limit: [N] its logical slot (it sees slots
    0..tok_limit); tok_phys: [N] its physical slot in the flat pool; block_table: [b, blocks]
    the rows' tables; kv_len / max_count: host ints (longest live row after the write,
    longest chunk)."""

    rows: Tensor
    first: Tensor
    counts: Tensor
    tok_row: Tensor
    tok_limit: Tensor
    tok_phys: Tensor
    block_table: Tensor
    kv_len: int
    max_count: int
    _dense: tuple | None = field(default=None, repr=False)

    @staticmethod
    def build(cache, rows: Tensor, first: Tensor, counts: Tensor, total: int, kv_len: int,
              max_count: int) -> CacheWrite:
        """cache: the PagedKVCache (its pool's device, block_table and block_size are read).
        rows/first/counts [b] on the cache's device (slices of the forward's one host->device
        copy); total = sum(counts), kv_len, max_count: host ints the engine already knows."""
        device = cache.pool.device
        b = rows.shape[0]
        tok_row = torch.repeat_interleave(torch.arange(b, device=device), counts, output_size=total)
        starts = torch.cumsum(counts, 0) - counts
        tok_limit = first[tok_row] + torch.arange(total, device=device) - starts[tok_row]
        table = cache.block_table.index_select(0, rows)
        bs = cache.block_size
        tok_phys = table[tok_row, tok_limit // bs].long() * bs + tok_limit % bs
        return CacheWrite(rows, first, counts, tok_row, tok_limit, tok_phys, table, kv_len, max_count)

    def dense(self, block_size: int):
        """CPU path metadata, built once per forward: physical slot of each row's logical key
        [b, kv_len], the padded query index (row, offset) of each token, key mask [b, 1, n, kv_len]."""
        if self._dense is None:
            device = self.rows.device
            keys = torch.arange(self.kv_len, device=device)
            phys = self.block_table[:, keys // block_size].long() * block_size + keys % block_size
            tok_off = self.tok_limit - self.first[self.tok_row]
            offs = torch.arange(self.max_count, device=device)
            limit = torch.minimum(self.first[:, None] + offs[None, :], (self.first + self.counts - 1)[:, None])
            mask = (keys[None, None, :] <= limit[:, :, None])[:, None]  # padding queries repeat the last one
            self._dense = (phys, tok_off, mask)
        return self._dense


def _flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, w: CacheWrite, scale: float) -> Tensor:
    """q [N, Hq, D] -> [N, Hq, D] over the paged cache (one layer's K/V planes)."""
    page = k_cache.shape[1]
    if q.is_cuda and w.max_count == 1 and page % FLASH_PAGE_MULTIPLE == 0 and _flash_available():
        from flash_attn import flash_attn_with_kvcache

        out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=(w.first + 1).int(),
                                      block_table=w.block_table, softmax_scale=scale, causal=True)
        return out[:, 0]
    if q.is_cuda or BACKEND == "triton":
        from mempo.kernels.paged_attention import paged_attention as triton_paged_attention

        return triton_paged_attention(q, k_cache, v_cache, w.block_table, w.tok_row, w.tok_limit, scale)
    # CPU: gather the live keys of each row, pad the queries per row, one masked SDPA
    phys, tok_off, mask = w.dense(page)
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.view(-1, hkv, d)[phys].transpose(1, 2)  # [b, Hkv, kv_len, D]
    values = v_cache.view(-1, hkv, d)[phys].transpose(1, 2)
    b = w.rows.shape[0]
    if w.max_count == 1:  # decode: one token per row, no padding
        q_pad = q[:, None]
    else:
        q_pad = q.new_zeros(b, w.max_count, q.shape[1], d)
        q_pad[w.tok_row, tok_off] = q
    out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != hkv)
    out = out.transpose(1, 2)
    return out[:, 0] if w.max_count == 1 else out[w.tok_row, tok_off]
