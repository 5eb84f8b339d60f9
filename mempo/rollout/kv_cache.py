"""The rollout KV cache, paged: one pool of fixed-size blocks, a block table per row.

pool: [num_layers * 2, num_blocks, block_size, H_kv, D] (planes 2l and 2l+1 are layer l's K and
V; each plane is flash-attn's paged layout [num_blocks, block_size, H_kv, D]). Row r's logical
slot s lives in block `blocks[r][s // block_size]` at offset s % block_size. Blocks are taken
from the pool as a row grows and returned when it is evicted from, swapped out or released,
so memory follows the *live* context, never rows x max_total_tokens.

Keys are stored after rotary embedding, so a key keeps the position it was written with when
eviction moves it: that is what makes rollout and single-pass training see the same thing.
Eviction compacts a row's kept tokens into its leading logical slots (one gather and one
scatter over every plane, addressed through the block table) and frees the trailing blocks.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

GiB = 1 << 30


class KVBudgetError(ValueError):
    """rollout.kv_cache_memory cannot hold what is asked of it."""


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one token."""
    return num_layers * 2 * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def free_device_bytes(device: torch.device) -> int:
    """Memory a new allocation can still take: on CUDA the driver's free memory plus what
    PyTorch's caching allocator holds unused; on the CPU the kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def budget_bytes(kv_cache_memory: float, device: torch.device) -> int:
    """rollout.kv_cache_memory -> bytes: a value <= 1 is a fraction of the free device memory
    (measured now, after the model and optimizer), a value > 1 is GiB."""
    if not kv_cache_memory > 0:
        raise KVBudgetError(f"rollout.kv_cache_memory must be > 0 (a fraction <= 1 of free memory, or GiB), "
                            f"got {kv_cache_memory!r}")
    if kv_cache_memory <= 1:
        return int(kv_cache_memory * free_device_bytes(device))
    return int(kv_cache_memory * GiB)


class PagedKVCache:
    """Block pool + per-row block tables for up to `max_rows` concurrent rows.

    Host side (no device syncs): the free-block stack, each row's block list, live length and
    the trajectory token ranges its live slots hold (`slot_ranges`, for eviction by token
    range). Device side: `block_table` [max_rows, max_blocks_per_row] int32, kept in step with
    the host lists by `sync_table()` (one small copy, only when blocks changed)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, num_blocks: int, block_size: int,
                 max_rows: int, max_row_tokens: int, dtype: torch.dtype, device: torch.device):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_row_tokens <= 0:
            raise ValueError(f"max_row_tokens must be positive, got {max_row_tokens}")
        if num_blocks <= 0:
            raise KVBudgetError(f"the KV pool needs at least one block of {block_size} tokens, got {num_blocks}")
        # torch.empty: on the CPU untouched pages are never committed, so the resident size
        # follows the blocks in use (the free stack hands out low block ids first)
        self.pool = torch.empty(num_layers * 2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype,
                                device=device)
        self.block_size = block_size
        self.max_row_tokens = max_row_tokens
        self.max_blocks_per_row = math.ceil(max_row_tokens / block_size)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() -> lowest id
        self.block_table = torch.zeros(max_rows, self.max_blocks_per_row, dtype=torch.int32, device=device)
        self.blocks: list[list[int]] = [[] for _ in range(max_rows)]
        self.lengths = [0] * max_rows
        self.slot_ranges: list[list[tuple[int, int]]] = [[] for _ in range(max_rows)]
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self._dirty_rows: set[int] = set()
        self._fresh = bytearray(b"\x01") * num_blocks  # never handed out: may hold NaN bit patterns
        self.peak_blocks = 0

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.pool.shape[0] // 2

    @property
    def num_blocks(self) -> int:
        return self.pool.shape[1]

    @property
    def block_bytes(self) -> int:
        return self.pool[:, 0].numel() * self.pool.element_size()

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def blocks_needed(self, row: int, count: int) -> int:
        """New blocks row `row` needs to grow by `count` tokens."""
        return max(0, self.blocks_for(self.lengths[row] + count) - len(self.blocks[row]))

    def layer(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        """K and V of one layer: [num_blocks, block_size, H_kv, D] each (views)."""
        return self.pool[2 * layer_idx], self.pool[2 * layer_idx + 1]

    # -- rows ----------------------------------------------------------------------------
    def acquire_row(self) -> int:
        if not self.free_rows:
            raise RuntimeError("every cache row is in use (max_rows)")
        return self.free_rows.pop()

    def release_row(self, row: int) -> None:
        """Return the row's blocks to the pool and the row to the free rows."""
        self.free.extend(reversed(self.blocks[row]))
        self.blocks[row], self.lengths[row], self.slot_ranges[row] = [], 0, []
        self.free_rows.append(row)

    def reserve(self, row: int, first_token: int, count: int) -> int:
        """Claim `count` slots at the end of `row` for trajectory tokens first_token.. ; returns
        the first logical slot. The caller checks `blocks_needed` against `free` first."""
        start = self.lengths[row]
        if start + count > self.max_row_tokens:
            raise OverflowError(f"row {row}: context of {start + count} tokens exceeds the row limit "
                                f"{self.max_row_tokens} (rollout.max_total_tokens bounds a trajectory)")
        need = self.blocks_needed(row, count)
        if need > len(self.free):
            raise MemoryError(f"row {row} needs {need} KV blocks, {len(self.free)} are free "
                              f"(the agent loop checks before it reserves)")
        if need:
            self.blocks[row] += self._take(need)
            self._dirty_rows.add(row)
        ranges = self.slot_ranges[row]
        if ranges and ranges[-1][1] == first_token:
            ranges[-1] = (ranges[-1][0], first_token + count)
        else:
            ranges.append((first_token, first_token + count))
        self.lengths[row] = start + count
        return start

    def _take(self, count: int) -> list[int]:
        taken = [self.free.pop() for _ in range(count)]
        fresh = [b for b in taken if self._fresh[b]]
        if fresh:
            # the CPU path gathers whole blocks and masks scores, and 0 * NaN is NaN: a block's
            # first user must not find uninitialised memory there (later users find finite KV)
            self.pool.index_fill_(1, torch.tensor(fresh, device=self.pool.device), 0)
            for b in fresh:
                self._fresh[b] = 0
        self.peak_blocks = max(self.peak_blocks, self.blocks_in_use)
        return taken

    def sync_table(self) -> None:
        """Copy the changed rows' block lists into the device block table (one small copy)."""
        if not self._dirty_rows:
            return
        rows = sorted(self._dirty_rows)
        table = torch.zeros(len(rows), self.max_blocks_per_row, dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, : len(self.blocks[r])] = torch.tensor(self.blocks[r], dtype=torch.int32)
        self.block_table[torch.tensor(rows, device=self.block_table.device)] = table.to(self.block_table.device)
        self._dirty_rows.clear()

    def physical_slots(self, row: int, logical: list[int] | range) -> list[int]:
        blocks, bs = self.blocks[row], self.block_size
        return [blocks[s // bs] * bs + s % bs for s in logical]

    # -- swap (a row that must wait gives its blocks back without losing its KV) ---------
    def swap_out(self, row: int) -> tuple[Tensor, int, list[tuple[int, int]]]:
        """Copy the row's live KV to host memory and release the row -> a handle for swap_in."""
        n = self.lengths[row]
        slots = torch.tensor(self.physical_slots(row, range(n)), device=self.pool.device)
        flat = self.pool.view(self.pool.shape[0], -1, *self.pool.shape[3:])
        saved = flat.index_select(1, slots).to("cpu")
        handle = (saved, n, list(self.slot_ranges[row]))
        self.release_row(row)
        return handle

    def swap_in(self, handle) -> int:
        """Take a free row and blocks for a swapped-out row's KV, copy it back -> the row."""
        saved, n, ranges = handle
        row = self.acquire_row()
        self.blocks[row] = self._take(self.blocks_for(n))
        self._dirty_rows.add(row)
        self.lengths[row], self.slot_ranges[row] = n, ranges
        slots = torch.tensor(self.physical_slots(row, range(n)), device=self.pool.device)
        flat = self.pool.view(self.pool.shape[0], -1, *self.pool.shape[3:])
        flat.index_copy_(1, slots, saved.to(self.pool.device))
        return row

    # -- eviction ------------------------------------------------------------------------
    def evict_tokens(self, drops: dict[int, list[tuple[int, int]]]) -> None:
        """Drop trajectory-token ranges (half-open) from rows {row: ranges}, compacting the
        survivors to the front of each row in order and freeing the blocks past the new end;
        one gather + one scatter over every layer's K and V for all rows."""
        if not drops:
            return
        rows = len(self.blocks)
        for r, ranges in drops.items():  # all checks first: a rejected drop leaves the cache as it was
            if not isinstance(r, int) or not 0 <= r < rows or r in self.free_rows:
                raise ValueError(f"drops: row {r!r} is not a live row of this cache (0..{rows - 1})")
            for pair in ranges:
                if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not 0 <= pair[0] <= pair[1]:
                    raise ValueError(f"drops[{r}]: ranges must be (start, end) ints with 0 <= start <= end, "
                                     f"got {pair!r}")
        src, dst = [], []
        for r, dropped in drops.items():
            slot_of, slot = [], 0  # (token_start, token_end, first logical slot) of each live range
            for a, b in self.slot_ranges[r]:
                slot_of.append((a, b, slot))
                slot += b - a
            kept = _subtract(self.slot_ranges[r], dropped)
            logical = [s for a, b in _slots_of(kept, slot_of) for s in range(a, b)]
            moved = [(s, d) for d, s in enumerate(logical) if s != d]  # the kept prefix stays put
            if moved:
                src += self.physical_slots(r, [s for s, _ in moved])
                dst += self.physical_slots(r, [d for _, d in moved])
            self.slot_ranges[r], self.lengths[r] = kept, len(logical)
            keep_blocks = self.blocks_for(len(logical))
            if keep_blocks < len(self.blocks[r]):
                self.free.extend(reversed(self.blocks[r][keep_blocks:]))
                self.blocks[r] = self.blocks[r][:keep_blocks]
                self._dirty_rows.add(r)
        if src:
            flat = self.pool.view(self.pool.shape[0], -1, *self.pool.shape[3:])
            device = self.pool.device
            # index_select copies the sources first, so overlapping moves are safe
            flat.index_copy_(1, torch.tensor(dst, device=device),
                             flat.index_select(1, torch.tensor(src, device=device)))


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
    """Logical slot ranges holding the given token ranges (which lie inside the mapped ranges)."""
    out = []
    for a, b in tokens:
        for ta, tb, slot in slot_map:
            if ta <= a and b <= tb:
                out.append((slot + a - ta, slot + b - ta))
                break
        else:
            raise AssertionError(f"tokens [{a}, {b}) are not live in the cache")
    return out
