"""KV-cache eviction: keep chosen token ranges of each sequence, compacted in place.

MemPO's agent folds old turns into a memory summary and drops them from the context; the
rollout engine then evicts those tokens from its cache instead of re-running the prompt.
Kept keys are moved, not re-rotated: they keep the rotary positions they were written with,
which is what the policy saw when it wrote them.

Backends: mempo._C (C++/OpenMP on the CPU, one CUDA kernel over every layer's cache on the
GPU); without the extension, one index gather and copy per sequence (`_evict_torch`). The plain
statement for tests is mempo/reference/kv_evict.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mempo._native import native_ops


def check_keep_ranges(keep_ranges: Tensor, batch: int, t_max: int, lengths: Tensor | None) -> None:
    """Raise ValueError unless keep_ranges [batch, R, 2] holds ranges 0 <= start <= end <=
    limit (lengths[b], or t_max) whose non-empty members are sorted and disjoint."""
    if keep_ranges.dtype not in (torch.int64, torch.int32) or keep_ranges.dim() != 3 \
            or keep_ranges.shape[0] != batch or keep_ranges.shape[2] != 2:
        raise ValueError(f"keep_ranges must be an int32/int64 tensor of shape [{batch}, R, 2], "
                         f"got {keep_ranges.dtype} {tuple(keep_ranges.shape)}")
    starts, ends = keep_ranges[..., 0].long(), keep_ranges[..., 1].long()
    limit = torch.full_like(starts[:, :1], t_max) if lengths is None else \
        lengths.to(starts.device, torch.int64).reshape(batch, 1).clamp(max=t_max)
    in_bounds = (starts >= 0) & (starts <= ends) & (ends <= limit)
    # Each non-empty range must start at or after the end of every earlier non-empty range.
    ends_so_far = torch.where(ends > starts, ends, torch.zeros_like(ends)).cummax(dim=1).values
    prev_end = torch.cat([torch.zeros_like(ends[:, :1]), ends_so_far[:, :-1]], dim=1)
    ordered = (ends == starts) | (starts >= prev_end)
    bad = ~(in_bounds & ordered)
    if bad.any():  # one sync; the message names the first offending range
        b, k = (int(i) for i in bad.nonzero()[0])
        s, e = int(starts[b, k]), int(ends[b, k])
        if not bool(in_bounds[b, k]):
            raise ValueError(f"keep_ranges[{b}, {k}] = ({s}, {e}) is not a range with "
                             f"0 <= start <= end <= {int(limit[b, 0])} (the sequence's length)")
        raise ValueError(f"keep_ranges[{b}] must be sorted and disjoint: range {k} = ({s}, {e}) "
                         f"starts before {int(prev_end[b, k])}, the end of an earlier range")


def evict_segments(cache: Tensor, keep_ranges: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Compact each sequence's kept token ranges to the front of its cache, in place.

    cache: [planes, B, H_kv, T_max, D] contiguous (planes = num_layers * 2, K and V of every
      layer, in one buffer), or any contiguous tensor whose last four dims are [B, H_kv, T_max,
      D]. Every plane and head of a sequence is compacted the same way, in one kernel launch.
    keep_ranges: [B, R, 2] int, half-open token ranges (start, end) per sequence, sorted and
      non-overlapping, padded with empty ranges (start == end).
    lengths: [B] current lengths; if given, ranges must end within them (else within T_max).
    Returns the new lengths [B] int64 (sum of kept lengths) on cache's device. Positions at or
    past a sequence's new length hold stale values: callers mask them by length. Keys are not
    re-rotated.
    """
    if cache.dim() < 4:
        raise ValueError(f"cache must be [..., B, H_kv, T_max, D], got shape {tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous (one buffer [planes, B, H_kv, T_max, D])")
    batch, t_max = cache.shape[-4], cache.shape[-2]
    check_keep_ranges(keep_ranges, batch, t_max, lengths)
    keep_ranges = keep_ranges.to(device=cache.device, dtype=torch.int64).contiguous()
    ops = native_ops()
    if ops is None or (cache.is_cuda and not ops.has_cuda) or cache.device.type not in ("cpu", "cuda"):
        return _evict_torch(cache, keep_ranges)
    ops.evict_segments_(cache, keep_ranges)
    return (keep_ranges[..., 1] - keep_ranges[..., 0]).sum(-1)


def kept_token_index(keep_ranges: Tensor) -> list[Tensor]:
    """Per sequence, the source token of each kept position: keep_ranges [B, R, 2] ->
    B index tensors, the concatenation of arange(start, end) over the ranges in order."""
    starts, ends = keep_ranges[..., 0], keep_ranges[..., 1]
    lengths = (ends - starts).clamp_min(0)
    index = []
    for b in range(keep_ranges.shape[0]):
        # position p of range k comes from starts[k] + (p - first kept position of range k)
        first = lengths[b].cumsum(0) - lengths[b]
        offset = torch.repeat_interleave(starts[b] - first, lengths[b])
        index.append(offset + torch.arange(offset.numel(), device=keep_ranges.device))
    return index


def _evict_torch(cache: Tensor, keep_ranges: Tensor) -> Tensor:
    """PyTorch fallback: move each sequence's kept token ranges to the front of its cache rows, in place.

    cache: [..., B, H_kv, T_max, D] (leading dims: planes, e.g. layers x {K, V}), contiguous.
    keep_ranges: [B, R, 2] int, half-open (start, end), non-empty ones sorted and disjoint,
    empty ones (start == end) ignored. Positions past the kept total keep stale values.
    Returns the new lengths [B] (int64, on cache's device).
    """
    planes = cache.view(-1, *cache.shape[-4:])
    keep_ranges = keep_ranges.to(device=cache.device, dtype=torch.int64)
    for b, index in enumerate(kept_token_index(keep_ranges)):
        # index_select gathers into a fresh tensor, so the copy back cannot read moved data.
        planes[:, b, :, : index.numel()] = planes[:, b].index_select(2, index)
    return (keep_ranges[..., 1] - keep_ranges[..., 0]).clamp_min(0).sum(-1)
