"""Segment visibility of packed trajectories: who sees whom, without an L x L mask.

A packed batch is B sequences laid end to end (`cu_seqlens`). Each sequence is a run of
contiguous segments (prompt, memory, think, ...). Token order is generation order, so
"the query is not before the key" is plain causality in packed index order, and the rest
of the rule lives at segment granularity: row `s` of `visible_bits` is a bitset over the
segments of s's own sequence (bit j of word j // 32 = local segment j is visible to s).

    key k visible to query q  <=>  same sequence, k <= q, bit(seg(q), seg(k)) set

Building is O(S * W + L) numpy per batch; `dense_mask()` (tests, references) is the only
place an L x L tensor exists. Block tables for the Triton kernel are derived in
`mempo.ops.segment_blocks`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

# "context": a re-encoded copy of kept context (rollout.context_mode=reencode), no loss on it
SEGMENT_KINDS = ("prompt", "memory", "think", "action", "tool_call", "information", "answer", "probe", "context")
BITS_PER_WORD = 32  # visible_bits words are int32 (bit 31 stored in the sign bit)


@dataclass
class Segment:
    """One segment of a trajectory: tokens [start, end) of the trajectory (local indices).

    dropped_at: index of the first token of the trajectory that no longer sees this segment
    (None: never dropped); it must be a segment start (or the trajectory's length).
    sees: explicit visibility row (local indices of the segments this one sees, e.g. a probe
    seeing the prompt and one memory); None -> derived from start/dropped_at. A segment
    always sees itself.
    """

    kind: str
    step: int
    start: int
    end: int
    dropped_at: int | None = None
    sees: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {SEGMENT_KINDS}, got {self.kind!r}")


@dataclass
class SegmentLayout:
    """Packed-batch visibility metadata (L tokens, S segments over all B sequences).

    cu_seqlens: [B+1] int32, token offsets of the sequences
    position_ids: [L] int64, every token's rotary position (as generated)
    token_segment: [L] int32, global segment index of every token
    segment_base: [S] int32, global index of the first segment of the segment's sequence
    segment_kind: [S] int8, index into SEGMENT_KINDS
    segment_step: [S] int32
    segment_bounds: [S, 2] int32, packed token range [start, end)
    visible_bits: [S, W] int32, bitset rows over the sequence's local segments
    """

    cu_seqlens: Tensor
    position_ids: Tensor
    token_segment: Tensor
    segment_base: Tensor
    segment_kind: Tensor
    segment_step: Tensor
    segment_bounds: Tensor
    visible_bits: Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.token_segment.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def device(self) -> torch.device:
        return self.token_segment.device

    def to(self, device: torch.device | str) -> SegmentLayout:
        """Copy the (small) metadata to `device` once; block tables are rebuilt lazily, from
        the host copy this keeps (so building them costs no device -> host transfer)."""
        names = ("cu_seqlens", "position_ids", "token_segment", "segment_base", "segment_kind",
                 "segment_step", "segment_bounds", "visible_bits")
        moved = SegmentLayout(**{n: getattr(self, n).to(device) for n in names})
        if moved.device.type != "cpu":
            moved._cache["host"] = self.host()
        return moved

    def host(self) -> SegmentLayout:
        """This layout on the CPU (itself, the copy it was moved from, or a new copy)."""
        if self.device.type == "cpu":
            return self
        if "host" not in self._cache:
            self._cache["host"] = self.to("cpu")
        return self._cache["host"]

    def visible_segments(self) -> Tensor:
        """-> [S, max segments per sequence] bool, the bitset rows unpacked."""
        words = self.visible_bits.long() & 0xFFFFFFFF
        bit = torch.arange(BITS_PER_WORD, device=words.device)
        return ((words[:, :, None] >> bit) & 1).bool().flatten(1)

    def dense_mask(self) -> Tensor:
        """-> [L, L] bool, mask[q, k] = k visible to q. References and tests only."""
        seg = self.token_segment.long()
        local = seg - self.segment_base[seg].long()
        vis = self.visible_segments()  # [S, Wbits]
        same_seq = self.segment_base[seg][:, None] == self.segment_base[seg][None, :]
        idx = torch.arange(self.num_tokens, device=seg.device)
        causal = idx[None, :] <= idx[:, None]
        seg_ok = vis[seg][:, local.clamp(max=vis.shape[1] - 1)]
        return same_seq & causal & seg_ok

    # ---- builders -------------------------------------------------------------------

    @staticmethod
    def from_segments(sequences: Sequence[Sequence[Segment]],
                      position_ids: Sequence[Sequence[int] | np.ndarray | Tensor | None] | None = None,
                      ) -> SegmentLayout:
        """Pack trajectories, each a list of segments tiling [0, length) in order.

        position_ids: one per sequence (length = its token count) or None -> 0..length-1.
        """
        tables, lengths = [], []
        for b, segs in enumerate(sequences):
            # one pass over the Python objects; everything after it is array work
            fields = np.array([(s.start, s.end, -1 if s.dropped_at is None else s.dropped_at,
                                _KIND_CODES.get(s.kind, -1), s.step) for s in segs], dtype=np.int64).reshape(-1, 5)
            starts, ends, dropped, kinds, steps = fields.T
            _check_tiling(starts, ends, f"sequences[{b}]")
            if (kinds < 0).any():
                j = int(np.flatnonzero(kinds < 0)[0])
                raise ValueError(f"sequences[{b}][{j}]: segment kind must be one of {SEGMENT_KINDS}, "
                                 f"got {segs[j].kind!r}")
            length = int(ends[-1])
            dropped = np.where(dropped < 0, length + 1, dropped)
            # a drop inside or before the segment would split it: visibility is per segment
            allowed = np.append(starts, [length, length + 1])  # sorted
            at = allowed[np.minimum(np.searchsorted(allowed, dropped), len(allowed) - 1)]
            bad = (at != dropped) | (dropped < ends)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise ValueError(f"sequences[{b}][{j}].dropped_at={segs[j].dropped_at} must be a segment "
                                 f"start >= the segment's end ({int(ends[j])}) or the sequence length {length}")
            # A sees B iff B starts no later than A and B was not dropped by A's start.
            vis = (starts[None, :] <= starts[:, None]) & (starts[:, None] < dropped[None, :])
            for a, s in enumerate(segs):
                sees = s.sees
                if sees is not None:
                    idx = np.asarray(list(sees), dtype=np.int64).reshape(-1)
                    if ((idx < 0) | (idx >= len(segs))).any():  # a negative index would wrap around
                        raise ValueError(f"sequences[{b}][{a}].sees must hold segment indices in [0, {len(segs)}), "
                                         f"got {list(sees)}")
                    vis[a] = False
                    vis[a, idx] = True
            tables.append((ends - starts, vis, kinds, steps))
            lengths.append(length)
        return _pack(tables, lengths, position_ids)

    @staticmethod
    def from_tables(segment_lengths: Sequence[Sequence[int]], visible: Sequence[np.ndarray | Tensor],
                    position_ids: Sequence[Sequence[int] | np.ndarray | Tensor | None] | None = None,
                    kinds: Sequence[Sequence[str]] | None = None,
                    steps: Sequence[Sequence[int]] | None = None) -> SegmentLayout:
        """Pack sequences given per-sequence segment lengths and [n, n] bool visibility tables."""
        tables, lengths = [], []
        for b, (seg_len, vis) in enumerate(zip(segment_lengths, visible, strict=True)):
            seg_len = np.asarray(seg_len, dtype=np.int64)
            vis = np.asarray(vis.cpu() if isinstance(vis, Tensor) else vis)
            if vis.dtype != bool and not np.isin(vis, (0, 1)).all():
                # an additive 0/-inf mask (or 0.5) cast to bool would be silently inverted / rounded
                raise ValueError(f"visible[{b}] must be bool or hold only 0 and 1 (1 = visible), got values "
                                 f"{np.unique(vis)[:6].tolist()}; an additive 0/-inf mask is not a visibility table")
            vis = vis.astype(bool)
            n = len(seg_len)
            if vis.shape != (n, n):
                raise ValueError(f"visible[{b}] must have shape ({n}, {n}), got {tuple(vis.shape)}")
            if n == 0 or (seg_len < 0).any() or seg_len.sum() == 0:
                raise ValueError(f"segment_lengths[{b}] must be a non-empty list of lengths >= 0 with at least "
                                 f"one token in all, got {seg_len.tolist()}")
            k = [_kind_code(x, f"kinds[{b}]") for x in kinds[b]] if kinds else [0] * n
            st = list(steps[b]) if steps else [0] * n
            tables.append((seg_len, vis, k, st))
            lengths.append(int(seg_len.sum()))
        return _pack(tables, lengths, position_ids)


_KIND_CODES = {kind: i for i, kind in enumerate(SEGMENT_KINDS)}


def _kind_code(kind: str, where: str) -> int:
    code = _KIND_CODES.get(kind)
    if code is None:
        raise ValueError(f"{where}: segment kind must be one of {SEGMENT_KINDS}, got {kind!r}")
    return code


def _check_tiling(starts: np.ndarray, ends: np.ndarray, name: str) -> None:
    if len(starts) == 0:
        raise ValueError(f"{name} has no segments")
    if starts[0] != 0 or (ends < starts).any() or (starts[1:] != ends[:-1]).any() or ends[-1] <= 0:
        raise ValueError(f"{name}: segments must tile [0, length) in order with length > 0, "
                         f"got starts={starts.tolist()} ends={ends.tolist()}")


def _pack(tables: list, lengths: list[int], position_ids) -> SegmentLayout:
    if not tables:
        raise ValueError("need at least one sequence")
    counts = np.array([len(t[0]) for t in tables], dtype=np.int64)
    words = -(-int(counts.max()) // BITS_PER_WORD)
    seg_lengths = np.concatenate([t[0] for t in tables])
    base = np.repeat(np.cumsum(counts) - counts, counts)
    total = int(counts.sum())
    visible = np.zeros((total, words * BITS_PER_WORD), dtype=bool)
    for (_, vis, _, _), b0 in zip(tables, np.cumsum(counts) - counts):
        visible[b0:b0 + vis.shape[0], :vis.shape[0]] = vis
    visible[np.arange(total), np.arange(total) - base] = True  # a token always sees itself
    # little-endian bit order inside each 32-bit word
    bits = np.packbits(visible.reshape(total, words, 4, 8), axis=-1, bitorder="little").reshape(
        total, words * 4).view("<u4")
    ends = np.cumsum(seg_lengths)
    bounds = np.stack([ends - seg_lengths, ends], axis=1)
    if position_ids is None:
        position_ids = [None] * len(lengths)
    if len(position_ids) != len(lengths):
        raise ValueError(f"position_ids must have one entry per sequence ({len(lengths)}), got {len(position_ids)}")
    pos = []
    for b, (p, n) in enumerate(zip(position_ids, lengths)):
        p = np.arange(n) if p is None else np.asarray(p.cpu() if isinstance(p, Tensor) else p, dtype=np.int64)
        if p.shape != (n,):
            raise ValueError(f"position_ids[{b}] must have shape ({n},), got {tuple(p.shape)}")
        pos.append(p)
    return SegmentLayout(
        cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
        position_ids=torch.from_numpy(np.concatenate(pos).astype(np.int64)),
        token_segment=torch.from_numpy(np.repeat(np.arange(len(seg_lengths)), seg_lengths).astype(np.int32)),
        segment_base=torch.from_numpy(base.astype(np.int32)),
        segment_kind=torch.tensor(np.concatenate([t[2] for t in tables]), dtype=torch.int8),
        segment_step=torch.tensor(np.concatenate([t[3] for t in tables]), dtype=torch.int32),
        segment_bounds=torch.from_numpy(bounds.astype(np.int32)),
        visible_bits=torch.from_numpy(bits.view(np.int32)),
    )
