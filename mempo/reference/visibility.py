"""The visibility rule token by token, straight from a rollout's record (slow; tests only).

The fast path (`SegmentLayout.from_segments`) states the rule per segment and packs it into
bitsets; this states it per token, as the rollout lived it, so tests can compare the two.
"""
from __future__ import annotations

from collections.abc import Sequence

from mempo.ops.segment_layout import Segment


def visible_keys(segments: Sequence[Segment], query: int) -> list[int]:
    """Token indices that token `query` attended to when it was processed: every token up to
    and including it whose segment had not been dropped by then."""
    seg_of = {i: s for s in segments for i in range(s.start, s.end)}
    return [k for k in range(query + 1) if seg_of[k].dropped_at is None or seg_of[k].dropped_at > query]
