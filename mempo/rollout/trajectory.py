"""What a rollout records: tokens, segments with their drop times, sampling log-probs.

Token order is generation order. With context_mode=evict every token's position id is its
index in the trajectory (eviction keeps the positions keys were written with); with
context_mode=reencode, a drop appends a "context" copy of what is kept, re-encoded at
contiguous positions right after the prompt, and later tokens continue from there
(`position_breaks`). A segment's `dropped_at` is the index of the first token that no longer
sees it (None: never dropped); visibility for training follows from exactly this record.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mempo.ops.segment_layout import Segment


@dataclass
class Trajectory:
    """One rollout of one task. Lists are per token unless named otherwise."""

    task_index: int
    group_index: int
    token_ids: list[int] = field(default_factory=list)
    sample_logprobs: list[float] = field(default_factory=list)  # 0.0 where not sampled
    loss_mask: list[bool] = field(default_factory=list)  # model-written tokens only
    segments: list[Segment] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)  # model text of each turn
    information_texts: list[str | None] = field(default_factory=list)  # tool reply of each turn
    answers: tuple[str, ...] | None = None
    format_valid: bool = False
    finish_reason: str = ""  # "answer", "format_error", "max_turns", "max_tokens", "context_full"
    reward: float = 0.0
    score: float = 0.0
    tokens_processed: int = 0  # TT: tokens that went through the model
    peak_context: int = 0  # PT: the largest context (live KV) the model attended to
    # (token index, its position): positions rise by one per token from each break on
    position_breaks: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def position_ids(self) -> list[int]:
        out, breaks = [], self.position_breaks + [(len(self), None)]
        for (t0, p0), (t1, _) in zip(breaks[:-1], breaks[1:]):
            out += range(p0, p0 + t1 - t0)
        return out

    def position_of(self, index: int) -> int:
        """The rotary position of token `index` (may be len(self): the next token's)."""
        t0, p0 = max(b for b in self.position_breaks if b[0] <= index)
        return p0 + index - t0

    def reencode_kept(self, at: int) -> list[tuple[int, int]]:
        """context_mode=reencode, after a drop at token `at` (== len(self)): every live segment
        but the prompt is dropped too and appended again as a "context" copy (no loss), at
        contiguous positions right after the prompt, as an engine that re-submits the kept
        context as a fresh prompt (vLLM, SGLang) computes it. -> the original ranges, whose
        KV must go."""
        assert at == len(self), "re-encode right after the drop"
        prompt = self.segments[0]
        kept = [s for s in self.segments if s.dropped_at is None and s.kind != "prompt"]
        for seg in kept:
            seg.dropped_at = at
        self.position_breaks.append((at, self.position_of(prompt.end - 1) + 1))
        for seg in kept:
            begin = len(self)
            self.token_ids += self.token_ids[seg.start:seg.end]
            self.sample_logprobs += [0.0] * (seg.end - seg.start)
            self.loss_mask += [False] * (seg.end - seg.start)
            self.segments.append(Segment("context", seg.step, begin, len(self)))
        return [(s.start, s.end) for s in kept]

    def drop_steps(self, steps, at: int) -> list[tuple[int, int]]:
        """Mark the live segments of `steps` dropped from token `at` on (the context policy's
        decision when a memory closes) -> their token ranges, for KV eviction."""
        steps = set(steps)
        ranges = []
        for seg in self.segments:
            if seg.step in steps and seg.dropped_at is None:
                seg.dropped_at = at
                ranges.append((seg.start, seg.end))
        return ranges

    def close_turn(self, step: int, turn_start: int, mem_closed: bool, text: str) -> None:
        """Record a finished turn: its action segment (the tokens after its memory and any
        re-encoded context copies) and its text; the tool's reply, if any, is filled in later."""
        action_start = self.segments[-1].end if mem_closed else turn_start
        if len(self) > action_start:
            self.segments.append(Segment("action", step, action_start, len(self)))
        self.turn_texts.append(text)
        self.information_texts.append(None)

    def memory_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "memory"]
