"""Transcripts (an episode as text turns), the memory context rule, and token accounting (TT / PT).

A transcript is the prompt plus turns of {"model": text the model wrote, "information":
the `<information>` block the tool returned, or None after an answer / invalid turn}.

Context rule (MemPO): when the model closes a `<mem>` block, everything before that block
except the prompt is dropped, so the context is prompt + newest memory + what follows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mempo.envs.agent_format import DEFAULT_TAGS, AgentTags
from mempo.envs.tasks import Task


@dataclass(frozen=True)
class Turn:
    model: str
    information: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "information": self.information}


@dataclass(frozen=True)
class Transcript:
    task: Task
    prompt: str
    turns: tuple[Turn, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"id": self.task.id, "questions": list(self.task.questions),
                "answers": [list(a) for a in self.task.answers], "prompt": self.prompt,
                "turns": [t.to_dict() for t in self.turns]}

    @classmethod
    def from_dict(cls, record: dict) -> Transcript:
        """Inverse of `to_dict` (e.g. after a JSON round trip)."""
        task = Task(id=str(record["id"]), questions=tuple(record["questions"]),
                    answers=tuple(tuple(a) for a in record["answers"]))
        turns = tuple(Turn(t["model"], t.get("information")) for t in record["turns"])
        return cls(task=task, prompt=record["prompt"], turns=turns)


def memory_span(text: str, tags: AgentTags = DEFAULT_TAGS) -> tuple[int, int] | None:
    """(start of the last closed `<mem>` block, end of its closing tag) in `text`, or None."""
    start = text.rfind(tags.mem[0])
    while start != -1:
        close = text.find(tags.mem[1], start + len(tags.mem[0]))
        if close != -1:
            return start, close + len(tags.mem[1])
        start = text.rfind(tags.mem[0], 0, start)
    return None


def visible_context(prompt: str, turns: Sequence[Turn], tags: AgentTags = DEFAULT_TAGS,
                    prune_on_memory: bool = True) -> str:
    """The text the model sees before its next turn (prompt + kept turns + information)."""
    kept: list[str] = []
    for turn in turns:
        span = memory_span(turn.model, tags) if prune_on_memory else None
        if span is not None:
            kept = [turn.model[span[0]:]]
        else:
            kept.append(turn.model)
        if turn.information is not None:
            kept.append(turn.information)
    return prompt + "".join(kept)


@dataclass(frozen=True)
class TokenUsage:
    """total_tokens (TT): sum over turns of the context length when the turn's generation
    ends, i.e. what a model re-reading its context every turn processes.
    peak_tokens (PT): the longest the context ever gets (memory pruning happens the moment
    `</mem>` is written, so a turn's peak is counted just before it)."""

    total_tokens: int
    peak_tokens: int
    num_turns: int


def token_usage(prompt: str, turns: Sequence[Turn], count_tokens: Callable[[str], int],
                tags: AgentTags = DEFAULT_TAGS, prune_on_memory: bool = True) -> TokenUsage:
    """TT and PT of a trajectory; pieces (prompt, turn text, information) are counted
    separately, which matches how a rollout appends them."""
    prompt_tokens = count_tokens(prompt)
    retained = 0  # tokens after the prompt
    total, peak = 0, prompt_tokens
    for turn in turns:
        span = memory_span(turn.model, tags) if prune_on_memory else None
        if span is not None:
            peak = max(peak, prompt_tokens + retained + count_tokens(turn.model[:span[1]]))
            retained = count_tokens(turn.model[span[0]:])
        else:
            retained += count_tokens(turn.model)
        total += prompt_tokens + retained
        if turn.information is not None:
            retained += count_tokens(turn.information)
        peak = max(peak, prompt_tokens + retained)
    return TokenUsage(total_tokens=total, peak_tokens=peak, num_turns=len(turns))
