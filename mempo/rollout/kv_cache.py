"""The rollout KV cache: one buffer for every layer's keys and values, per-row lengths.

buffer: [num_layers * 2, B, H_kv, capacity, D] (planes 2l and 2l+1 are layer l's K and V),
the layout `mempo.ops.kv_evict.evict_segments` compacts in one launch. Keys are stored
after rotary embedding, so a key keeps the position it was written with when eviction
moves it: that is what makes rollout and single-pass training see the same thing.
"""
from __future__ import annotations

import torch
from torch import Tensor


class RolloutKVCache:
    """KV cache of `batch` sequences; row r holds `lengths[r]` live tokens, and for each a
    record of which trajectory token it is (`slot_tokens[r]`, for eviction by token range)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.buffer = torch.zeros(num_layers * 2, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.capacity = capacity
        self.lengths = [0] * batch
        # Trajectory token index held by each live slot, row by row (ranges, compactly).
        self.slot_ranges: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
        self.peak_lengths = [0] * batch

    @property
    def num_layers(self) -> int:
        return self.buffer.shape[0] // 2

    def layer(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        """K and V of one layer: [B, H_kv, capacity, D] each (views)."""
        return self.buffer[2 * layer_idx], self.buffer[2 * layer_idx + 1]

    def reserve(self, row: int, first_token: int, count: int) -> int:
        """Claim `count` slots at the end of `row` for trajectory tokens first_token.. ;
        returns the first slot. Raises if the row's context would exceed the capacity."""
        start = self.lengths[row]
        if start + count > self.capacity:
            raise OverflowError(f"row {row}: context of {start + count} tokens exceeds the cache capacity "
                                f"{self.capacity} (rollout.max_total_tokens bounds a trajectory)")
        ranges = self.slot_ranges[row]
        if ranges and ranges[-1][1] == first_token:
            ranges[-1] = (ranges[-1][0], first_token + count)
        else:
            ranges.append((first_token, first_token + count))
        self.lengths[row] = start + count
        self.peak_lengths[row] = max(self.peak_lengths[row], self.lengths[row])
        return start

    def evict_tokens(self, drops: dict[int, list[tuple[int, int]]]) -> None:
        """Drop trajectory-token ranges (half-open) from rows {row: ranges}, compacting the
        survivors to the front in order; one kernel launch for all rows and layers."""
        from mempo.ops.kv_evict import evict_segments

        if not drops:
            return
        batch = self.buffer.shape[1]
        for r, ranges in drops.items():  # all checks first: a rejected drop leaves the cache as it was
            if not isinstance(r, int) or not 0 <= r < batch:
                raise ValueError(f"drops: row {r!r} is not a row of this cache (0..{batch - 1})")
            for pair in ranges:
                if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not 0 <= pair[0] <= pair[1]:
                    raise ValueError(f"drops[{r}]: ranges must be (start, end) ints with 0 <= start <= end, "
                                     f"got {pair!r}")
        keep_slots: list[list[tuple[int, int]]] = []
        kept_ranges = {}
        for r in range(batch):
            if r not in drops:
                keep_slots.append([(0, self.lengths[r])])
                continue
            slot_of = []  # (token_start, token_end, first_slot) of each live range
            slot = 0
            for a, b in self.slot_ranges[r]:
                slot_of.append((a, b, slot))
                slot += b - a
            kept_ranges[r] = _subtract(self.slot_ranges[r], drops[r])
            keep_slots.append(_slots_of(kept_ranges[r], slot_of))
        width = max(1, max(len(k) for k in keep_slots))
        keep = torch.zeros(batch, width, 2, dtype=torch.int64)
        for r, ranges in enumerate(keep_slots):
            for j, (a, b) in enumerate(ranges):
                keep[r, j, 0], keep[r, j, 1] = a, b
        lengths = torch.tensor(self.lengths, dtype=torch.int64)
        new_lengths = evict_segments(self.buffer, keep.to(self.buffer.device), lengths.to(self.buffer.device))
        self.lengths = [int(x) for x in new_lengths.tolist()]
        for r, kept in kept_ranges.items():
            self.slot_ranges[r] = kept


def _subtract(ranges: list[tuple[int, int]], dropped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges minus dropped ranges, in order, merged."""
    out = []
    for a, b in ranges:
        pieces = [(a, b)]
        for da, db in dropped:
            nxt = []
            for pa, pb in pieces:
                if db <= pa or da >= pb:
                    nxt.append((pa, pb))
                    continue
                if pa < da:
                    nxt.append((pa, da))
                if db < pb:
                    nxt.append((db, pb))
            pieces = nxt
        out.extend(p for p in pieces if p[1] > p[0])
    return out


def _slots_of(tokens: list[tuple[int, int]], slot_map) -> list[tuple[int, int]]:
    """Cache slot ranges holding the given token ranges (which lie inside the mapped ranges)."""
    out = []
    for a, b in tokens:
        for ta, tb, slot in slot_map:
            if ta <= a and b <= tb:
                out.append((slot + a - ta, slot + b - ta))
                break
        else:
            raise AssertionError(f"tokens [{a}, {b}) are not live in the cache")
    return out
