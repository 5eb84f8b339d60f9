"""Which earlier segments an agent stops seeing when it closes a memory block.

A policy answers one question: at step t, right after the memory m_t is written, which
steps' segments are dropped? The prompt (step 0) is never dropped. Steps are 1-based turns.
"""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("mempo", "keep_all", "keep_last_k")
CONTEXT_MODES = ("evict", "reencode")


@dataclass(frozen=True)
class ContextPolicy:
    """name: "mempo" (drop every earlier step: the new memory replaces them),
    "keep_all" (plain ReAct agent, the baseline token savings are measured against), or
    "keep_last_k" (keep the last k steps besides the memory).
    mode: after a drop, "evict" keeps the kept tokens' KV as written (original positions, states
    computed with the old context), "reencode" re-encodes the kept context at contiguous
    positions right after the prompt (what engines that re-submit the context compute)."""

    name: str = "mempo"
    k: int = 1
    mode: str = "evict"  # evict: kept KV stays at its positions; reencode: kept context re-encoded after the prompt

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"context policy must be one of {POLICIES}, got {self.name!r}")
        if self.mode not in CONTEXT_MODES:
            raise ValueError(f"context mode must be one of {CONTEXT_MODES}, got {self.mode!r}")
        if self.name == "keep_last_k" and self.k < 0:
            raise ValueError(f"keep_last_k needs k >= 0, got {self.k}")

    def dropped_steps(self, step: int) -> range:
        """Steps whose segments are dropped once step `step` has closed its memory."""
        if self.name == "keep_all":
            return range(1, 1)
        keep = 0 if self.name == "mempo" else self.k
        return range(1, max(1, step - keep))
