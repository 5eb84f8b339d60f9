"""Memory probes: the segments that score the gold answer in the packed forward.

For memory m_t (trajectory tokens [ms, me)) two probes end with the same tokens, an
answer cue and the gold answer, and are appended after the trajectory in its packed
sequence (so they are causal there), scored without gradient:
  - `given_memory` = P(ans | q, m_t): a fresh copy of m_t's tokens at their original
    positions (context_mode=reencode: right after the prompt, where the agent sees it after a
    drop), then cue + answer; it sees only the prompt and itself. The copy re-encodes
    the memory text alone (in the trajectory, m_t's states were computed while the old
    context was still visible, which would leak that context into the score).
  - `given_history` = eps_t: cue + answer at positions ms, ms+1, ...; it sees every
    trajectory token before m_t, as the rollout computed them, and itself.
See mempo.algo.memory_reward for the arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

from mempo.ops.segment_layout import Segment
from mempo.rollout.trajectory import Trajectory


@dataclass
class Probe:
    memory: Segment  # the memory block being scored
    memory_number: int  # index among the trajectory's memory segments
    given_history: bool  # False: prompt + memory copy; True: the full history before m_t
    token_ids: list[int]  # [memory copy +] cue + answer
    num_prefix_tokens: int  # tokens before the first answer token
    first_position: int  # rotary position of the probe's first token

    def visible(self, traj: Trajectory) -> list[tuple[int, int]]:
        """Trajectory token ranges this probe attends to (besides itself)."""
        if self.given_history:
            return [(0, self.memory.start)]
        prompt = next(s for s in traj.segments if s.kind == "prompt")
        return [(prompt.start, prompt.end)]


def build_probes(traj: Trajectory, cue_ids: list[int], answer_ids: list[int], reencode: bool = False) -> list[Probe]:
    """Two probes per memory block of `traj` (none when it wrote no memory). reencode
    (context_mode=reencode): the memory copy sits right after the prompt, where the agent
    itself sees the memory after a drop; else at the memory's own positions."""
    if not cue_ids:
        raise ValueError("the answer cue must have at least one token (it predicts the first answer token)")
    if not answer_ids:
        raise ValueError("the gold answer must have at least one token")
    tail = list(cue_ids) + list(answer_ids)
    probes = []
    prompt = next(s for s in traj.segments if s.kind == "prompt")
    for number, mem in enumerate(traj.memory_segments()):
        memory_copy = traj.token_ids[mem.start:mem.end]
        copy_at = traj.position_of(prompt.end) if reencode else traj.position_of(mem.start)
        probes.append(Probe(mem, number, False, memory_copy + tail, len(memory_copy) + len(cue_ids), copy_at))
        probes.append(Probe(mem, number, True, tail, len(cue_ids), traj.position_of(mem.start)))
    return probes


def answer_cue_and_ids(tokenizer, task, tags) -> tuple[list[int], list[int]]:
    """Tokens of the probe's answer cue (the answer tag) and of the gold answer."""
    cue = tokenizer(tags.answer[0], add_special_tokens=False)["input_ids"]
    gold = f"{tags.answer_separator} ".join(a[0] for a in task.answers)
    return cue, tokenizer(gold, add_special_tokens=False)["input_ids"]
