"""KV-cache eviction stated token by token: the test reference and benchmark baseline of
`mempo.ops.kv_evict.evict_segments` (slow and obvious; no training path uses it)."""
from __future__ import annotations

import torch
from torch import Tensor


def evict_segments(cache: Tensor, keep_ranges: Tensor) -> Tensor:
    """Each sequence's kept token ranges, concatenated in order, written to the front of its
    cache rows. cache: [..., B, H_kv, T_max, D]; keep_ranges: [B, R, 2] int, half-open (start,
    end), empty ranges ignored. Positions past the kept total keep stale values.
    Returns the new lengths [B] (int64, on cache's device)."""
    lengths = []
    for b in range(keep_ranges.shape[0]):
        pieces = [cache[..., b, :, int(s):int(e), :].clone() for s, e in keep_ranges[b].tolist() if e > s]
        kept = torch.cat(pieces, dim=-2) if pieces else cache[..., b, :, :0, :]
        cache[..., b, :, :kept.shape[-2], :] = kept
        lengths.append(kept.shape[-2])
    return torch.tensor(lengths, dtype=torch.int64, device=cache.device)
